"""Sessions sized by their budget (rounds of mapping) and targets reached by image shift, on the real simulator.

The sessions start from a stored calibration made of the simulator's true matrices (what `crystal-locator
calibrate` would have stored for this instrument), so they only check it; the 512 px camera gives search
images of about 20 um, in which neighbouring crystals of seed 0 are reached by image shift. The session sized by
its budget is also the reference of a kill -9 and resume of the same session through the command line.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.config import AreaPlan, ConfirmPlan, ScreeningPlan, TargetingPlan
from agent.session.journal import read_journal
from agent.session.screening import ScreeningSession
from agent.steps.calibration_store import CalibrationStore
from agent.steps.direct import MIN_SURE_LIT_SHARE
from agent.steps.stage_calibration import CalibrationSet, PresetCalibration
from simulator.scoring import score_session
from tests.session.test_resume_determinism import _run_and_kill, _summary

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope
    from tests.conftest import MakeMicroscope

CAMERA_PX = 512
SEED = 0


def true_calibration(microscope: SimulatedMicroscope) -> CalibrationSet:
    """The calibration a store would hold for this simulated instrument: its true image -> stage matrices."""
    info = microscope.info()
    calibration = CalibrationSet(instrument=info.name)
    for preset in info.presets:
        calibration = calibration.with_preset(
            PresetCalibration.from_matrix(
                preset.name, microscope.true_image_to_stage_matrix(preset.name), preset.pixel_size_um,
                residual_px=0.0, shift_um=0.0, stage_xy_um=(0.0, 0.0), measured_utc="2026-12-07T00:00:00Z",
            )
        )
    return calibration


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, simulated_microscope: MakeMicroscope) -> Path:
    """A calibration store holding the simulated instrument's calibration."""
    folder = tmp_path_factory.mktemp("store") / "calibrations"
    CalibrationStore(folder).save(true_calibration(simulated_microscope(camera_px=CAMERA_PX)))
    return folder


def run(folder: Path, microscope: SimulatedMicroscope, plan: ScreeningPlan, store: Path) -> ScreeningSession:
    truth = microscope.ground_truth
    session = ScreeningSession(
        microscope, plan, folder, calibration_store=CalibrationStore(store),
        truth_scorer=lambda targets, results, boxes: score_session(truth, list(results.values()), boxes),
    )
    session.run()
    return session


#: The plan of `by_budget` as the command line gives it.
SCREEN = ["--simulated", "--specimen", "protein-plates", "--seed", str(SEED), "--camera-px", str(CAMERA_PX),
          "--squares-per-round", "1", "--time-budget-s", "150", "--no-labels"]


def _plan(**changes: Any) -> ScreeningPlan:
    base: dict[str, Any] = {"specimen": "protein-plates", "seed": SEED, "time_budget_s": 150.0,
                            "area": AreaPlan(squares_per_round=1)}
    return ScreeningPlan(**{**base, **changes})


@pytest.fixture(scope="module")
def by_budget(
    tmp_path_factory: pytest.TempPathFactory, simulated_microscope: MakeMicroscope, store: Path
) -> ScreeningSession:
    folder = tmp_path_factory.mktemp("budget") / "s"
    return run(folder, simulated_microscope("protein-plates", SEED, CAMERA_PX), _plan(), store)


def _entries(session: ScreeningSession) -> list[dict[str, Any]]:
    return read_journal(session.session_dir / "journal.jsonl")


def test_a_session_sized_by_its_budget_maps_rounds_until_the_budget_is_spent(by_budget: ScreeningSession) -> None:
    entries = _entries(by_budget)
    done = [e for e in entries if e["type"] == "mapping" and e["event"] == "done"]
    assert [e["round"] for e in done] == list(range(1, len(done) + 1)) and len(done) >= 2
    assert done[0]["path"] == "atlas/atlas.tif" and done[1]["path"] == "atlas/round-2/atlas.tif"
    assert (by_budget.session_dir / "atlas" / "round-2" / "heatmap.png").exists()
    from agent.report import session_report_html

    assert "round 2: heat map with targets" in session_report_html(by_budget.session_dir)
    summary = by_budget.summary()
    assert summary.state == "done"
    assert summary.microscope_time_s <= 150.0 + 30.0  # no target is started after the budget (one may overrun it)
    # another round is mapped only with budget left for a montage like the last one and a visit after it
    last_done = done[-1]["microscope_time_s"]
    assert last_done <= 150.0
    # targets of all rounds, numbered on, each visited once, none planned twice on one spot
    targets = [t for e in entries if e["type"] == "targets" for t in e["targets"]]
    ids = [t["target_id"] for t in targets]
    assert ids == [f"T{n:03d}" for n in range(1, len(ids) + 1)]
    for i, a in enumerate(targets):
        for b in targets[i + 1 :]:
            assert math.hypot(a["x_um"] - b["x_um"], a["y_um"] - b["y_um"]) >= by_budget.plan.targeting.min_spacing_um
    # the boxes of different rounds do not cover the same grid square twice (their centres are apart)
    boxes = [e["box_um"] for e in done]
    centres = [((b[0] + b[1]) / 2, (b[2] + b[3]) / 2) for b in boxes]
    assert all(math.dist(p, q) > 50.0 for i, p in enumerate(centres) for q in centres[i + 1 :])
    # recall is counted over every round's box
    assert summary.crystals_in_area is not None
    one_box = score_session(by_budget.microscope.ground_truth, [], boxes[0])  # type: ignore[attr-defined]
    assert summary.crystals_in_area > one_box["crystals_in_area"]


def _without_an_image(entry: dict[str, Any]) -> bool:
    """A target decided with no image at all: snapped directly, or on an object already snapped."""
    return bool(entry.get("direct")) or "on the atlas" in entry.get("reason", "")


def test_targets_in_one_search_image_are_reached_by_image_shift(by_budget: ScreeningSession) -> None:
    entries = _entries(by_budget)
    searched = {e["target_id"] for e in entries if e["type"] == "artifact" and e["kind"] == "search"}
    finished = [e for e in entries if e["type"] == "target" and not _without_an_image(e)]
    in_field = [e for e in finished if e["target_id"] not in searched]
    assert in_field, "seed 0 has crystals closer together than the search field"
    # an in-field visit moves no stage and takes no search image: it is much shorter than a visit with both
    starts = {}
    for e in entries:
        if e["type"] == "transition" and e["state"] == "moving":
            starts[len(starts)] = e["microscope_time_s"]
    every = [e for e in entries if e["type"] == "target"]
    durations = [e["microscope_time_s"] - starts[every.index(e)] for e in finished]
    inside = [d for d, e in zip(durations, finished, strict=True) if e["target_id"] not in searched]
    outside = [d for d, e in zip(durations, finished, strict=True) if e["target_id"] in searched]
    assert max(inside) < min(outside)
    # in-field targets confirmed on the image of another target still land on the object they were planned on
    for e in in_field:
        if e["outcome"] in ("recorded", "no-diffraction"):
            assert e["images"]["search"].startswith("targets/") and e["target_id"] not in e["images"]["search"]


def test_without_image_shift_every_target_gets_its_own_search_image(
    tmp_path: Path, simulated_microscope: MakeMicroscope, store: Path
) -> None:
    plan = _plan(confirm=ConfirmPlan(image_shift=False), targeting=TargetingPlan(max_targets=6))
    session = run(tmp_path / "s", simulated_microscope("protein-plates", SEED, CAMERA_PX), plan, store)
    entries = _entries(session)
    searched = {e["target_id"] for e in entries if e["type"] == "artifact" and e["kind"] == "search"}
    assert all(e["target_id"] in searched for e in entries
               if e["type"] == "target" and e["outcome"] != "failed" and not _without_an_image(e))


@pytest.fixture(scope="module")
def direct_session(
    tmp_path_factory: pytest.TempPathFactory, simulated_microscope: MakeMicroscope, store: Path
) -> ScreeningSession:
    """A protein session long enough to measure its position error on 3 diffracting targets (the plan's
    `confirm.direct_after_measured`), then snap the wide plates directly."""
    folder = tmp_path_factory.mktemp("direct") / "s"
    plan = _plan(time_budget_s=300.0, confirm=ConfirmPlan(direct_after_measured=3))
    return run(folder, simulated_microscope("protein-plates", SEED, CAMERA_PX), plan, store)


def test_wide_objects_are_snapped_directly_once_the_position_error_is_measured(
    direct_session: ScreeningSession,
) -> None:
    entries = _entries(direct_session)
    finished = [e for e in entries if e["type"] == "target"]
    direct = [e for e in finished if e.get("direct")]
    assert direct, "protein plates are wider than the beam plus the measured error"
    first = finished.index(direct[0])
    measured = [e for e in finished[:first] if e["outcome"] == "recorded" and not e.get("direct")]
    assert len(measured) >= direct_session.plan.confirm.direct_after_measured  # never before the error is known
    planned = {t.target_id: t for t in direct_session.targets}
    pixel_um = direct_session.atlas.pixel_size_um
    beam_radius_um = direct_session.plan.confirm.beam_diameter_um / 2
    for e in direct:
        assert e["outcome"] in ("recorded", "no-diffraction") and "search" not in e["images"]
        assert "diffraction" in e["images"] and (direct_session.session_dir / e["images"]["diffraction"]).exists()
        target = planned[e["target_id"]]
        assert (e["x_um"], e["y_um"]) == (target.x_um, target.y_um)  # where the atlas put it
        f = target.features
        radius_um = math.sqrt(math.exp(f["log_area_px"]) / (math.pi * math.exp(f["log_elongation"]))) * f["solidity"]
        radius_um *= pixel_um
        before = finished[: finished.index(e)]
        offsets = [b["recentre_offset_um"] for b in before if b["outcome"] == "recorded" and not b.get("direct")]
        error_um = 2 * statistics.median(offsets)
        # the beam, off by the error, still lights at least half of what a centred one would: the object is wider
        # than the beam plus the error, or narrow enough that most of it stays under the beam
        assert radius_um >= beam_radius_um + error_um or min(radius_um, beam_radius_um) <= (
            beam_radius_um - error_um
        ) / math.sqrt(MIN_SURE_LIT_SHARE)
    summary = direct_session.summary()
    assert summary.targets_snapped_directly == len(direct)
    assert summary.targets_confirmed == sum(1 for e in finished if e["outcome"] in ("recorded", "no-diffraction")
                                            and not e.get("direct"))
    nav = (direct_session.session_dir / "targets.nav").read_text()
    assert all(f"crystal-locator {e['target_id']}" in nav or e["target_id"] in nav for e in direct)


def test_direct_snapshots_near_the_stage_are_reached_by_image_shift_with_no_move(
    direct_session: ScreeningSession,
) -> None:
    entries = _entries(direct_session)
    every = [e for e in entries if e["type"] == "target"]
    starts = [e["microscope_time_s"] for e in entries if e["type"] == "transition" and e["state"] == "moving"]
    assert len(starts) == len(every)
    # a target's record holds where the stage was at its outcome: the same as the previous target's when the
    # beam was put on it by image shift alone
    shifted, moved = [], []
    for index, e in enumerate(every[1:], start=1):
        if not e.get("direct"):
            continue
        duration_s = e["microscope_time_s"] - starts[index]
        same_stage = e["stage"]["x_um"] == every[index - 1]["stage"]["x_um"] and (
            e["stage"]["y_um"] == every[index - 1]["stage"]["y_um"]
        )
        (shifted if same_stage else moved).append(duration_s)
        if same_stage:
            limit_um = direct_session.ctx.image_shift_limit_um()
            assert abs(e["x_um"] - e["stage"]["x_um"]) <= limit_um + 1.0
            assert abs(e["y_um"] - e["stage"]["y_um"]) <= limit_um + 1.0
    assert shifted, "protein plates of seed 0 lie within the image-shift range of each other"
    assert moved
    assert max(shifted) < min(moved)  # no stage move, no settling


def test_without_direct_snapshots_every_snapshot_follows_a_search_image(
    tmp_path: Path, simulated_microscope: MakeMicroscope, store: Path
) -> None:
    plan = _plan(time_budget_s=300.0, confirm=ConfirmPlan(direct_snapshot=False, direct_after_measured=3))
    session = run(tmp_path / "s", simulated_microscope("protein-plates", SEED, CAMERA_PX), plan, store)
    finished = [e for e in _entries(session) if e["type"] == "target"]
    assert not any(e.get("direct") for e in finished)
    assert all("search" in e["images"] for e in finished if e["outcome"] in ("recorded", "no-diffraction"))


def test_a_target_cap_holds_across_rounds(tmp_path: Path, simulated_microscope: MakeMicroscope, store: Path) -> None:
    plan = _plan(targeting=TargetingPlan(max_targets=5))
    session = run(tmp_path / "s", simulated_microscope("protein-plates", SEED, CAMERA_PX), plan, store)
    assert session.summary().targets_found == 5


def test_a_budget_too_small_for_one_target_is_refused_before_anything_moves() -> None:
    with pytest.raises(ValueError, match="no target could be reached"):
        ScreeningPlan(time_budget_s=1.0)


def test_squares_given_means_one_round(tmp_path: Path, simulated_microscope: MakeMicroscope, store: Path) -> None:
    plan = _plan(area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=2))
    session = run(tmp_path / "s", simulated_microscope("protein-plates", SEED, CAMERA_PX), plan, store)
    assert len([e for e in _entries(session) if e["type"] == "mapping" and e["event"] == "done"]) == 1


def _in_field_targets(entries: list[dict[str, Any]]) -> list[str]:
    """Targets visited without a search image of their own (reached in an earlier target's search image)."""
    searched = {e.get("target_id") for e in entries if e["type"] == "artifact" and e["kind"] == "search"}
    return [e["target_id"] for e in entries if e["type"] == "target" and e["target_id"] not in searched]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_in_a_later_round_and_resumed_it_ends_as_the_uninterrupted_session(
    by_budget: ScreeningSession, store: Path, tmp_path: Path
) -> None:
    """Killed with SIGKILL just after the target the reference followed with a target in the same search image
    (in a later round): the resumed run must restore that search image (`agent.session.restore._search_field`)
    to visit the rest as the reference did, and ends with the reference's summary and targets."""
    entries = _entries(by_budget)
    in_field = _in_field_targets(entries)
    later = next(i for i, e in enumerate(entries) if e["type"] == "mapping" and e["round"] >= 2)
    target_lines = [i for i, e in enumerate(entries) if e["type"] == "target"]
    follow = next((i for i in target_lines if entries[i]["target_id"] in in_field and i > later),
                  next(i for i in target_lines if entries[i]["target_id"] in in_field))
    kill_after = max(i for i in target_lines if i < follow)

    shutil.copytree(store, tmp_path / "data" / "calibrations")  # `_run_and_kill`'s data folder is out.parent/data
    out = tmp_path / "session"
    command = [sys.executable, "-m", "agent.cli", "screen", *SCREEN, "--out", str(out)]
    cut = _run_and_kill(command, out, lambda journal: len(journal) > kill_after)
    assert cut[-1]["type"] != "summary"
    env = {**os.environ, "CRYSTAL_LOCATOR_CALIBRATIONS": str(tmp_path / "data" / "calibrations"),
           "XDG_DATA_HOME": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "agent.cli", "screen", "--resume", str(out), "--no-labels"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    expected = _summary(by_budget.session_dir)
    for key in ("precision", "recall", "recall_diffracting", "crystals_in_area", "true_positives"):
        expected.pop(key, None)  # the command scores against ground truth the same way; compared without it
    got = {k: v for k, v in _summary(out).items() if k in expected}
    assert got == expected
    assert (out / "targets.csv").read_bytes() == (by_budget.session_dir / "targets.csv").read_bytes()
