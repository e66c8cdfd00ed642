"""Multi-grid runs from the autoloader cassette (`screen --grids`, `agent.grids`): atlas pass, ranking, screening,
skipped slots, resume across grids after a SIGKILL.

The cassette: slot 1 a protein grid, slot 2 empty, slot 3 an asbestos grid, slot 4 a grid that fails to load. Runs
use a 512 px camera, one square per atlas pass and short per-grid budgets, so each takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ScreeningPlan
from agent.grids.assess import GridAssessment, rank_grids
from agent.grids.plan import GridRunPlan, SlotSelectionError, parse_slots
from agent.grids.records import GridAssessed, GridLoaded, GridScreening, GridSkipped, GridsRanked, read_run_records
from agent.grids.run import MultiGridRun, RunError
from agent.grids.yield_guard import YieldGuard
from agent.session.records import TargetFinished
from simulator import create_simulated_microscope
from simulator.cassette import DEFAULT_LOAD_S, DEFAULT_UNLOAD_S
from tests.alerts.alert_servers import WebhookServer

CASSETTE = {
    "slot_count": 4,
    "slots": [
        {"slot": 1, "specimen_type": "protein-plates", "seed": 5, "label": "lysozyme A"},
        {"slot": 3, "specimen_type": "asbestos-fibres", "seed": 7, "label": "asbestos B"},
        {"slot": 4, "specimen_type": "protein-plates", "seed": 9, "label": "lysozyme C", "fails_to_load": True},
    ],
}
RUN_OPTIONS = ["--grids", "1-4", "--time-budget-s", "1500", "--grid-budget-s", "240", "--atlas-squares", "1",
               "--probe-targets", "3", "--no-labels"]


def test_slot_lists_parse_and_bad_ones_say_why() -> None:
    assert parse_slots("1-3,7, 5-6") == (1, 2, 3, 7, 5, 6)
    assert parse_slots("2,2,1-2") == (2, 1)
    for bad, words in (("0-3", "from slot 1"), ("5-2", "count up"), ("a", "not a slot"), ("", "not a slot")):
        with pytest.raises(SlotSelectionError, match=words):
            parse_slots(bad)
    with pytest.raises(ValueError, match="min_grid_budget_s"):
        GridRunPlan(slots=(1,), grid_budget_s=600, min_grid_budget_s=900)
    assert GridRunPlan(slots=(1,), grid_budget_s=600).least_grid_budget_s == 300


def test_grids_rank_by_expected_diffracting_per_hour_and_empty_ones_are_not_worth_screening() -> None:
    assessments = [
        GridAssessment(slot=1, score=40.0, film_level_per_s=1000.0),
        GridAssessment(slot=2, score=0.0, film_level_per_s=1000.0),
        GridAssessment(slot=3, score=90.0, film_level_per_s=400.0),
        GridAssessment(slot=4, score=40.0, film_level_per_s=990.0),
    ]
    ranked = rank_grids(assessments)
    assert [a.slot for a in ranked] == [3, 1, 4, 2]  # ties keep the slot order
    assert [a.thick_ice for a in ranked] == [True, False, False, False]  # reported: below half the brightest film


def _visit(outcome: str) -> TargetFinished:
    return TargetFinished(target_id="t", outcome=outcome, x_um=0.0, y_um=0.0)  # type: ignore[arg-type]


def test_a_grid_is_left_for_the_next_when_its_visits_diffract_far_less_than_its_probes_promised() -> None:
    # 10 targets per square, 30 s per square, probes 2 of 6: (2 + 0.5) / 7 = 0.36 -> 428/h
    grid = GridAssessment(slot=1, targets=40, squares_mapped=4, square_s=30.0, supply=1.0, typical_squares=50,
                          probed=6, probe_diffracting=2, prior=0.5)
    stops: list[int] = []
    guard = YieldGuard(grid, next_score=400.0, stop=lambda: stops.append(guard.visits), min_visits=12)
    for _ in range(11):
        guard(_visit("no-diffraction"))
    guard(_visit("failed"))  # says nothing about the grid
    assert stops == [] and guard.visits == 11
    guard(_visit("rejected"))  # (2 + 0.5) / (18 + 1) = 0.13 -> 158/h < 0.5 x 400
    assert stops == [12] and guard.reason is not None and "0 of 12 visits diffracted" in guard.reason
    guard(_visit("no-diffraction"))
    assert stops == [12]  # once

    kept = YieldGuard(grid, next_score=400.0, stop=lambda: stops.append(-1), min_visits=12)
    for index in range(24):
        kept(_visit("recorded" if index % 3 == 0 else "no-diffraction"))  # a third diffract: 406/h, kept
    assert kept.reason is None and -1 not in stops


def test_a_run_needs_a_cassette_a_slot_that_exists_and_a_budget(tmp_path: Path) -> None:
    def never(*args: object) -> None:
        raise AssertionError("no session may start")

    plain = create_simulated_microscope(camera_shape_px=(256, 256))
    with pytest.raises(RunError, match="no autoloader cassette"):
        MultiGridRun(plain, ScreeningPlan(), GridRunPlan(slots=(1,)), tmp_path / "a", never, never)
    cassette = create_simulated_microscope(cassette="default", camera_shape_px=(256, 256))
    with pytest.raises(RunError, match=r"slots \[13\] do not exist.*1-12"):
        MultiGridRun(cassette, ScreeningPlan(), GridRunPlan(slots=(1, 13)), tmp_path / "b", never, never)
    with pytest.raises(RunError, match="needs a time budget"):
        MultiGridRun(cassette, ScreeningPlan(time_budget_s=None), GridRunPlan(slots=(1,)), tmp_path / "c", never, never)


@pytest.fixture(scope="module")
def cassette_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cassette") / "cassette.json"
    path.write_text(json.dumps(CASSETTE))
    return path


def test_a_run_through_serialem_and_the_bridge_assesses_every_grid_skips_the_bad_slots_and_screens_the_best(
    cassette_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cassette is driven through SerialEM's cartridge commands (the SerialEM driver over its emulator) and
    served over the ZeroMQ bridge, as a microscope PC running SerialEM would serve its autoloader."""
    from drivers.serialem_adapter import SerialEMMicroscope
    from drivers.zmq_bridge import BridgeServer
    from simulator.cassette import load_cassette_spec
    from simulator.serialem_emulator import make_serialem_module

    out = tmp_path / "run"
    plan = tmp_path / "plan.toml"
    plan.write_text('[alerts.webhook]\nurl_env = "GRID_RUN_TEST_WEBHOOK"\nretries = 0\n')
    webhook = WebhookServer()
    monkeypatch.setenv("GRID_RUN_TEST_WEBHOOK", webhook.url)
    cassette = create_simulated_microscope(cassette=load_cassette_spec(cassette_file), camera_shape_px=(512, 512))
    serialem = make_serialem_module(cassette)
    driver = SerialEMMicroscope(serialem, serialem.emulator.config())
    try:
        with BridgeServer(driver, "tcp://127.0.0.1:0") as server:
            command = ["screen", "--bridge", server.endpoint, *RUN_OPTIONS, "--max-grids", "1", "--plan", str(plan)]
            assert main([*command, "--out", str(out)]) == 0
    finally:
        webhook.close()
    # one end alert for the screening session and one for the run; atlas passes only alert a failure or a pause
    texts = [body["text"] for body in webhook.bodies()]
    assert len(texts) == 2, texts
    assert texts[0].startswith("crystal-locator screen ")  # the screening session (its folder name)
    assert texts[1].startswith(f"crystal-locator multi-grid run {out.name} ") and "1 screened" in texts[1]
    records = read_run_records(out)
    skipped = {r.slot: r.reason for r in records if isinstance(r, GridSkipped)}
    assert set(skipped) == {2, 4}
    assert "empty" in skipped[2] and "failed" in skipped[4]
    assessed = {r.slot: GridAssessment.model_validate(r.assessment) for r in records if isinstance(r, GridAssessed)}
    assert set(assessed) == {1, 3}
    for assessment in assessed.values():
        assert assessment.probed >= 1 and assessment.squares_mapped == 1 and assessment.typical_squares > 0
    ranking = next(r for r in records if isinstance(r, GridsRanked))
    assert ranking.order == sorted(assessed, key=lambda slot: -assessed[slot].score)
    screened = [r for r in records if isinstance(r, GridScreening) and r.event == "done"]
    assert [r.slot for r in screened] == [ranking.order[0]]  # --max-grids 1: the best grid only
    # the best grid was loaded again for screening unless it was still on the stage from its atlas pass
    loads = [(r.slot, r.phase) for r in records if isinstance(r, GridLoaded)]
    assert loads[:2] == [(1, "atlas"), (3, "atlas")]
    assert ((ranking.order[0], "screen") in loads) == (ranking.order[0] != 3)

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["state"] == "done" and summary["grids_assessed"] == 2 and summary["grids_screened"] == 1
    # the run's clock is the microscope's: every exchange (the failed transfer of slot 4 too) and every session
    assert summary["run_time_s"] == pytest.approx(cassette.microscope_time_s(), abs=0.5)
    # slot 1, slot 3 (unload first), slot 4's failed transfer (unload, half a load), the best grid again (stage empty)
    load_s, unload_s = DEFAULT_LOAD_S, DEFAULT_UNLOAD_S
    expected_s = load_s + (unload_s + load_s) + (unload_s + load_s / 2) + load_s
    assert summary["exchange_time_s"] == pytest.approx(expected_s, abs=0.5)
    assert summary["run_time_s"] <= 1500 + 240  # the budget (a session may finish the target it started)
    rows = {row["slot"]: row for row in summary["grids"]}
    best = rows[ranking.order[0]]
    assert best["screen_time_s"] <= 240 + 60
    # a screened grid counts its screening session's finds (it re-finds the probed crystals), others their probes
    assert best["diffracting_crystals"] == screened[0].summary["diffracting_crystals"]
    other = rows[ranking.order[1]]
    assert other["diffracting_crystals"] == other["assessment"]["probe_diffracting"]
    assert summary["diffracting_crystals"] == sum(row["diffracting_crystals"] for row in rows.values())
    page = (out / "index.html").read_text()
    assert f'href="grid-{ranking.order[0]:02d}/screen/report.html"' in page and "How grids are ranked" in page
    assert (out / f"grid-{ranking.order[0]:02d}" / "screen" / "targets.nav").exists()
    assert "multi-grid run: done" in capsys.readouterr().out


def test_a_run_that_cannot_start_writes_nothing_and_a_damaged_run_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["screen", "--simulated", "--camera-px", "256", "--grids", "1,13", "--out", str(out)]) == 2
    assert "slots [13] do not exist" in capsys.readouterr().err and not out.exists()
    assert main(["screen", "--simulated", "--grids", "1-5000", "--out", str(out)]) == 2
    assert "beyond any cassette" in capsys.readouterr().err and not out.exists()
    assert main(["screen", "--simulated", "--grids", "1", "--console", "8765", "--out", str(out)]) == 2
    assert "does not serve them yet" in capsys.readouterr().err and not out.exists()
    plan = tmp_path / "plan.toml"
    plan.write_text('[alerts.webhook]\nurl_env = "GRID_RUN_TEST_UNSET_VARIABLE"\n')
    assert main(["screen", "--simulated", "--camera-px", "256", "--grids", "1", "--plan", str(plan),
                 "--out", str(out)]) == 2
    assert "GRID_RUN_TEST_UNSET_VARIABLE" in capsys.readouterr().err and not out.exists()

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "source.json").write_text(json.dumps({"kind": "simulated", "cassette": "default", "seed": 0}))
    (damaged / "grid_plan.json").write_text(json.dumps({"slots": [1, 2]}))
    ScreeningPlan().save(damaged / "plan.json")
    (damaged / "grids.jsonl").write_text('{"seq":1,"type":"grid_loaded","slot":"a"}\n{"seq":2}\n')
    before = sorted(p.name for p in damaged.iterdir())
    assert main(["screen", "--resume", str(damaged)]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert sorted(p.name for p in damaged.iterdir()) == before


def _run_and_kill(command: list[str], env: dict[str, str], ready: Path, timeout_s: float = 240.0) -> None:
    """Start `command`, SIGKILL it as soon as the file `ready` has more than 3 lines (a grid session is under
    way), or fail when that does not happen in `timeout_s`."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if ready.exists() and len(ready.read_bytes().splitlines()) > 3:
                break
            time.sleep(0.02)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()!r}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)


def test_a_run_killed_in_a_grid_session_resumes_there_without_loading_any_grid_again(
    cassette_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    command = [sys.executable, "-m", "agent.cli", "screen", "--simulated", "--camera-px", "512", *RUN_OPTIONS,
               "--cassette", str(cassette_file), "--max-grids", "1", "--out", str(out)]
    _run_and_kill(command, env, out / "grid-03" / "atlas" / "journal.jsonl")
    before = read_run_records(out)
    assert [r.slot for r in before if isinstance(r, GridLoaded)] == [1, 3]
    assert not any(isinstance(r, GridAssessed) and r.slot == 3 for r in before)

    result = subprocess.run([sys.executable, "-m", "agent.cli", "screen", "--resume", str(out), "--json"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    records = read_run_records(out)
    assert sorted(r.slot for r in records if isinstance(r, GridAssessed)) == [1, 3]
    # the grid on the stage was the one the cut session ran on: that session resumed, no reload for it
    atlas_loads = [r.slot for r in records if isinstance(r, GridLoaded) and r.phase == "atlas"]
    assert atlas_loads == [1, 3]
    assert not list(out.glob("grid-*/*.cut-*"))
    lines = (out / "grid-03" / "atlas" / "journal.jsonl").read_text().splitlines()
    atlas_journal = [json.loads(line) for line in lines]
    assert any(e["type"] == "session" and e.get("event") == "resume" for e in atlas_journal)
    summary = json.loads(result.stdout)
    assert summary["state"] == "done" and summary["grids_assessed"] == 2 and summary["grids_screened"] == 1
