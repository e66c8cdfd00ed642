"""A screening session: the steps of `agent.steps` wired to the runner, the journal and the writers.

`ScreeningSession` is what the commands, the console and the tests hold: construct it with a microscope,
a plan and a session folder, then `run()` (blocking); `request_pause()`, `request_resume()` and
`request_abort()` may be called from any thread; `ScreeningSession.resume(microscope, folder)` continues a
session from its journal. It is the runner's `StepEngine`: one step per state, each step taking the typed
`SessionContext` and returning a typed result, which the session applies to the context before choosing
the next trigger. It emits every record to its subscribers (journal first, then the event publisher and
the table and calibration writers) and implements the steps' output port with a `FileWriter`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import PLAN_NAME, ScreeningPlan
from agent.session import outputs
from agent.session.events import EventBus
from agent.session.outcomes import Outcome, SessionSummary, TargetRecord, TargetResult
from agent.session.recorder import SessionRecorder
from agent.session.records import (
    BudgetSpent,
    Record,
    SessionStarted,
    SummaryWritten,
    TargetFinished,
)
from agent.session.runner import Runner
from agent.steps import calibrate, diffract, label, locate, map, record, target, visit
from agent.steps.context import SessionContext, VisitState
from agent.steps.stage_calibration import CalibrationSet
from drivers.base import Microscope, MicroscopeError

logger = logging.getLogger(__name__)

#: Scores the session against ground truth (simulated sessions only): (targets, results, box_um) -> dict
#: with precision / recall / recall_diffracting. Supplied by whoever wires a simulator in (the CLI).
TruthScorer = Callable[[list[TargetRecord], dict[str, TargetResult], tuple[float, float, float, float]], dict[str, Any]]


class SessionError(Exception):
    """A session cannot start or resume (missing or damaged session folder, wrong instrument)."""


class ScreeningSession:
    """Runs one screening session on any `Microscope` (see the module docstring)."""

    def __init__(
        self,
        microscope: Microscope,
        plan: ScreeningPlan,
        session_dir: str | Path,
        *,
        labels: Any | None = None,
        operator: Any | None = None,
        events: EventBus | None = None,
        truth_scorer: TruthScorer | None = None,
        calibration: CalibrationSet | None = None,
    ) -> None:
        self.microscope = microscope
        self.plan = plan
        self.session_dir = Path(session_dir)
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.session_id = self.session_dir.name or uuid.uuid4().hex[:8]
        self.events = events or EventBus()
        self.truth_scorer = truth_scorer
        self.info = microscope.info()
        if calibration is not None and calibration.instrument != self.info.name:
            logger.warning(
                "ignoring a calibration of %r: this microscope is %r", calibration.instrument, self.info.name
            )
            calibration = None
        self._clock_offset_s = 0.0
        self._clock_base_s = float(microscope.microscope_time_s())
        self._wall_start = time.monotonic()
        self.ctx = SessionContext(
            plan=plan,
            microscope=microscope,
            info=self.info,
            session_id=self.session_id,
            output=None,  # type: ignore[arg-type]  # the recorder below, which needs the context
            clock_s=self.microscope_time_s,
            calibration=calibration or CalibrationSet(instrument=self.info.name),
            labels=labels,
            operator=operator,
        )
        self.recorder = SessionRecorder(
            self.session_dir, self.events, self.microscope_time_s, self.ctx.calibration, self.ctx
        )
        self.ctx.output = self.recorder
        self.journal = self.recorder.journal
        self.runner = Runner(
            self, self._emit, max_retries=plan.recovery.max_retries, max_faults=plan.recovery.max_faults
        )
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

    def subscribe(self, subscriber: Callable[[Record], None]) -> None:
        """Call `subscriber(record)` with every journal record (stamped) from now on, after the journal."""
        self.recorder.subscribe(subscriber)

    # ----------------------------------------------------------------------------------------------
    # what the commands and the console use
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def resume(cls, microscope: Microscope, session_dir: str | Path, **kwargs: Any) -> ScreeningSession:
        """Rebuild a session from its folder (plan, calibration, atlas, targets, outcomes) to continue it."""
        from agent.session.restore import resume_session

        return resume_session(cls, microscope, Path(session_dir), **kwargs)

    @property
    def state(self) -> str:
        """The runner's state (see `agent.session.states`)."""
        return self.runner.state

    @property
    def targets(self) -> list[TargetRecord]:
        """The planned targets, in visiting order."""
        return self.ctx.targets

    @property
    def results(self) -> dict[str, TargetResult]:
        """Outcomes of the visited targets, by target id."""
        return self.ctx.results

    @property
    def decision(self) -> Any:
        """The labelling decision (None before `labelling`)."""
        return self.ctx.decision

    @property
    def analysis(self) -> Any:
        """The atlas' cluster analysis (None before `locating`)."""
        return self.ctx.analysis

    @property
    def atlas(self) -> Any:
        """The atlas (None before `mapping`)."""
        return self.ctx.atlas

    @property
    def calibration(self) -> CalibrationSet:
        """The image -> stage calibration in use."""
        return self.ctx.calibration

    @property
    def faults(self) -> int:
        """Faults so far (every step that raised)."""
        return self.runner.faults

    def microscope_time_s(self) -> float:
        """Microscope time of this session, seconds, summed over every resumed run."""
        return self._clock_offset_s + float(self.microscope.microscope_time_s()) - self._clock_base_s

    def request_pause(self) -> None:
        """Pause at the next step boundary (the current stage move or exposure completes first)."""
        self.runner.request_pause()

    def request_resume(self) -> None:
        """Continue a paused session."""
        self.runner.request_resume()

    def request_abort(self) -> None:
        """Stop at the next step boundary; results so far are kept and the session can be resumed."""
        self.runner.request_abort()

    def run(self) -> SessionSummary:
        """Run (or continue) the session until done, aborted or failed; returns the final summary."""
        if self.state == "idle":
            self.plan.save(self.session_dir / PLAN_NAME)
            self._emit(
                SessionStarted(
                    event="start",
                    session=self.session_id,
                    plan=self.plan.model_dump(mode="json"),
                    instrument=self.info.name,
                )
            )
        try:
            self.runner.run()
        finally:
            summary = self.write_summary()
            self._emit(SummaryWritten.model_validate(summary.model_dump(mode="json")))
            self.recorder.close()
        return summary

    def summary(self) -> SessionSummary:
        """The session's numbers now."""
        results = self.ctx.results
        confirmed = sum(1 for r in results.values() if r.confirmed)
        time_s = self.microscope_time_s()
        truth: dict[str, Any] = {}
        if self.truth_scorer is not None and self.ctx.map_box_um is not None:
            truth = self.truth_scorer(self.ctx.targets, results, self.ctx.map_box_um)
        return SessionSummary(
            session=self.session_id,
            state=self.state,
            specimen=self.plan.specimen,
            targets_found=len(self.ctx.targets),
            targets_visited=len(results),
            targets_confirmed=confirmed,
            targets_recorded=sum(1 for r in results.values() if r.outcome == "recorded"),
            prompts=self.ctx.prompts,
            microscope_time_s=round(time_s, 2),
            time_per_confirmed_s=round(time_s / confirmed, 2) if confirmed else None,
            confirmed_per_hour=round(3600.0 * confirmed / time_s, 2) if confirmed and time_s > 0 else None,
            faults=self.faults,
            wall_time_s=round(time.monotonic() - self._wall_start, 2),
            **truth,
        )

    def write_summary(self) -> SessionSummary:
        """Compute the summary and write `summary.json` atomically."""
        summary = self.summary()
        outputs.write_json(self.session_dir / "summary.json", summary.model_dump(mode="json"))
        return summary

    def _emit(self, record: Record) -> None:
        self.recorder.emit(record)

    def record(self, record: Record) -> None:
        """Journal and publish `record` (as the steps' output port does)."""
        self.recorder.emit(record)

    # ----------------------------------------------------------------------------------------------
    # StepEngine: one step per state, results applied to the context
    # ----------------------------------------------------------------------------------------------
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
        """Keep a target's outcome, record it (journal, events, tables), then the summary and progress."""
        self.ctx.results[result.target_id] = result
        self._emit(TargetFinished.model_validate(result.model_dump(mode="json")))
        summary = self.write_summary()
        self.recorder.publisher.progress(summary.model_dump(mode="json"))

    def advance(self) -> str:
        """Pick the next unfinished target (`next_target`), or `finish` (none left, or the budget is spent)."""
        self.ctx.visit = None
        budget = self.plan.time_budget_s
        for planned in self.ctx.targets:
            if planned.target_id in self.ctx.results:
                continue
            if budget is not None and self.microscope_time_s() >= budget:
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
                here = self.microscope.get_stage()
                x_um, y_um = here.x_um, here.y_um
            except MicroscopeError:
                logger.warning("cannot read the stage after a fault; %s recorded at its plan", planned.target_id)
        self._finish("failed", x_um, y_um, reason)

    def probe(self) -> bool:
        """True if the microscope answers a stage read."""
        try:
            self.microscope.get_stage()
        except MicroscopeError:
            return False
        return True
