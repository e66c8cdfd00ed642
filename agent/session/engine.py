"""The screening steps as the runner's `StepEngine`: one step per state, each step's typed result applied to
the session's `SessionContext`, then the trigger that leaves the state.

`advance()` chooses the next unfinished target in the planned order (a target in the search image the stage
sits on first), maps the next block of squares when a session sized by its budget has visited a round's
targets (`map_more`), or ends the session when the budget is spent or nothing is left; `skip_target`
records a target whose step failed for good; `probe` tells a session paused for a lost connection whether
the microscope answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.session.outcomes import Outcome, TargetRecord, TargetResult
from agent.session.records import BudgetSpent, Record, TargetFinished
from agent.steps import calibrate, diffract, direct, label, learn, locate, map, record, target, visit
from agent.steps.context import SessionContext, VisitState
from drivers.base import MicroscopeError

logger = logging.getLogger(__name__)


#: Targets of this tier and above (`TargetRecord.tier`: the classifier's p < 0.2) wait while the budget allows
#: another round of mapping: a visit costs about as much as any other, and a new block's likely crystals are
#: worth more than a target the classifier gives less than one chance in five. They are visited when no
#: further round can be mapped and budget is left.
WAITING_TIER = 2


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
        ctx = self.ctx
        ctx.atlas, ctx.map_box_um = result.atlas, result.box_um
        ctx.rounds += 1
        ctx.map_boxes_um.append(result.box_um)
        ctx.last_mapping_s = result.mapping_s
        ctx.analysis = ctx.decision = ctx.atlas_prepared = None
        ctx.field = None
        return "mapped"

    def _locating(self) -> str:
        result = locate.locate(self.ctx)
        self.ctx.analysis, self.ctx.atlas_prepared = result.analysis, result.prepared
        return "located"

    def _labelling(self) -> str:
        result = label.label(self.ctx)
        if result.asked:
            self.ctx.prompts += 1
        self.ctx.decision = result.decision
        return "labelled"

    def _targeting(self) -> str:
        self.ctx.targets.extend(target.plan_targets(self.ctx).targets)
        self.ctx.atlas_prepared = None  # only the object search needed it
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
        """Keep a target's outcome, record it (journal, events, tables), tell the session, then store it in
        the label memory as what the object turned out to be (`agent.steps.learn.remember`)."""
        self.ctx.results[result.target_id] = result
        self._emit(TargetFinished.model_validate(result.model_dump(mode="json")))
        self._on_finished(result)
        planned = next((t for t in self.ctx.targets if t.target_id == result.target_id), None)
        if planned is not None:
            learn.remember(self.ctx, planned, result)

    def advance(self) -> str:
        """Pick the next unfinished target (`next_target`), or `finish` (none left, or the budget is spent).

        The next target is the first unfinished one of the lowest tier (`TargetRecord.tier`), in the planned
        order, unless an unfinished target of the same tier lies in the search image the stage sits on: that
        one goes first, as it costs no stage move and no new search image (`agent.steps.visit.in_search_field`).
        When only targets of `WAITING_TIER` are left and another round can be mapped, it maps (`map_more`). When the
        session's outcomes reached a new multiple of `learn.REFIT_EVERY`, the targets left are re-ranked by the
        refit classifier first (`learn.rerank`)."""
        ctx = self.ctx
        ctx.visit = None
        ranked = learn.rerank(ctx) if ctx.targets else None
        if ranked is not None:
            self._emit(ranked)
        pending = [planned for planned in ctx.targets if planned.target_id not in ctx.results]
        limit = ctx.plan.targeting.visit_limit
        if limit is not None and len(ctx.results) >= limit:
            return "finish"  # an atlas pass (limit 0) or a probe of the grid: its visits are done
        budget = ctx.plan.time_budget_s
        if budget is not None and ctx.clock_s() >= budget:
            if pending:
                self._emit(BudgetSpent(message=f"time budget {budget:.0f} s spent; remaining targets skipped"))
            return "finish"
        if not pending:
            return "map_more" if self._another_round() else "finish"
        pending.sort(key=lambda planned: planned.tier)  # stable: each tier in its planned order
        if pending[0].tier >= WAITING_TIER and self._another_round():
            return "map_more"  # only unlikely targets left: a new block of squares is worth more
        ctx.visit = VisitState(target=self._cheapest_next(pending))
        return "next_target"

    def _cheapest_next(self, pending: list[TargetRecord]) -> TargetRecord:
        """The first of `pending` (sorted by tier, each tier in its planned order), unless a target of its tier
        costs no stage move: one in the search image the stage sits on (`visit.in_search_field`), else one
        snapped directly within image-shift range of the stage at the search preset (`direct.shift_reachable`)."""
        ctx = self.ctx
        chosen = pending[0]
        limit_um = ctx.image_shift_limit_um()
        if limit_um <= 0:
            return chosen
        same_tier = [p for p in pending if p.tier == chosen.tier]
        if ctx.field is not None:
            in_field = (p for p in same_tier if visit.in_search_field(ctx, ctx.field, p.x_um, p.y_um, limit_um))
            found = next(in_field, None)
            if found is not None:
                return found
        if ctx.rounds == 0 or ctx.microscope.get_preset() != ctx.plan.presets.search:
            return chosen
        here = ctx.microscope.get_stage()
        return direct.shift_reachable(ctx, (here.x_um, here.y_um), same_tier, limit_um) or chosen

    def _another_round(self) -> bool:
        """True when a session sized by its budget should map the next block of squares: the target cap (if
        any) not reached, budget left for a montage like the last one and a target visit after it, and a block
        of typical squares not mapped yet. Never on a SerialEM map (`area.serialem_map`)."""
        ctx = self.ctx
        plan = ctx.plan
        cap = plan.targeting.max_targets
        if not plan.sized_by_budget or ctx.rounds == 0 or (cap is not None and len(ctx.targets) >= cap):
            return False
        if plan.area.serialem_map is not None:
            return False  # the operator's SerialEM map is the area: the budget bounds only the visits
        assert plan.time_budget_s is not None
        if plan.time_budget_s - ctx.clock_s() < ctx.last_mapping_s + target.visit_estimate_s(plan):
            return False
        return bool(map.next_block(ctx))

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
