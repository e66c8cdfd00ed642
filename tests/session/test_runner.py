"""The runner carries out the error table: skip, retry then skip, pause until the microscope answers, fail.

The runner is the real one; the engine is a scripted `StepEngine` (the protocol the screening session
implements) whose steps raise the errors a test plans, so every branch of the table runs in milliseconds.
End-to-end sessions with injected faults on the real simulator are in `test_screening.py`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from agent.session.policy import Action, decide
from agent.session.records import ControlApplied, FaultRaised, Record, RecoveryTaken, Transition
from agent.session.runner import Runner
from agent.steps.stage_calibration import CalibrationError
from drivers.base import AcquisitionTimeout, BridgeTimeout, MicroscopeError, ProtocolMismatchError, StageLimitError

FORWARD = {
    "calibrating": "calibrated",
    "mapping": "mapped",
    "locating": "located",
    "labelling": "labelled",
    "moving": "arrived",
    "zooming": "zoomed",
    "confirming": "confirmed",
    "diffraction": "diffracted",
}


class ScriptedEngine:
    """Steps that succeed unless `errors[(state, target_id)]` still holds an error to raise."""

    def __init__(self, n_targets: int = 3) -> None:
        self.targets = [f"T{i + 1:03d}" for i in range(n_targets)]
        self.finished: dict[str, str] = {}
        self.current: str | None = None
        self.errors: dict[tuple[str, str | None], list[BaseException]] = defaultdict(list)
        self.calls: list[tuple[str, str | None]] = []
        self.retried: list[str] = []
        self.microscope_answers = True
        self.probes = 0

    def run_step(self, state: str) -> str:
        self.calls.append((state, self.current))
        queue = self.errors[(state, self.current)]
        if queue:
            raise queue.pop(0)
        if state == "targeting":
            return self.advance()
        if state == "recording":
            assert self.current is not None
            self.finished[self.current] = "recorded"
            return self.advance()
        return FORWARD[state]

    def current_target_id(self) -> str | None:
        return self.current

    def before_retry(self, state: str) -> None:
        self.retried.append(state)

    def skip_target(self, state: str, reason: str) -> None:
        assert self.current is not None
        self.finished[self.current] = f"failed in {state}: {reason}"

    def advance(self) -> str:
        self.current = next((t for t in self.targets if t not in self.finished), None)
        return "next_target" if self.current else "finish"

    def probe(self) -> bool:
        self.probes += 1
        return self.microscope_answers


def _runner(engine: ScriptedEngine, max_retries: int = 2, max_faults: int = 10) -> tuple[Runner, list[Record]]:
    records: list[Record] = []
    runner = Runner(engine, records.append, max_retries=max_retries, max_faults=max_faults, probe_interval_s=0.05)
    return runner, records


def _run_until_paused(runner: Runner, timeout_s: float = 10.0) -> threading.Thread:
    """Start `runner.run()` in a thread and return it once the runner is paused (asserted)."""
    thread = threading.Thread(target=runner.run)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while runner.state != "paused" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.state == "paused"
    return thread


def _of(records: list[Record], kind: type[Record]) -> list[Record]:
    return [r for r in records if isinstance(r, kind)]


def test_a_clean_run_visits_every_target_once() -> None:
    engine = ScriptedEngine()
    runner, records = _runner(engine)
    runner.run()
    assert runner.state == "done" and engine.finished == dict.fromkeys(engine.targets, "recorded")
    states = [r.state for r in _of(records, Transition)]
    assert states[:6] == ["calibrating", "mapping", "locating", "labelling", "targeting", "moving"]
    assert states.count("moving") == 3 and states[-1] == "done"


def test_a_stage_limit_skips_the_target_without_a_retry() -> None:
    engine = ScriptedEngine()
    engine.errors[("moving", "T002")].append(StageLimitError("x = 2100 um is outside [-1000, 1000] um"))
    runner, records = _runner(engine)
    runner.run()
    assert runner.state == "done"
    assert engine.finished["T002"].startswith("failed in moving: StageLimitError")
    assert engine.calls.count(("moving", "T002")) == 1  # never tried again
    assert engine.finished["T001"] == engine.finished["T003"] == "recorded"
    (fault,) = _of(records, FaultRaised)
    assert fault.action == "skip_target" and fault.target_id == "T002" and fault.traceback is None
    assert [r.action for r in _of(records, RecoveryTaken)] == ["skip_target"]


def test_a_timeout_is_retried_from_the_move_then_the_target_is_skipped() -> None:
    engine = ScriptedEngine()
    engine.errors[("diffraction", "T001")].extend(AcquisitionTimeout("camera timed out") for _ in range(3))
    runner, records = _runner(engine, max_retries=2)
    runner.run()
    assert runner.state == "done"
    # two retries, each from the move (a target's images belong together), then the skip
    assert engine.calls.count(("moving", "T001")) == 3 and engine.calls.count(("diffraction", "T001")) == 3
    assert [r.action for r in _of(records, RecoveryTaken)] == ["retry", "retry", "skip_target"]
    assert [r.state for r in _of(records, RecoveryTaken)][:2] == ["moving", "moving"]
    assert engine.finished["T001"].startswith("failed in diffraction: AcquisitionTimeout")
    assert engine.finished["T002"] == "recorded"


def test_a_timeout_that_clears_keeps_the_target() -> None:
    engine = ScriptedEngine(n_targets=1)
    engine.errors[("zooming", "T001")].append(AcquisitionTimeout("camera timed out"))
    runner, _records = _runner(engine)
    runner.run()
    assert engine.finished == {"T001": "recorded"}


def test_a_failed_calibration_is_measured_again_then_the_session_fails() -> None:
    engine = ScriptedEngine()
    engine.errors[("calibrating", None)].extend(CalibrationError("no structure") for _ in range(2))
    runner, records = _runner(engine, max_retries=2)
    runner.run()
    assert runner.state == "done" and engine.retried == ["calibrating", "calibrating"]
    assert [f.action for f in _of(records, FaultRaised)] == ["recalibrate", "recalibrate"]

    engine = ScriptedEngine()
    engine.errors[("calibrating", None)].extend(CalibrationError("no structure") for _ in range(3))
    runner, records = _runner(engine, max_retries=2)
    runner.run()
    assert runner.state == "failed" and engine.finished == {}
    assert _of(records, RecoveryTaken)[-1].action == "give_up"


def test_a_lost_bridge_pauses_until_the_microscope_answers_and_then_carries_on() -> None:
    engine = ScriptedEngine()
    engine.errors[("zooming", "T002")].append(BridgeTimeout("tcp://127.0.0.1:5555 did not answer acquire"))
    engine.microscope_answers = False
    runner, records = _runner(engine)
    thread = _run_until_paused(runner)
    deadline = time.monotonic() + 10
    while engine.probes < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.state == "paused"  # still gone: stays paused, probing
    engine.microscope_answers = True  # the bridge is back
    thread.join(timeout=10)
    assert not thread.is_alive() and runner.state == "done"
    assert engine.finished == dict.fromkeys(engine.targets, "recorded")  # T002 visited again from the move
    pause, resume = _of(records, ControlApplied)
    assert pause.command == "pause" and pause.resume_to == "moving" and "BridgeTimeout" in (pause.reason or "")
    assert resume.command == "resume"


def test_an_operator_can_resume_or_abort_a_session_paused_for_a_lost_bridge() -> None:
    engine = ScriptedEngine()
    engine.errors[("mapping", None)].append(BridgeTimeout("gone"))
    engine.microscope_answers = False
    runner, _records = _runner(engine)
    thread = _run_until_paused(runner)
    runner.request_abort()
    thread.join(timeout=10)
    assert runner.state == "aborted" and engine.finished == {}


def test_an_unexpected_error_fails_the_session_with_its_traceback_in_the_journal() -> None:
    engine = ScriptedEngine()
    engine.errors[("confirming", "T001")].append(ZeroDivisionError("division by zero"))
    runner, records = _runner(engine)
    runner.run()
    assert runner.state == "failed" and engine.calls.count(("confirming", "T001")) == 1
    (fault,) = _of(records, FaultRaised)
    assert fault.action == "fail" and "ZeroDivisionError" in (fault.traceback or "")
    assert "unexpected error in confirming" in (_of(records, RecoveryTaken)[-1].reason or "")


def test_too_many_faults_fail_the_session_whatever_the_table_says() -> None:
    engine = ScriptedEngine(n_targets=5)
    for target in engine.targets:
        engine.errors[("moving", target)].append(StageLimitError("out of range"))
    runner, records = _runner(engine, max_faults=2)
    runner.run()
    assert runner.state == "failed" and len(engine.finished) == 2
    assert _of(records, RecoveryTaken)[-1].reason == "3 faults > 2"


@pytest.mark.parametrize(
    ("error", "in_target", "attempts", "action"),
    [
        (StageLimitError("x"), True, 1, Action.SKIP_TARGET),
        (StageLimitError("x"), False, 1, Action.RETRY),
        (MicroscopeError("x"), True, 2, Action.RETRY),
        (MicroscopeError("x"), True, 3, Action.SKIP_TARGET),
        (MicroscopeError("x"), False, 3, Action.FAIL),
        (TimeoutError("x"), True, 1, Action.RETRY),
        (BridgeTimeout("x"), True, 9, Action.PAUSE),
        (ProtocolMismatchError("x"), False, 1, Action.FAIL),
        (CalibrationError("x"), False, 1, Action.RECALIBRATE),
        (KeyError("x"), True, 1, Action.FAIL),
    ],
)
def test_the_error_table(error: BaseException, in_target: bool, attempts: int, action: Action) -> None:
    assert decide(error, in_target=in_target, attempts=attempts, max_retries=2) is action


def test_an_operator_resume_while_paused_for_a_lost_bridge_runs_the_failed_step_again() -> None:
    engine = ScriptedEngine(n_targets=1)
    engine.errors[("mapping", None)].append(BridgeTimeout("gone"))
    engine.microscope_answers = False
    runner, records = _runner(engine)
    thread = _run_until_paused(runner)
    runner.request_resume()  # the operator knows better than the probe
    thread.join(timeout=10)
    assert runner.state == "done" and engine.calls.count(("mapping", None)) == 2
    assert [r.command for r in _of(records, ControlApplied)] == ["pause", "resume"]


def test_an_error_outside_any_step_fails_the_session_and_is_journalled() -> None:
    engine = ScriptedEngine()
    records: list[Record] = []

    def emit(record: Record) -> None:
        if isinstance(record, Transition) and record.state == "zooming":
            raise OSError("No space left on device")
        records.append(record)

    runner = Runner(engine, emit, max_retries=2, max_faults=10)
    runner.run()
    assert runner.state == "failed"
    (fault,) = _of(records, FaultRaised)
    assert fault.error == "OSError" and fault.action == "fail" and "No space left" in (fault.traceback or "")
    assert _of(records, Transition)[-1].state == "failed"
