"""The screening steps as the runner's `StepEngine`: one step per state, each step's typed result applied to
the session's `SessionContext`, then the trigger that leaves the state.

`advance()` chooses the next unfinished target in the planned order (or ends the target list when the
plan's time budget is spent); `skip_target` records a target whose step failed for good; `probe` tells a
session paused for a lost connection whether the microscope answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.session.outcomes import Outcome, TargetResult
from agent.session.records import BudgetSpent, Record, TargetFinished
from agent.steps import calibrate, diffract, label, locate, map, record, target, visit
from agent.steps.context import SessionContext, VisitState
from drivers.base import MicroscopeError

logger = logging.getLogger(__name__)


class ScreeningEngine:
    """Runs the screening steps on `ctx`; `emit` journals and publishes records; `on_finished(result)` is
    called after a target's outcome is recorded (the session writes its summary there)."""

    def __init__(
        self,
        ctx: SessionContext,
        emit: Callable[[Record], None],
        on_finished: Callable[[TargetResult], None],
    ) -> None:
        self.ctx = ctx
        self._emit = emit
        self._on_finished = on_finished
        self._steps: dict[str, Callable[[], str]] = {
            "calibrating": self._calibrating,
            "mapping": self._mapping,
            "locating": self._locating,
            "labelling": self._labelling,
            "targeting": self._targeting,
            "moving": self._moving,
            "zooming": self._zooming,
            "confirming": self._confirming,
            "diffraction": self._diffraction,
            "recording": self._recording,
        }

    def run_step(self, state: str) -> str:
        """Run the step of `state`; returns the trigger to fire."""
        return self._steps[state]()

    def _calibrating(self) -> str:
        self.ctx.calibration = calibrate.calibrate(self.ctx).calibration
        return "calibrated"

    def _mapping(self) -> str:
        result = map.map_grid(self.ctx)
        self.ctx.atlas, self.ctx.map_box_um = result.atlas, result.box_um
        return "mapped"

    def _locating(self) -> str:
        self.ctx.analysis = locate.locate(self.ctx).analysis
        return "located"

    def _labelling(self) -> str:
        result = label.label(self.ctx)
        if result.asked:
            self.ctx.prompts += 1
        self.ctx.decision = result.decision
        return "labelled"

    def _targeting(self) -> str:
        self.ctx.targets = target.plan_targets(self.ctx).targets
        return self.advance()

    def _moving(self) -> str:
        visit.move(self.ctx)
        return "arrived"

    def _zooming(self) -> str:
        visit.zoom(self.ctx)
        return "zoomed"

    def _confirming(self) -> str:
        rejection = visit.confirm(self.ctx)
        if rejection is None:
            return "confirmed"
        self._finish("rejected", rejection.x_um, rejection.y_um, rejection.reason)
        return self.advance()

    def _diffraction(self) -> str:
        diffract.diffract(self.ctx)
        return "diffracted"

    def _recording(self) -> str:
        self._finished(record.record_target(self.ctx))
        return self.advance()

    def _finish(self, outcome: Outcome, x_um: float, y_um: float, reason: str = "") -> None:
        self._finished(record.outcome_of(self.ctx, self.ctx.require_visit(), outcome, x_um, y_um, reason))

    def _finished(self, result: TargetResult) -> None:
        """Keep a target's outcome, record it (journal, events, tables), then tell the session."""
        self.ctx.results[result.target_id] = result
        self._emit(TargetFinished.model_validate(result.model_dump(mode="json")))
        self._on_finished(result)

    def advance(self) -> str:
        """Pick the next unfinished target (`next_target`), or `finish` (none left, or the budget is spent)."""
        self.ctx.visit = None
        budget = self.ctx.plan.time_budget_s
        for planned in self.ctx.targets:
            if planned.target_id in self.ctx.results:
                continue
            if budget is not None and self.ctx.clock_s() >= budget:
                self._emit(BudgetSpent(message=f"time budget {budget:.0f} s spent; remaining targets skipped"))
                return "finish"
            self.ctx.visit = VisitState(target=planned)
            return "next_target"
        return "finish"

    def current_target_id(self) -> str | None:
        """The id of the target being visited, if any."""
        return self.ctx.visit.target.target_id if self.ctx.visit is not None else None

    def before_retry(self, state: str) -> None:
        """A retried calibration takes the next site."""
        if state == "calibrating":
            self.ctx.calibration_attempt += 1

    def skip_target(self, state: str, reason: str) -> None:
        """Finish the visited target as `failed` where the stage is now (its planned place when the move
        itself failed, or the stage cannot be read)."""
        planned = self.ctx.require_visit().target
        x_um, y_um = planned.x_um, planned.y_um
        if state != "moving":
            try:
                here = self.ctx.microscope.get_stage()
                x_um, y_um = here.x_um, here.y_um
            except MicroscopeError:
                logger.warning("cannot read the stage after a fault; %s recorded at its plan", planned.target_id)
        self._finish("failed", x_um, y_um, reason)

    def probe(self) -> bool:
        """True if the microscope answers a stage read."""
        try:
            self.ctx.microscope.get_stage()
        except MicroscopeError:
            return False
        return True
