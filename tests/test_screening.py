"""The screening loop end to end on the real simulator: sessions, calibration, resume, faults, control."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.journal import read_journal
from agent.screening import ScreeningSession
from simulator import create_simulated_microscope
from simulator.scoring import score_session

CAMERA_PX = 512


def _plan(specimen: str, seed: int = 0, max_targets: int = 4, **updates: object) -> ScreeningPlan:
    return ScreeningPlan(
        specimen=specimen,
        seed=seed,
        area=AreaPlan(squares=1),
        targeting=TargetingPlan(max_targets=max_targets),
        **updates,  # type: ignore[arg-type]
    )


def _session(tmp_path: Path, specimen: str, seed: int = 0, **kwargs: object) -> ScreeningSession:
    microscope = create_simulated_microscope(specimen_type=specimen, seed=seed, camera_shape_px=(CAMERA_PX, CAMERA_PX))
    truth = microscope.ground_truth
    return ScreeningSession(
        microscope,
        _plan(specimen, seed),
        tmp_path / f"{specimen}-{seed}",
        truth_scorer=lambda targets, results, box: score_session(truth, list(results.values()), box),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("specimen", ["protein-plates", "graphite-flakes", "asbestos-fibres", "polymer-faint"])
def test_a_full_session_runs_for_each_specimen_type(tmp_path: Path, specimen: str) -> None:
    session = _session(tmp_path, specimen)
    summary = session.run()
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


def test_confirmed_targets_lie_on_true_crystals(tmp_path: Path) -> None:
    session = _session(tmp_path, "protein-plates", seed=3)
    summary = session.run()
    assert summary.targets_confirmed >= 1
    assert summary.precision is not None and summary.precision >= 0.5


def test_calibrated_matrices_match_the_simulators_true_ones(tmp_path: Path) -> None:
    session = _session(tmp_path, "graphite-flakes", seed=1)
    session.run()
    microscope = session.microscope
    for preset in ("overview", "atlas", "search"):
        measured = session.calibration.matrix(preset)
        truth = microscope.true_image_to_stage_matrix(preset)  # type: ignore[attr-defined]
        error = np.abs(measured - truth).max() / np.abs(truth).max()
        assert error < 0.02, (preset, measured, truth)


def test_the_same_seed_reproduces_the_targets(tmp_path: Path) -> None:
    first = _session(tmp_path / "a", "asbestos-fibres", seed=5)
    first.run()
    second = _session(tmp_path / "b", "asbestos-fibres", seed=5)
    second.run()
    assert [(t.target_id, round(t.x_um, 3), round(t.y_um, 3)) for t in first.targets] == [
        (t.target_id, round(t.x_um, 3), round(t.y_um, 3)) for t in second.targets
    ]
    assert {k: v.outcome for k, v in first.results.items()} == {k: v.outcome for k, v in second.results.items()}


def _screen_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent.cli",
        "screen",
        "--simulated",
        "--specimen",
        "protein-plates",
        "--seed",
        "2",
        "--camera-px",
        str(CAMERA_PX),
        "--max-targets",
        "4",
        "--no-labels",
        "--out",
        str(out),
        *extra,
    ]


def test_kill_and_resume_gives_the_same_targets_as_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_screen_command(reference), check=True, capture_output=True, timeout=240)
    expected = json.loads((reference / "targets.json").read_text())["targets"]
    reference_lines = len(read_journal(reference / "journal.jsonl"))
    for fraction in (0.3, 0.75):
        out = tmp_path / f"killed-{fraction}"
        process = subprocess.Popen(_screen_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        kill_at = max(2, int(fraction * reference_lines))
        while time.monotonic() < deadline and process.poll() is None:
            if len(read_journal(out / "journal.jsonl")) >= kill_at:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait(timeout=30)
        written_before = {e["path"] for e in read_journal(out / "journal.jsonl") if e["type"] == "artifact"}
        finished_before = {e["target_id"] for e in read_journal(out / "journal.jsonl") if e["type"] == "target"}
        subprocess.run(
            [sys.executable, "-m", "agent.cli", "screen", "--resume", str(out), "--no-labels"],
            check=True,
            capture_output=True,
            timeout=240,
        )
        got = json.loads((out / "targets.json").read_text())["targets"]
        assert [(r["target_id"], r["planned_x_um"], r["planned_y_um"]) for r in got] == [
            (r["target_id"], r["planned_x_um"], r["planned_y_um"]) for r in expected
        ]
        assert all(r["outcome"] != "pending" for r in got)
        entries = read_journal(out / "journal.jsonl")
        visits = [e["target_id"] for e in entries if e["type"] == "target"]
        assert len(visits) == len(set(visits)), "a finished target was visited twice"
        assert finished_before <= set(visits)
        for path in written_before:
            assert (out / path).exists(), f"lost {path}"


def test_injected_faults_are_recovered_without_losing_results(tmp_path: Path) -> None:
    from simulator.faults import FaultPlan

    faults = FaultPlan(fail_move_numbers=frozenset({30, 31}), timeout_acquire_numbers=frozenset({14}))
    microscope = create_simulated_microscope(
        specimen_type="protein-plates", seed=0, camera_shape_px=(CAMERA_PX, CAMERA_PX), faults=faults
    )
    session = ScreeningSession(microscope, _plan("protein-plates"), tmp_path / "faulty")
    summary = session.run()
    assert summary.state == "done"
    assert summary.faults == 3
    entries = read_journal(session.session_dir / "journal.jsonl")
    assert sum(1 for e in entries if e["type"] == "fault") == 3
    assert any(e["type"] == "recovery" and e["action"] == "retry" for e in entries)
    assert summary.targets_visited == summary.targets_found


def test_too_many_faults_end_in_failed_with_results_kept(tmp_path: Path) -> None:
    from simulator.faults import FaultPlan

    faults = FaultPlan(move_failure_rate=1.0)
    microscope = create_simulated_microscope(
        specimen_type="protein-plates", seed=0, camera_shape_px=(CAMERA_PX, CAMERA_PX), faults=faults
    )
    session = ScreeningSession(microscope, _plan("protein-plates"), tmp_path / "broken")
    summary = session.run()
    assert summary.state == "failed"
    assert (session.session_dir / "summary.json").exists()
    assert json.loads((session.session_dir / "summary.json").read_text())["state"] == "failed"


def test_pause_resume_and_abort_from_another_thread(tmp_path: Path) -> None:
    session = _session(tmp_path, "graphite-flakes", seed=4)
    seen: list[str] = []
    paused = threading.Event()

    def on_event(topic: str, event: dict) -> None:
        if topic == "state":
            seen.append(event["state"])
            if event["state"] == "locating":
                session.request_pause()
            if event["state"] == "paused":
                paused.set()

    session.events.subscribe(on_event)
    runner = threading.Thread(target=session.run)
    runner.start()
    assert paused.wait(60)
    time.sleep(0.2)
    assert session.state == "paused"
    session.request_resume()
    deadline = time.monotonic() + 60
    while session.state not in ("moving", "zooming", "confirming", "done") and time.monotonic() < deadline:
        time.sleep(0.01)
    session.request_abort()
    runner.join(60)
    assert not runner.is_alive()
    assert seen[seen.index("paused") + 1] == "locating"
    assert session.state in ("aborted", "done")
    assert json.loads((session.session_dir / "summary.json").read_text())["state"] == session.state


def test_a_session_folder_that_is_not_one_cannot_be_resumed(tmp_path: Path) -> None:
    from agent.screening import SessionError

    microscope = create_simulated_microscope(specimen_type="protein-plates", seed=0, camera_shape_px=(64, 64))
    with pytest.raises(SessionError, match="not a screening session"):
        ScreeningSession.resume(microscope, tmp_path)


def test_screen_cli_prints_a_summary_and_refuses_to_overwrite(tmp_path: Path) -> None:
    env = {**os.environ, "CRYSTAL_LOCATOR_LABELS": str(tmp_path / "labels")}
    out = tmp_path / "cli"
    result = subprocess.run(_screen_command(out, "--json"), capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["state"] == "done" and summary["targets_found"] >= 1
    again = subprocess.run(_screen_command(out), capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode == 2 and "already holds a session" in again.stderr
