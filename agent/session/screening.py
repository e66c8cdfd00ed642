"""A screening session: the steps of `agent.steps` wired to the runner, the journal and the writers.

`ScreeningSession` is what the commands, the console and the tests hold: construct it with a microscope,
a plan and a session folder, then `run()` (blocking); `request_pause()`, `request_resume()` and
`request_abort()` may be called from any thread; `ScreeningSession.resume(microscope, folder)` continues a
session from its journal. It builds the typed `SessionContext`, the runner (`agent.session.runner`) driving
the steps (`agent.session.engine`), and the recorder (`agent.session.recorder`) that journals every record
before its subscribers (event publisher, table and calibration writers) see it and writes the steps'
files; it keeps `summary.json` current after every target.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.config import PLAN_NAME, ScreeningPlan
from agent.session import outputs
from agent.session.engine import ScreeningEngine
from agent.session.events import EventBus
from agent.session.outcomes import SessionSummary, TargetRecord, TargetResult
from agent.session.recorder import SessionRecorder
from agent.session.records import (
    BridgeRestarted,
    Record,
    SessionStarted,
    SummaryWritten,
)
from agent.session.runner import Runner
from agent.session.stored_calibration import StoredCalibrationError, StoreWriter, starting_calibration
from agent.session.summary import summarise
from agent.session.timing import StateTimes
from agent.steps import learn
from agent.steps.calibration_store import CalibrationStore
from agent.steps.context import SessionContext
from agent.steps.stage_calibration import CalibrationSet
from drivers.base import Microscope, MicroscopeError

logger = logging.getLogger(__name__)

#: Scores the session against ground truth (simulated sessions only): (targets, results, box_um) -> dict
#: with precision / recall / recall_diffracting. Supplied by whoever wires a simulator in (the CLI).
#: (targets, results, mapped boxes (x_min, x_max, y_min, y_max um), one per round) -> ground-truth figures.
TruthScorer = Callable[
    [list[TargetRecord], dict[str, TargetResult], list[tuple[float, float, float, float]]], dict[str, Any]
]


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
        calibration_store: CalibrationStore | None = None,
        stored_calibration: CalibrationSet | None = None,
        recalibrate: bool = False,
    ) -> None:
        """`calibration`: presets already settled for this session (resume). `stored_calibration` (else the
        instrument's file in `calibration_store`) is checked preset by preset and measured again only where
        the check fails; `recalibrate` measures every preset; with neither, every preset is measured (as
        before a store existed). Presets measured go into `calibration_store` when one is given.
        `SessionError` for a calibration of another instrument or an unusable store file."""
        self.microscope = microscope
        self.plan = plan
        self.session_dir = Path(session_dir)
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.session_id = self.session_dir.name or uuid.uuid4().hex[:8]
        self.events = events or EventBus()
        self.truth_scorer = truth_scorer
        self.info = microscope.info()
        if calibration is not None and calibration.instrument != self.info.name:
            raise SessionError(
                f"the session's calibration is of instrument {calibration.instrument!r}; this microscope is "
                f"{self.info.name!r}"
            )
        try:
            stored = starting_calibration(self.info.name, calibration_store, stored_calibration, recalibrate)
        except StoredCalibrationError as exc:
            raise SessionError(str(exc)) from exc
        self._clock_offset_s = 0.0
        self._last_time_s = 0.0
        self._clock_lost = False
        self._clock_base_s = float(microscope.microscope_time_s())
        self._wall_start = time.monotonic()
        #: real seconds of the session's earlier parts (set on resume)
        self._wall_before_s = 0.0
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
            stored_calibration=stored,
            recalibrate=recalibrate,
        )
        self.recorder = SessionRecorder(
            self.session_dir, self.events, self.microscope_time_s, self.ctx.calibration, self.ctx
        )
        self.ctx.output = self.recorder
        #: notices raised inside a microscope call (a restarted bridge server), journalled with the next record
        self._notices: list[Record] = []
        if hasattr(microscope, "on_server_restart"):  # a bridge client
            microscope.on_server_restart = self._bridge_restarted
        if calibration_store is not None:
            self.recorder.subscribe(StoreWriter(calibration_store, self.info.name))
        self.state_times = StateTimes()
        self.recorder.subscribe(self.state_times)
        if plan.alerts.enabled:  # webhook / e-mail alerts (agent.alerts): a missing secret is a SessionError
            from agent.alerts.monitor import AlertMonitor

            self.recorder.subscribe(AlertMonitor.for_session(self))
        self.journal = self.recorder.journal
        self.engine = ScreeningEngine(self.ctx, self._emit, self._target_finished)
        self.runner = Runner(
            self.engine, self._emit, max_retries=plan.recovery.max_retries, max_faults=plan.recovery.max_faults
        )

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
    def labels(self) -> Any:
        """The label memory the labelling step reads and teaches (None: not used)."""
        return self.ctx.labels

    @labels.setter
    def labels(self, memory: Any) -> None:
        self.ctx.labels = memory

    @property
    def operator(self) -> Any:
        """The operator prompt channel (None: nobody is asked)."""
        return self.ctx.operator

    @property
    def calibration(self) -> CalibrationSet:
        """The image -> stage calibration in use."""
        return self.ctx.calibration

    @property
    def faults(self) -> int:
        """Faults so far (every step that raised)."""
        return self.runner.faults

    def microscope_time_s(self) -> float:
        """Microscope time of this session, seconds, summed over every resumed run.

        When the microscope does not answer (a lost bridge), the last time it reported is returned, so
        that the journal, the fault record and the summary can still be written."""
        try:
            now_s = float(self.microscope.microscope_time_s())
        except MicroscopeError as exc:
            if not self._clock_lost:
                logger.warning("the microscope's clock does not answer (%s); using its last reading", exc)
            self._clock_lost = True
            return self._last_time_s
        self._clock_lost = False
        self._last_time_s = self._clock_offset_s + now_s - self._clock_base_s
        return self._last_time_s

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
            self.ctx.started_utc = datetime.now(timezone.utc)
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
            try:
                summary = self.write_summary()
                self._emit(SummaryWritten.model_validate(summary.model_dump(mode="json")))
            finally:
                self.recorder.close()
        return summary

    def summary(self) -> SessionSummary:
        """The session's numbers now (`agent.session.summary`)."""
        truth: dict[str, Any] = {}
        if self.truth_scorer is not None and self.ctx.map_boxes_um:
            truth = self.truth_scorer(self.ctx.targets, self.ctx.results, list(self.ctx.map_boxes_um))
        return summarise(
            session_id=self.session_id,
            state=self.state,
            plan=self.plan,
            targets=self.ctx.targets,
            results=self.ctx.results,
            prompts=self.ctx.prompts,
            faults=self.faults,
            microscope_time_s=self.microscope_time_s(),
            wall_time_s=self._wall_before_s + time.monotonic() - self._wall_start,
            rounds=self.ctx.rounds,
            state_times=self.state_times,
            truth=truth,
            ranked_by=learn.ranked_by(self.ctx),
        )

    def write_summary(self) -> SessionSummary:
        """Compute the summary and write `summary.json` atomically."""
        summary = self.summary()
        outputs.write_json(self.session_dir / "summary.json", summary.model_dump(mode="json"))
        return summary

    def _emit(self, record: Record) -> None:
        self._flush_notices()
        self.recorder.emit(record)

    def record(self, record: Record) -> None:
        """Journal and publish `record` (as the steps' output port does)."""
        self._flush_notices()
        self.recorder.emit(record)

    def _bridge_restarted(self, old_server_id: str | None, new_server_id: str) -> None:
        """The bridge client saw a new server id; called inside a microscope call, so kept until the next
        record (journalling it now would read the microscope's clock from within that call)."""
        endpoint = str(getattr(self.microscope, "endpoint", ""))
        logger.warning("the bridge server at %s restarted; the microscope may have been reset", endpoint)
        self._notices.append(
            BridgeRestarted(endpoint=endpoint, old_server_id=old_server_id, new_server_id=new_server_id)
        )

    def _flush_notices(self) -> None:
        while self._notices:
            self.recorder.emit(self._notices.pop(0))

    def _target_finished(self, result: TargetResult) -> None:
        """After a target's outcome is recorded: the summary file, and progress for consoles."""
        summary = self.write_summary()
        self.recorder.publisher.progress(summary.model_dump(mode="json"))
