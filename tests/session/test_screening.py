"""The screening loop end to end on the real simulator: sessions, calibration, resume, faults, control.

Sessions use a 512 px camera and few targets so that the whole file stays within about a minute on a
quiet 2-core machine; sessions shared by several tests are module-scoped fixtures. Sessions that test something
else than calibration (control, prompts, tiles, duplicate targets) start from the simulator's true calibration,
which they only check (`test_rounds.true_calibration`); the others measure it. The command line's screen, kill
and resume: `test_resume_determinism`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.session.journal import read_journal
from agent.session.screening import ScreeningSession
from simulator import create_simulated_microscope
from simulator.faults import FaultPlan
from simulator.scoring import score_session
from tests.session.test_rounds import true_calibration

if TYPE_CHECKING:
    from agent.prompts import LabelMemory, OperatorChannel
    from simulator.microscope import SimulatedMicroscope

#: Four sessions run in the setup of `finished`: 120 s (the suite's default) is too short on a loaded machine.
pytestmark = pytest.mark.timeout(600)

CAMERA_PX = 512
SPECIMENS = ("protein-plates", "graphite-flakes", "asbestos-fibres", "polymer-faint")


def _plan(specimen: str, seed: int = 0, max_targets: int = 3) -> ScreeningPlan:
    return ScreeningPlan(
        specimen=specimen, seed=seed, area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=max_targets)
    )


NewSession = Callable[..., ScreeningSession]


@pytest.fixture(scope="module")
def new_session(simulated_microscope: Callable[..., SimulatedMicroscope]) -> NewSession:
    """Factory of sessions of `_plan(specimen, seed)` on a fresh simulated microscope (CAMERA_PX camera) scored
    against its ground truth: `new_session(folder, specimen, seed=0, faults=None, checked=False,
    **session_options)`; `checked`: the session starts from the simulator's true calibration (checked, not
    measured)."""

    def make(
        folder: Path, specimen: str, seed: int = 0, faults: FaultPlan | None = None, checked: bool = False,
        **kwargs: Any,
    ) -> ScreeningSession:
        microscope = simulated_microscope(specimen, seed, CAMERA_PX, faults=faults)
        truth = microscope.ground_truth
        if checked:
            kwargs["stored_calibration"] = true_calibration(microscope)
        return ScreeningSession(
            microscope,
            _plan(specimen, seed),
            folder,
            truth_scorer=lambda targets, results, box: score_session(truth, list(results.values()), box),
            **kwargs,
        )

    return make


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, new_session: NewSession) -> dict[str, ScreeningSession]:
    """One finished session per specimen type, with the microscope's fault counters at the first target."""
    sessions = {}
    for specimen in SPECIMENS:
        session = new_session(tmp_path_factory.mktemp(specimen) / "session", specimen)
        counts: dict[str, int] = {}

        def remember(topic: str, event: dict, session: ScreeningSession = session, counts: dict = counts) -> None:
            if topic == "state" and event["state"] == "moving" and not counts:
                counts.update(session.microscope.fault_counts)  # type: ignore[attr-defined]

        session.events.subscribe(remember)
        session.run()
        session.counts_at_first_target = counts  # type: ignore[attr-defined]
        sessions[specimen] = session
    return sessions


@pytest.mark.parametrize("specimen", SPECIMENS)
def test_a_full_session_runs_for_each_specimen_type(finished: dict[str, ScreeningSession], specimen: str) -> None:
    session = finished[specimen]
    summary = session.summary()
    folder = session.session_dir
    assert summary.state == "done"
    assert summary.targets_found >= 1
    assert summary.targets_visited == summary.targets_found
    assert summary.microscope_time_s > 0
    for name in (
        "plan.json",
        "calibration.json",
        "summary.json",
        "targets.csv",
        "targets.json",
        "targets.nav",
        "overview.tif",
        "atlas/atlas.tif",
        "atlas/heatmap.png",
        "atlas/clusters.json",
    ):
        assert (folder / name).exists(), name
    states = [e["state"] for e in read_journal(folder / "journal.jsonl") if e["type"] == "transition"]
    assert states[:6] == ["calibrating", "mapping", "locating", "labelling", "targeting", "moving"]
    assert states[-1] == "done"
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["targets_found"] == summary.targets_found and "precision" in saved
    rows = json.loads((folder / "targets.json").read_text())["targets"]
    assert len(rows) == summary.targets_found and all(r["outcome"] != "pending" for r in rows)
    for result in session.results.values():
        for path in result.images.values():
            assert (folder / path).exists()
    # what a user counts: diffracting = snapshot passed min_spots; where the microscope time went
    diffracting = [r for r in session.results.values() if r.n_spots >= session.plan.confirm.min_spots and r.confirmed]
    assert summary.diffracting_crystals == len(diffracting) == summary.targets_recorded
    if diffracting:
        assert summary.diffracting_per_hour == round(3600 * len(diffracting) / summary.microscope_time_s, 2)
    assert summary.fixed_time_s["calibrating"] > 0 and summary.fixed_time_s["mapping"] > 0
    accounted_s = sum(summary.fixed_time_s.values()) + summary.per_target_time_s * summary.targets_visited
    assert abs(accounted_s - summary.microscope_time_s) < 0.05 * summary.microscope_time_s


def _nearest_object_um(truth: Any, x_um: float, y_um: float) -> float:
    """Distance (um) from a point to the nearest crystal outline, ice ball or debris particle (0 inside)."""
    if truth.crystal_id_xy(np.array([x_um]), np.array([y_um]), 0.0)[0] >= 0:
        return 0.0
    distances = [np.inf]
    for blobs in (truth.ice, truth.debris):
        if len(blobs["x_um"]):
            centre = np.hypot(blobs["x_um"] - x_um, blobs["y_um"] - y_um) - blobs["radius_um"]
            distances.append(float(np.maximum(centre, 0.0).min()))
    for tolerance in (0.5, 1.0, 2.0, 4.0):
        if truth.crystal_id_xy(np.array([x_um]), np.array([y_um]), tolerance)[0] >= 0:
            distances.append(tolerance)
            break
    return min(distances)


def test_confirmed_targets_are_recentred_onto_real_objects(finished: dict[str, ScreeningSession]) -> None:
    """The loop's own job: what it confirms at search exists (a crystal, or ice/debris that the atlas
    clustering took for one) and the stage ends up on it. Which objects are crystals is the locator's and
    the labelling's job (measured by `crystal-locator evaluate`)."""
    confirmed = 0
    for session in finished.values():
        truth = session.microscope.ground_truth  # type: ignore[attr-defined]
        for result in session.results.values():
            if result.confirmed:
                confirmed += 1
                # within ~ the diffraction beam's radius at search (1.5 um) plus stage repeat error: a
                # cluster of touching crystals is re-centred on its centroid, which may fall between them
                assert _nearest_object_um(truth, result.x_um, result.y_um) <= 2.0, result
    assert confirmed >= 3
    on_crystals = [s.summary().precision for s in finished.values() if s.summary().precision is not None]
    assert max(on_crystals) > 0


def test_calibrated_matrices_match_the_simulators_true_ones(finished: dict[str, ScreeningSession]) -> None:
    # The simulator's stage repeats to ~0.15 um, which is several pixels at `search` on a 512 px camera.
    tolerance = {"overview": 0.01, "atlas": 0.01, "search": 0.03}
    for session in finished.values():
        for preset, limit in tolerance.items():
            measured = session.calibration.matrix(preset)
            truth = session.microscope.true_image_to_stage_matrix(preset)  # type: ignore[attr-defined]
            error = np.abs(measured - truth).max() / np.abs(truth).max()
            assert error < limit, (preset, measured, truth)


def test_the_same_seed_reproduces_the_targets(
    finished: dict[str, ScreeningSession], new_session: NewSession, tmp_path: Path
) -> None:
    first = finished["asbestos-fibres"]
    second = new_session(tmp_path / "again", "asbestos-fibres")
    second.run()
    assert [(t.target_id, round(t.x_um, 3), round(t.y_um, 3)) for t in first.targets] == [
        (t.target_id, round(t.x_um, 3), round(t.y_um, 3)) for t in second.targets
    ]
    assert {k: v.outcome for k, v in first.results.items()} == {k: v.outcome for k, v in second.results.items()}


def test_injected_faults_are_recovered_without_losing_results(
    finished: dict[str, ScreeningSession], new_session: NewSession, tmp_path: Path
) -> None:
    counts = finished["protein-plates"].counts_at_first_target  # type: ignore[attr-defined]
    faults = FaultPlan(
        fail_move_numbers=frozenset({counts["move"] + 1, counts["move"] + 2}),  # the first target's move, twice
        timeout_acquire_numbers=frozenset({counts["acquire"] + 2}),
        timeout_diffraction_numbers=frozenset({counts["diffraction"] + 1}),
    )
    session = new_session(tmp_path / "faulty", "protein-plates", faults=faults)
    summary = session.run()
    assert summary.state == "done"
    assert summary.faults == 4
    entries = read_journal(session.session_dir / "journal.jsonl")
    assert sum(1 for e in entries if e["type"] == "fault") == 4
    assert any(e["type"] == "recovery" and e["action"] == "retry" for e in entries)
    assert summary.targets_visited == summary.targets_found
    assert [t.target_id for t in session.targets] == [t.target_id for t in finished["protein-plates"].targets]


def test_too_many_faults_end_in_failed_with_the_summary_written(new_session: NewSession, tmp_path: Path) -> None:
    session = new_session(tmp_path / "broken", "protein-plates", faults=FaultPlan(move_failure_rate=1.0))
    summary = session.run()
    assert summary.state == "failed"
    assert json.loads((session.session_dir / "summary.json").read_text())["state"] == "failed"


def test_pause_resume_and_abort_from_another_thread(new_session: NewSession, tmp_path: Path) -> None:
    session = new_session(tmp_path / "controlled", "graphite-flakes", seed=4, checked=True)
    seen: list[str] = []
    paused = threading.Event()

    def on_event(topic: str, event: dict) -> None:
        if topic == "state":
            seen.append(event["state"])
            if event["state"] == "locating" and "paused" not in seen:
                session.request_pause()
            if event["state"] == "paused":
                paused.set()

    session.events.subscribe(on_event)
    runner = threading.Thread(target=session.run)
    runner.start()
    try:
        assert paused.wait(120)
        time.sleep(0.2)
        assert session.state == "paused"
        session.request_resume()
        deadline = time.monotonic() + 120
        while session.state not in ("moving", "zooming", "confirming", "done") and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        session.request_abort()
        runner.join(120)
    assert not runner.is_alive()
    assert seen[seen.index("paused") + 1] == "locating"
    assert session.state in ("aborted", "done")
    assert json.loads((session.session_dir / "summary.json").read_text())["state"] == session.state


def test_a_folder_that_is_not_a_session_cannot_be_resumed(
    simulated_microscope: Callable[..., SimulatedMicroscope], tmp_path: Path
) -> None:
    from agent.session.screening import SessionError

    microscope = simulated_microscope("protein-plates", seed=0, camera_px=64)
    with pytest.raises(SessionError, match="not a screening session"):
        ScreeningSession.resume(microscope, tmp_path)


def test_a_session_runs_on_real_style_dataset_tiles(
    simulated_microscope: Callable[..., SimulatedMicroscope], tmp_path: Path
) -> None:
    """8-bit tiles with a burned-in data bar, hot pixels and a seam that does not stitch cleanly."""
    import tifffile

    source = simulated_microscope("graphite-flakes", seed=5, camera_px=768)
    source.set_preset("atlas")
    image = np.asarray(source.acquire(0.5).image, dtype=np.float64)
    image8 = (np.clip(image / np.percentile(image, 99.9), 0, 1) * 255).astype(np.uint8)
    image8[-30:, :200] = 0  # data bar
    rng = np.random.default_rng(0)
    image8[rng.integers(0, 768, 40), rng.integers(0, 768, 40)] = 255  # hot pixels
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for r in range(2):
        for c in range(2):
            tile = image8[r * 384 : (r + 1) * 384, c * 384 : (c + 1) * 384]
            if (r, c) == (1, 1):
                tile = np.roll(tile, 3, axis=1)  # a seam that does not stitch cleanly
            tifffile.imwrite(tiles / f"Tile_{r + 1:03d}-{c + 1:03d}.tif", tile)
    microscope = create_simulated_microscope(tiles=tiles, pixel_size_um=0.3, camera_shape_px=(384, 384))
    assert microscope.ground_truth is None
    session = ScreeningSession(microscope, _plan("graphite-flakes", max_targets=3), tmp_path / "tiles-session",
                               stored_calibration=true_calibration(microscope))
    summary = session.run()
    assert summary.state == "done"
    assert summary.targets_found >= 1 and summary.targets_confirmed >= 1
    assert summary.precision is None  # no ground truth for real tiles


@pytest.fixture(scope="module")
def asked(
    tmp_path_factory: pytest.TempPathFactory, simulated_microscope: Callable[..., SimulatedMicroscope]
) -> tuple[ScreeningSession, Any, Any]:
    """A protein session (seed 7) whose prompt the simulated operator answered: (session, summary, memory)."""
    from agent.prompts.channel import OperatorChannel
    from agent.prompts.memory import LabelMemory
    from agent.prompts.simulated import PolicyOperator
    from simulator.operator import SimulatedAnswerPolicy

    folder = tmp_path_factory.mktemp("asked")
    memory = LabelMemory(folder / "labels")
    with OperatorChannel("tcp://127.0.0.1:0") as channel:
        microscope = simulated_microscope("protein-plates", seed=7, camera_px=CAMERA_PX)
        with PolicyOperator(channel.prompt_endpoint, SimulatedAnswerPolicy(microscope.ground_truth)) as operator:
            session = ScreeningSession(
                microscope, _plan("protein-plates", seed=7), folder / "session", labels=memory, operator=channel,
                stored_calibration=true_calibration(microscope),
            )
            summary = session.run()
        assert operator.answered
    return session, summary, memory


def test_prompts_reach_the_simulated_operator_and_fall_back_when_nobody_answers(
    asked: tuple[ScreeningSession, Any, Any],
    simulated_microscope: Callable[..., SimulatedMicroscope],
    label_memory: LabelMemory,
    operator_channel: OperatorChannel,
    tmp_path: Path,
) -> None:
    session, summary, memory = asked
    assert summary.state == "done" and summary.prompts == 1
    assert session.decision is not None and session.decision.answered_by == "simulated"
    assert set(session.decision.sources.values()) <= {"operator", "label-memory"}
    # answers given in a session on a simulated microscope are stored as simulated, never as a person's
    assert any(r.source == "simulated" for r in memory.list_records())
    assert not any(r.source == "operator" for r in memory.list_records())
    # the answer is spread to the answered clusters' objects (crystal / not crystal), with their features,
    # beside one outcome per visited target
    objects = memory.object_records()
    answers = [r for r in objects if not r.is_outcome]
    labels = {r.label for r in answers}
    assert answers and labels <= {"crystal", "not-crystal"} and "crystal" in labels
    assert all(r.source == "simulated" and r.session == session.session_id for r in objects)
    visited = [r for r in session.results.values() if r.outcome in ("recorded", "no-diffraction", "rejected")]
    assert len([r for r in objects if r.is_outcome]) == len(visited)

    plan = _plan("polymer-faint", seed=8).model_copy(
        update={"operator": ScreeningPlan().operator.model_copy(update={"wait_s": 0.5, "fallback": "default-rule"})}
    )
    microscope = simulated_microscope("polymer-faint", seed=8, camera_px=CAMERA_PX)
    # nobody is connected to the operator channel: the loop must go on
    session = ScreeningSession(
        microscope, plan, tmp_path / "unanswered", labels=label_memory, operator=operator_channel,
        stored_calibration=true_calibration(microscope),
    )
    summary = session.run()
    assert summary.state == "done" and summary.prompts == 1
    assert session.decision is not None and session.decision.answered_by is None
    assert any("not answered" in note for note in session.decision.notes)
    assert all(source.startswith(("fallback:", "label-memory")) for source in session.decision.sources.values())


def test_clusters_answered_both_ways_are_not_asked_again_and_their_targets_are_still_visited(
    asked: tuple[ScreeningSession, Any, Any],
    simulated_microscope: Callable[..., SimulatedMicroscope],
    label_memory: LabelMemory,
    operator_channel: OperatorChannel,
    tmp_path: Path,
) -> None:
    """The same atlas seen in three earlier sessions, its crystal clusters answered "crystal" in two and
    "not crystal" in the third: with nobody to answer now, the loop asks nothing and draws its targets from
    those mixed clusters, marked as such, and visits them (the order of sure before mixed targets is
    tested on `plan_tiered_path`)."""
    first, _, answered = asked
    assert first.decision is not None and first.decision.crystal_clusters, "the operator chose no crystal cluster"
    records = [r for r in answered.list_records() if r.source == "simulated"]  # the simulated operator's answers
    for session_id in ("s1", "s2", "s3"):
        label_memory.record_clusters(
            np.array([r.feature_vector for r in records]),
            records[0].feature_names,
            [r.is_crystal and session_id != "s3" for r in records],
            specimen="protein-plates",
            preset=records[0].preset,
            session=session_id,
            cluster_ids=[r.cluster_id for r in records],
        )
    plan = _plan("protein-plates", seed=7).model_copy(
        update={"operator": ScreeningPlan().operator.model_copy(update={"wait_s": 0.5})}
    )
    microscope = simulated_microscope("protein-plates", seed=7, camera_px=CAMERA_PX)
    # nobody is connected to the operator channel
    session = ScreeningSession(microscope, plan, tmp_path / "mixed", labels=label_memory, operator=operator_channel,
                               stored_calibration=true_calibration(microscope))
    summary = session.run()
    assert summary.state == "done" and summary.prompts == 0
    decision = session.decision
    assert decision is not None and not decision.asked and decision.crystal_clusters == ()
    assert decision.mixed_clusters == first.decision.crystal_clusters
    assert session.targets and all(t.from_mixed_cluster for t in session.targets)
    assert {t.cluster_id for t in session.targets} <= set(decision.mixed_clusters)
    same_place = [(round(t.x_um, 3), round(t.y_um, 3)) for t in session.targets]
    assert sorted(same_place) == sorted((round(t.x_um, 3), round(t.y_um, 3)) for t in first.targets)  # same atlas
    assert summary.targets_visited == len(session.targets) and set(session.results) == {
        t.target_id for t in session.targets
    }
    table = (tmp_path / "mixed" / "targets.csv").read_text().splitlines()
    assert "from_mixed_cluster" in table[0].split(",") and all(",True," in row for row in table[1:])
    clusters = json.loads((tmp_path / "mixed" / "atlas" / "clusters.json").read_text())
    assert {c["cluster_id"] for c in clusters["clusters"] if c["mixed"]} == set(decision.mixed_clusters)


def test_mixed_targets_fill_only_the_places_left_and_keep_away_from_sure_targets() -> None:
    from agent.steps.target import fill_target_places

    sure = [("s1", 0.0, 0.0), ("s2", 50.0, 0.0), ("s3", 100.0, 0.0)]
    mixed = [("m-near-s1", 2.0, 1.0), ("m1", 0.0, 50.0), ("m2", 50.0, 50.0), ("m3", 100.0, 50.0)]
    kept_sure, kept_mixed = fill_target_places(sure, mixed, max_targets=5, min_spacing_um=4.0)
    assert [c for c, _, _ in kept_sure] == ["s1", "s2", "s3"]
    assert [c for c, _, _ in kept_mixed] == ["m1", "m2"]  # the locator's order, the one near s1 skipped
    assert fill_target_places(sure, mixed, max_targets=2, min_spacing_um=4.0) == (sure[:2], [])
    assert fill_target_places([], mixed, max_targets=2, min_spacing_um=4.0) == ([], mixed[:2])


def test_a_session_runs_through_the_zeromq_bridge(
    simulated_microscope: Callable[..., SimulatedMicroscope], finished: dict[str, ScreeningSession], tmp_path: Path
) -> None:
    """The agent cannot tell a remote microscope from a local one: the same loop, over real sockets. (It is
    compared with the finished local session of the same specimen and seed: that a second local run plans the
    same is `test_the_same_seed_reproduces_the_targets`.)"""
    from drivers.zmq_bridge import BridgeClient, BridgeServer

    simulated = simulated_microscope("asbestos-fibres", seed=0, camera_px=CAMERA_PX)
    with BridgeServer(simulated, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint) as client:
        session = ScreeningSession(client, _plan("asbestos-fibres"), tmp_path / "bridged")
        summary = session.run()
    assert summary.state == "done" and summary.faults == 0
    assert summary.targets_found >= 1 and summary.targets_visited == summary.targets_found
    # the remote session planned what a local one plans on the same specimen and seed
    local = finished["asbestos-fibres"]
    assert [(t.target_id, round(t.x_um, 3)) for t in session.targets] == [
        (t.target_id, round(t.x_um, 3)) for t in local.targets
    ]


def test_targets_that_recentre_onto_an_object_already_measured_are_not_measured_again(
    simulated_microscope: Callable[..., SimulatedMicroscope], tmp_path: Path
) -> None:
    """Large flakes and blobs give several atlas targets (pieces of one object) that all re-centre onto the
    same object at the search preset; it is confirmed and diffracted once, the others are rejected. (Since
    objects are split only at necks, few grids still give such targets: seed 3's flakes do.)"""
    microscope = simulated_microscope("graphite-flakes", seed=3, camera_px=CAMERA_PX)
    plan = ScreeningPlan(
        specimen="graphite-flakes", seed=3, area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=12)
    )
    session = ScreeningSession(microscope, plan, tmp_path / "session", stored_calibration=true_calibration(microscope))
    session.run()
    results = list(session.results.values())
    confirmed = [r for r in results if r.confirmed]
    spacing_um = plan.targeting.min_spacing_um
    for i, a in enumerate(confirmed):
        for b in confirmed[i + 1 :]:
            assert np.hypot(a.x_um - b.x_um, a.y_um - b.y_um) >= spacing_um, (a.target_id, b.target_id)
    duplicates = [r for r in results if r.outcome == "rejected" and "same object" in r.reason]
    assert duplicates, "this grid has flakes that give several targets each"
    planned = {t.target_id: t for t in session.targets}
    for duplicate in duplicates:
        earlier = session.results[duplicate.reason.split("same object as ")[1].split()[0]]
        distance_um = np.hypot(earlier.x_um - duplicate.x_um, earlier.y_um - duplicate.y_um)
        if "on the atlas" in duplicate.reason:  # rejected before any move: within the earlier object's size
            area_px = np.exp(planned[earlier.target_id].features["log_area_px"])
            radius_um = np.sqrt(area_px / np.pi) * session.atlas.pixel_size_um
            assert earlier.snapped and distance_um < max(spacing_um, radius_um)
            assert "search" not in duplicate.images
        else:  # re-centred onto it at the search preset
            assert earlier.confirmed and distance_um < spacing_um
        assert "diffraction" not in duplicate.images  # not measured again
