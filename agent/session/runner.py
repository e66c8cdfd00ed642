"""The runner: owns the state machine, pause / resume / abort and what happens on a fault. No instrument.

```
            run()                                  request_pause()          request_resume()
  idle ---start---> [working state] --step--> trigger ...   ---> paused ------------> (same state)
                          |  raises
                          v
                     recovering --(agent.session.policy: retry / skip target / recalibrate / pause / fail)
```

(the full state diagram is in `agent.session.states`). The runner executes one step per state through a
`StepEngine` (the screening session), and between steps honours pause and abort requests, which may come
from any thread (a console, a signal handler, the control socket). Every transition, fault, recovery and
control is emitted as a typed record (`agent.session.records`) to the `emit` callable before the next step
runs; the session routes records to its subscribers (journal first).

A fault's action comes from the error table (`agent.session.policy`): a retry re-enters the failed state (a
target step restarts from `moving`, so a target's images belong together), a skip finishes the target as
`failed`, a pause waits for the operator while probing the microscope (a bridge that answers again resumes
the session by itself), a failure ends the session in `failed` with the error (and, for an error nobody
expected, its traceback) in the journal.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from transitions import Machine

from agent.session.policy import Action, decide, is_expected, rule_for
from agent.session.records import ControlApplied, FaultRaised, Record, RecoveryTaken, Transition
from agent.session.states import FORWARD_TRANSITIONS, STATES, TARGET_STATES, TERMINAL_STATES, WORKING_STATES

logger = logging.getLogger(__name__)

#: How often a session paused for a lost connection asks the microscope whether it answers again, seconds.
PROBE_INTERVAL_S = 5.0


class StepEngine(Protocol):
    """What the runner drives: the steps, which know the instrument; see `agent.session.screening`."""

    def run_step(self, state: str) -> str:
        """Run the step of `state` and return the trigger to fire next; raises on a fault."""

    def current_target_id(self) -> str | None:
        """The id of the target being visited, if any."""

    def before_retry(self, state: str) -> None:
        """Prepare a retry of `state` (calibration takes its next site)."""

    def skip_target(self, state: str, reason: str) -> None:
        """Finish the visited target, whose step `state` failed, as `failed` with `reason`."""

    def advance(self) -> str:
        """Choose the next target: `next_target` or `finish`."""

    def probe(self) -> bool:
        """True if the microscope answers (a cheap read); used while paused for a lost connection."""


@dataclass
class _Fault:
    """The fault being recovered from."""

    state: str
    error: BaseException
    action: Action
    attempt: int

    @property
    def reason(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


class Runner:
    """Drives a `StepEngine` through the screening states (see the module docstring). Thread-safe control."""

    state: str

    def __init__(
        self,
        engine: StepEngine,
        emit: Callable[[Record], None],
        *,
        max_retries: int,
        max_faults: int,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.engine = engine
        self._emit = emit
        self.max_retries = max_retries
        self.max_faults = max_faults
        self.probe_interval_s = probe_interval_s
        self.faults = 0
        self._retries: dict[str, int] = {}
        self._fault: _Fault | None = None
        self._resume_to: str | None = None
        self._pause_requested = threading.Event()
        self._resume_requested = threading.Event()
        self._abort_requested = threading.Event()
        self.machine = Machine(
            model=self,
            states=list(STATES),
            initial="idle",
            auto_transitions=False,
            send_event=False,
            after_state_change="_after_state_change",
        )
        for trigger, source, dest in FORWARD_TRANSITIONS:
            self.machine.add_transition(trigger, source, dest)
        for state in [*WORKING_STATES, "recovering"]:
            self.machine.add_transition("unpause", "paused", state, conditions=lambda s=state: self._resume_to == s)
            if state != "recovering":
                self.machine.add_transition(
                    "retry", "recovering", state, conditions=lambda s=state: self._resume_to == s
                )

    # control, from any thread ----------------------------------------------------------------------
    def request_pause(self) -> None:
        """Pause at the next step boundary (the current stage move or exposure completes first)."""
        self._resume_requested.clear()
        self._pause_requested.set()

    def request_resume(self) -> None:
        """Continue a paused session."""
        self._pause_requested.clear()
        self._resume_requested.set()

    def request_abort(self) -> None:
        """Stop at the next step boundary; results so far are kept and the session can be resumed."""
        self._abort_requested.set()
        self._resume_requested.set()

    # the loop ---------------------------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        """Enter `state` without a transition (a resumed session), announcing it like a transition."""
        self.machine.set_state(state)
        self._after_state_change()

    def run(self) -> None:
        """Run steps until a terminal state (done, aborted, failed)."""
        if self.state == "idle":
            self.trigger("start")
        while self.state not in TERMINAL_STATES:
            try:
                self._one_iteration()
            except Exception as exc:  # outside a step (a transition's record, a recovery, a probe): fail cleanly
                self._fail_outside_step(exc)

    def _one_iteration(self) -> None:
        """Honour abort and pause, then run the current state's step (or recovery) and fire its trigger."""
        if self._abort_requested.is_set():
            self.trigger("abort")
            return
        if self._pause_requested.is_set():
            self._wait_paused()
            return
        state = self.state
        if state == "recovering":
            trigger = self._recover()
            if trigger is not None:
                self.trigger(trigger)
            return
        try:
            trigger = self.engine.run_step(state)
        except Exception as exc:  # the error table decides; nothing is retried blindly
            self._on_fault(state, exc)
            return
        self.trigger(trigger)

    def _fail_outside_step(self, exc: Exception) -> None:
        """An error outside any step (writing a record, a transition, a recovery): the session fails, with the
        traceback journalled if the journal still takes it."""
        state = self.state
        logger.error("unexpected error in the runner in state %s; the session fails", state, exc_info=exc)
        self.faults += 1
        try:
            fault = FaultRaised(
                state=state,
                error=type(exc).__name__,
                message=str(exc),
                action=Action.FAIL.value,
                traceback="".join(traceback.format_exception(exc)),
            )
            self._emit(fault)
        except Exception:
            logger.exception("the fault could not be journalled either")
        self.machine.set_state("failed")
        try:
            self._after_state_change()
        except Exception:
            logger.exception("the transition to failed could not be journalled")

    def _after_state_change(self) -> None:
        self._emit(Transition(state=self.state))

    def _wait_paused(self, resume_to: str | None = None, reason: str | None = None) -> None:
        """Stay paused until resumed or aborted, then continue in `resume_to` (default: the paused state).
        With a `reason` (a lost connection) the microscope is probed and the session resumes by itself when it
        answers."""
        self._resume_to = resume_to or self.state
        self.trigger("pause")
        self._emit(ControlApplied(command="pause", resume_to=self._resume_to, reason=reason))
        next_probe_s = time.monotonic() + self.probe_interval_s
        while not self._resume_requested.wait(0.1):
            if reason is not None and time.monotonic() >= next_probe_s:
                next_probe_s = time.monotonic() + self.probe_interval_s
                if self.engine.probe():
                    logger.warning("the microscope answers again; resuming")
                    self.request_resume()
        self._resume_requested.clear()
        if self._abort_requested.is_set():
            return
        self._pause_requested.clear()
        self._emit(ControlApplied(command="resume"))
        self.trigger("unpause")
        self._resume_to = None

    # faults -----------------------------------------------------------------------------------------
    def _on_fault(self, state: str, exc: Exception) -> None:
        self.faults += 1
        target_id = self.engine.current_target_id() if state in TARGET_STATES else None
        key = f"{state}:{target_id}" if target_id else state
        rule = rule_for(exc)
        if rule is None or rule.bounded:  # a pause for a lost connection does not use up the retries
            self._retries[key] = self._retries.get(key, 0) + 1
        attempt = max(1, self._retries.get(key, 0))
        action = decide(exc, in_target=state in TARGET_STATES, attempts=attempt, max_retries=self.max_retries)
        expected = is_expected(exc)
        if expected:
            logger.warning("fault in %s: %s: %s -> %s", state, type(exc).__name__, exc, action.value)
        else:
            logger.error("unexpected error in %s; the session fails", state, exc_info=exc)
        self._emit(
            FaultRaised(
                state=state,
                error=type(exc).__name__,
                message=str(exc),
                target_id=target_id,
                action=action.value,
                traceback=None if expected else "".join(traceback.format_exception(exc)),
            )
        )
        self._fault = _Fault(state=state, error=exc, action=action, attempt=attempt)
        self.trigger("fault")

    def _recover(self) -> str | None:
        """Carry out the fault's action; returns the trigger that leaves `recovering` (None: pause first)."""
        fault = self._fault
        if fault is None:  # nothing to recover from: a bug of the runner, not of the microscope
            self._emit(RecoveryTaken(action="give_up", reason="recovering without a fault"))
            return "give_up"
        self._fault = None
        if self.faults > self.max_faults:
            self._emit(RecoveryTaken(action="give_up", reason=f"{self.faults} faults > {self.max_faults}"))
            return "give_up"
        state = fault.state
        in_target = state in TARGET_STATES
        if fault.action in (Action.RETRY, Action.RECALIBRATE, Action.PAUSE):
            self.engine.before_retry(state)
            restart = "moving" if in_target else state  # a target's images belong together
            if fault.action is Action.PAUSE:
                self._emit(RecoveryTaken(action="pause", state=restart, reason=fault.reason))
                self._resume_requested.clear()
                self._wait_paused(resume_to=restart, reason=fault.reason)
                return None
            self._resume_to = restart
            self._emit(RecoveryTaken(action="retry", state=restart, attempt=fault.attempt))
            return "retry"
        if fault.action is Action.SKIP_TARGET and in_target:
            target_id = self.engine.current_target_id()
            self.engine.skip_target(state, fault.reason)
            self._emit(RecoveryTaken(action="skip_target", target_id=target_id, reason=fault.reason))
            return self.engine.advance()
        if not is_expected(fault.error):
            reason = f"unexpected error in {state}: {fault.reason}"
        elif fault.attempt > self.max_retries:
            reason = f"{state} failed {fault.attempt} times"
        else:
            reason = f"{fault.reason} (retrying cannot help)"
        self._emit(RecoveryTaken(action="give_up", state=state, reason=reason))
        return "give_up"
