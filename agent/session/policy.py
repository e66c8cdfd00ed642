"""What the runner does when a step raises: one table, error class -> action.

The runner asks `decide(error, in_target, attempts)` once per fault and carries the answer out; no step
catches errors to decide for itself (as pymmcore-plus' runner does with `SkipEvent`).

| error (first match, most specific first) | in a target step | in a session step (calibrate, map, ...) |
| --- | --- | --- |
| `StageLimitError` (target out of travel)  | skip the target, no retry | retry (calibration takes the next site) |
| `CalibrationError` (no usable calibration) | skip the target | re-calibrate at the next site, up to `max_retries` |
| `ProtocolMismatchError`, `AuthenticationError` | fail the session | fail the session |
| `BridgeTimeout` (connection lost, see below) | pause; then the target again from the move | pause; then the step |
| `MicroscopeError`, `TimeoutError` (stage, camera, ...) | retry from the move, then skip | retry, then fail |
| anything else (a bug, a full disk, a damaged journal) | fail the session, traceback journalled | same |

Retries are bounded by `recovery.max_retries` per step (and target). A `BridgeTimeout` reaches the runner
only after the bridge client has re-sent the call and rebuilt its socket (`drivers.zmq_bridge.BridgeClient`):
the server is gone. The session pauses, probes the microscope every few seconds and resumes by itself once
it answers; an operator may resume or abort at any time.

More than `recovery.max_faults` faults in one session fail it whatever the table says: a microscope that
faults that often needs a person.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from agent.steps.stage_calibration import CalibrationError
from drivers.base import AuthenticationError, BridgeTimeout, MicroscopeError, ProtocolMismatchError, StageLimitError


class Action(str, Enum):
    """What the runner does about a fault."""

    RETRY = "retry"
    SKIP_TARGET = "skip_target"
    RECALIBRATE = "recalibrate"
    PAUSE = "pause"
    FAIL = "fail"


@dataclass(frozen=True)
class ErrorRule:
    """How one class of error is handled: the action in a target step and in a session step, and whether
    the action is a retry bounded by `recovery.max_retries` (after which a target is skipped and a session
    step fails)."""

    error: type[BaseException]
    in_target: Action
    in_session: Action
    bounded: bool = True


#: The table, most specific class first; the first rule whose class matches decides.
ERROR_RULES: tuple[ErrorRule, ...] = (
    ErrorRule(StageLimitError, in_target=Action.SKIP_TARGET, in_session=Action.RETRY),
    ErrorRule(CalibrationError, in_target=Action.SKIP_TARGET, in_session=Action.RECALIBRATE),
    ErrorRule(ProtocolMismatchError, in_target=Action.FAIL, in_session=Action.FAIL),
    ErrorRule(AuthenticationError, in_target=Action.FAIL, in_session=Action.FAIL),
    ErrorRule(BridgeTimeout, in_target=Action.PAUSE, in_session=Action.PAUSE, bounded=False),
    ErrorRule(MicroscopeError, in_target=Action.RETRY, in_session=Action.RETRY),
    ErrorRule(TimeoutError, in_target=Action.RETRY, in_session=Action.RETRY),
)


def rule_for(error: BaseException) -> ErrorRule | None:
    """The first rule of `ERROR_RULES` that matches `error`, or None for an unexpected error."""
    for rule in ERROR_RULES:
        if isinstance(error, rule.error):
            return rule
    return None


def decide(error: BaseException, *, in_target: bool, attempts: int, max_retries: int) -> Action:
    """The action for `error`, raised in a target step or not, at its `attempts`-th occurrence (from 1) for
    the same step (and target).

    A bounded retry past `max_retries` becomes a skip (target) or a failure (session step).
    """
    rule = rule_for(error)
    if rule is None:
        return Action.FAIL
    action = rule.in_target if in_target else rule.in_session
    if rule.bounded and action in (Action.RETRY, Action.RECALIBRATE) and attempts > max_retries:
        return Action.SKIP_TARGET if in_target else Action.FAIL
    return action


def is_expected(error: BaseException) -> bool:
    """True if the table has a rule for `error` (else its traceback goes to the journal)."""
    return rule_for(error) is not None
