r"""A multi-grid run: an atlas pass over every cassette slot, the grids ranked, the best screened in the budget.

```
  for each slot:      load --(empty / fails)--> skipped (journalled)        atlas pass: grid-NN/atlas/
                        \--> atlas-only session --> assessed
  rank the assessed grids (agent.grids.assess)
  for each grid, best first, while budget >= min_grid_budget_s (+ a load):
                      load again --> screening session (budget: grid_budget_s) --> screened   grid-NN/screen/
  run_summary.json, index.html
```

The run journal (`grids.jsonl`, `agent.grids.records`) says what happened to every grid; each grid's sessions
keep their own folders and journals. `--resume` reads the run journal and goes on where the run stopped: a grid
already assessed or screened is not visited again; a grid session that was cut is resumed from its own journal
when its grid never left the stage, else (the grid was reloaded: new rotation and shift, its coordinates do not
hold) its folder is kept as `<name>.cut-<n>` and the session starts again.

The budget is the screening plan's `time_budget_s`, counted on the microscope clock over the whole run (loads,
atlas passes and screening); each screening session gets `run_plan.grid_budget_s` of it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import ScreeningPlan
from agent.grids.alerts import grid_session_alerts, send_run_alert
from agent.grids.assess import RANKING_RULE, GridAssessment, assess_atlas_pass, rank_grids
from agent.grids.plan import GridRunPlan
from agent.grids.records import (
    RUN_JOURNAL_NAME,
    GridAssessed,
    GridLoaded,
    GridScreening,
    GridSkipped,
    GridsRanked,
    RunFinished,
    RunStarted,
    read_run_records,
    spent_s,
)
from agent.grids.summary import RunSummary, summarise_run, write_run_outputs
from agent.grids.yield_guard import YieldGuard
from agent.report import write_session_report_or_log
from agent.session.journal import Journal
from drivers.base import CassetteMicroscope, GridLoadError, InvalidParameterError, MicroscopeError, MicroscopeInfo

logger = logging.getLogger(__name__)

#: `new_session(folder, plan)` makes a new grid session; `resume_session(folder)` continues a cut one.
NewSession = Callable[[Path, ScreeningPlan], Any]
ResumeSession = Callable[[Path], Any]


class RunError(Exception):
    """A multi-grid run cannot start: no cassette, a slot the cassette does not have, a plan without a budget."""


def check_run(info: MicroscopeInfo, plan: ScreeningPlan, run_plan: GridRunPlan) -> None:
    """`RunError` when a run cannot start on this microscope: no cassette, a slot the cassette does not have, no
    time budget to share."""
    if info.cassette_slots <= 0:
        raise RunError(f"{info.name} has no autoloader cassette this driver can load grids from")
    missing = [slot for slot in run_plan.slots if slot > info.cassette_slots]
    if missing:
        raise RunError(f"slots {missing} do not exist: the cassette of {info.name} has slots 1-{info.cassette_slots}")
    if plan.time_budget_s is None:
        raise RunError("a multi-grid run needs a time budget (time_budget_s) to share between the grids")


class MultiGridRun:
    """One multi-grid run in `run_dir` (see the module docstring); `run()` blocks until it ends."""

    def __init__(
        self,
        microscope: CassetteMicroscope,
        plan: ScreeningPlan,
        run_plan: GridRunPlan,
        run_dir: str | Path,
        new_session: NewSession,
        resume_session: ResumeSession,
    ) -> None:
        info = microscope.info()
        check_run(info, plan, run_plan)
        self.microscope = microscope
        self.plan = plan
        self.run_plan = run_plan
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._new_session = new_session
        self._resume_session = resume_session
        self.instrument = info.name
        self._records = read_run_records(self.run_dir)
        self._abort = threading.Event()
        self._current: Any = None
        #: microscope seconds of the last session (or grid load) that ended and is not in a record yet
        self._ended_s = 0.0
        self.journal = Journal(self.run_dir, self.clock_s, name=RUN_JOURNAL_NAME)
        #: the slot this process has on the stage with coordinates its sessions can trust (loaded by this run)
        self._trusted_slot: int | None = self._slot_left_loaded()

    # -- the clock and control ----------------------------------------------------------------------------
    def clock_s(self) -> float:
        """Microscope seconds of the run so far, over every resumed part: its grid loads and its grid sessions'
        own clocks (which survive a resume), the running session's included. The time of a session cut and
        started again after a reload (`.cut-<n>`) is not counted."""
        live_s = self._current.microscope_time_s() if self._current is not None else self._ended_s
        return spent_s(self._records) + live_s

    def request_abort(self) -> None:
        """Stop at the next step boundary of the running session; the run can be resumed."""
        self._abort.set()
        if self._current is not None:
            self._current.request_abort()

    def _emit(self, record: Any) -> None:
        self._records.append(record.model_copy(update=_stamp(self.journal.append(record))))
        if isinstance(record, (GridAssessed, GridSkipped, GridScreening, GridLoaded)):
            self._ended_s = 0.0  # the record accounts for the session (or load) that just ended

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Run (or continue) the atlas pass, the ranking and the screening; returns the run's summary."""
        resumed = any(isinstance(r, RunStarted) for r in self._records)
        self._emit(
            RunStarted(
                event="resume" if resumed else "start",
                run_plan=self.run_plan.model_dump(mode="json"),
                plan=self.plan.model_dump(mode="json"),
                instrument=self.instrument,
            )
        )
        state, reason = "done", ""
        try:
            for slot in self.run_plan.slots:
                if self._abort.is_set() or not self._atlas_pass(slot):
                    break
            if not self._abort.is_set():
                self._rank()
                self._screen_best()
            if self._abort.is_set():
                state, reason = "aborted", "stopped on request; continue with --resume"
        except Exception as exc:
            state, reason = "failed", f"{type(exc).__name__}: {exc}"
            logger.exception("the multi-grid run failed")
            raise
        finally:
            self._emit(RunFinished(state=state, reason=reason))
            self.journal.close()
            summary = self.summary()
            write_run_outputs(self.run_dir, summary)
            send_run_alert(self.plan.alerts, self.run_dir, summary)
        return summary

    def summary(self) -> RunSummary:
        """The run's numbers now, from its journal and its grids' session folders."""
        return summarise_run(self.run_dir, self._records, RANKING_RULE)

    # -- atlas pass ------------------------------------------------------------------------------------
    def _atlas_pass(self, slot: int) -> bool:
        """The atlas pass of `slot` unless it is done or was skipped; False when the budget is spent."""
        if any(isinstance(r, (GridAssessed, GridSkipped)) and r.slot == slot for r in self._records):
            return True
        assert self.plan.time_budget_s is not None
        if self.clock_s() >= self.plan.time_budget_s:
            self._emit(GridSkipped(slot=slot, phase="atlas", reason="the run's time budget is spent"))
            return False
        trusted = self._load(slot, "atlas")
        if trusted is None:
            return True
        label = self._label(slot)
        plan = self._grid_plan(slot, label, visit_limit=self.run_plan.probe_targets, budget_s=None)
        session = self._open_session(self._grid_dir(slot) / "atlas", plan, trusted)
        summary = self._run_session(session)
        if summary.state == "aborted":
            return False
        if summary.state != "done":
            self._emit(GridSkipped(slot=slot, phase="atlas", reason=f"atlas pass ended {summary.state}",
                                   session_s=summary.microscope_time_s))
            return True
        assessment = assess_atlas_pass(session, slot, label, self.run_plan.grid_budget_s)
        folder = str(Path(session.session_dir).relative_to(self.run_dir))
        self._emit(GridAssessed(slot=slot, folder=folder, assessment=assessment.model_dump(mode="json")))
        return True

    def _rank(self) -> None:
        if any(isinstance(r, GridsRanked) for r in self._records):
            return
        assessments = [
            GridAssessment.model_validate(r.assessment) for r in self._records if isinstance(r, GridAssessed)
        ]
        ranked = rank_grids(assessments)
        self._emit(
            GridsRanked(
                order=[a.slot for a in ranked],
                scores={str(a.slot): a.score for a in ranked},
                rule=RANKING_RULE,
                thick_ice=[a.slot for a in ranked if a.thick_ice],
            )
        )

    # -- screening -------------------------------------------------------------------------------------
    def _screen_best(self) -> None:
        ranking = next(r for r in reversed(self._records) if isinstance(r, GridsRanked))
        worth = [slot for slot in ranking.order if ranking.scores.get(str(slot), 0.0) > 0]
        for slot in worth:
            if self._abort.is_set():
                return
            started = [r for r in self._records if isinstance(r, GridScreening) and r.slot == slot]
            if any(r.event == "done" for r in started) or self._skipped(slot, "screen"):
                continue
            screened = {r.slot for r in self._records if isinstance(r, GridScreening)}
            if self.run_plan.max_grids is not None and len(screened - {slot}) >= self.run_plan.max_grids:
                return
            budget_s = started[-1].budget_s if started else self._next_grid_budget_s()
            if budget_s is None:
                return
            self._screen(slot, budget_s, resumed=bool(started))

    def _next_grid_budget_s(self) -> float | None:
        """The screening budget of the next grid: `grid_budget_s`, or what is left after its load when that is
        less; None when less than `min_grid_budget_s` is left."""
        assert self.plan.time_budget_s is not None
        loads = [r.load_s for r in self._records if isinstance(r, GridLoaded) and r.load_s > 0]
        load_estimate_s = max(loads) if loads else 0.0
        left_s = self.plan.time_budget_s - self.clock_s() - load_estimate_s
        budget_s = min(self.run_plan.grid_budget_s, left_s)
        return budget_s if budget_s >= self.run_plan.least_grid_budget_s else None

    def _screen(self, slot: int, budget_s: float, resumed: bool) -> None:
        trusted = self._load(slot, "screen")
        if trusted is None:
            return
        label = self._label(slot)
        plan = self._grid_plan(slot, label, visit_limit=None, budget_s=budget_s)
        folder = self._grid_dir(slot) / "screen"
        if not resumed:
            self._emit(GridScreening(event="start", slot=slot, folder=str(folder.relative_to(self.run_dir)),
                                     budget_s=budget_s))
        session = self._open_session(folder, plan, trusted)
        guard = self._yield_guard(slot, session)
        summary = self._run_session(session)
        left = guard is not None and guard.reason is not None and not self._abort.is_set()
        if summary.state != "aborted" or left:
            self._emit(GridScreening(event="done", slot=slot, folder=str(folder.relative_to(self.run_dir)),
                                     budget_s=budget_s, summary=summary.model_dump(mode="json"),
                                     reason=guard.reason if left and guard is not None else ""))

    def _yield_guard(self, slot: int, session: Any) -> YieldGuard | None:
        """A `YieldGuard` on `session` against the best grid not screened yet (None: no such grid, or the plan
        never leaves a grid early)."""
        if self.run_plan.switch_after_visits <= 0:
            return None
        ranking = next(r for r in reversed(self._records) if isinstance(r, GridsRanked))
        started = {r.slot for r in self._records if isinstance(r, GridScreening)}
        skipped = {r.slot for r in self._records if isinstance(r, GridSkipped)}
        waiting = [ranking.scores[str(s)] for s in ranking.order if s not in started | skipped | {slot}]
        if not waiting or max(waiting) <= 0:
            return None
        assessed = next(r for r in self._records if isinstance(r, GridAssessed) and r.slot == slot)
        guard = YieldGuard(GridAssessment.model_validate(assessed.assessment), max(waiting), session.request_abort,
                           min_visits=self.run_plan.switch_after_visits)
        session.subscribe(guard)
        return guard

    # -- grids and sessions ----------------------------------------------------------------------------
    def _load(self, slot: int, phase: str) -> bool | None:
        """Put the grid of `slot` on the stage. True when it was already there, loaded by this run (its
        sessions' coordinates hold), False when it was loaded now, None when it could not be (journalled)."""
        if self._trusted_slot == slot:
            return True
        before_s = float(self.microscope.microscope_time_s())
        try:
            self.microscope.load_grid(slot)
        except MicroscopeError as exc:  # GridLoadError, InvalidParameterError, a fault of the autoloader
            self._trusted_slot = None
            reason = str(exc) if isinstance(exc, (GridLoadError, InvalidParameterError)) else f"load failed: {exc}"
            tried_s = self._elapsed_since(before_s)  # a failed transfer costs microscope time too
            self._ended_s = tried_s
            self._emit(GridSkipped(slot=slot, label=self._label(slot), phase=phase, reason=reason,  # type: ignore[arg-type]
                                   load_s=tried_s))
            return None
        self._trusted_slot = slot
        load_s = float(self.microscope.microscope_time_s()) - before_s
        self._ended_s = load_s  # stamped with the record, which then accounts for it
        self._emit(GridLoaded(slot=slot, phase=phase, load_s=round(load_s, 3)))  # type: ignore[arg-type]
        return False

    def _elapsed_since(self, before_s: float) -> float:
        """Microscope seconds since the microscope's clock read `before_s` (0 when it does not answer)."""
        try:
            return round(max(0.0, float(self.microscope.microscope_time_s()) - before_s), 3)
        except MicroscopeError:
            return 0.0

    def _open_session(self, folder: Path, plan: ScreeningPlan, trusted: bool) -> Any:
        """The grid session in `folder`: resumed when it was cut on this very load of the grid, else new (an
        earlier, cut session on an earlier load is kept aside as `<folder>.cut-<n>`)."""
        if (folder / "journal.jsonl").exists():
            if trusted:
                return self._resume_session(folder)
            n = 1
            while folder.with_name(f"{folder.name}.cut-{n}").exists():
                n += 1
            folder.rename(folder.with_name(f"{folder.name}.cut-{n}"))
            logger.warning("%s was cut before the grid was loaded again; kept as %s.cut-%d", folder, folder.name, n)
        folder.mkdir(parents=True, exist_ok=True)
        return self._new_session(folder, plan)

    def _run_session(self, session: Any) -> Any:
        self._current = session
        if self._abort.is_set():
            session.request_abort()
        try:
            return session.run()
        finally:
            self._ended_s = session.microscope_time_s()
            self._current = None
            write_session_report_or_log(session.session_dir)  # once, when the grid session ends

    def _grid_plan(self, slot: int, label: str, *, visit_limit: int | None, budget_s: float | None) -> ScreeningPlan:
        """The plan of one grid session: the run's plan with the grid's name, specimen and budget; an atlas pass
        (`visit_limit` set) maps one block of `atlas_squares` and visits that many targets."""
        plan = self.plan
        atlas_pass = visit_limit is not None
        area = plan.area.model_copy(update={"squares": self.run_plan.atlas_squares if atlas_pass else None})
        return plan.model_copy(
            update={
                "name": f"{plan.name}-grid-{slot:02d}-{'atlas' if atlas_pass else 'screen'}",
                "specimen": plan.specimen or label or None,
                "time_budget_s": budget_s,
                "area": area,
                "targeting": plan.targeting.model_copy(update={"visit_limit": visit_limit}),
                "alerts": grid_session_alerts(plan.alerts, atlas_pass),
            }
        )

    def _label(self, slot: int) -> str:
        try:
            return next((s.label for s in self.microscope.cassette_slots() if s.slot == slot), "")
        except MicroscopeError:
            return ""

    def _grid_dir(self, slot: int) -> Path:
        return self.run_dir / f"grid-{slot:02d}"

    def _skipped(self, slot: int, phase: str) -> bool:
        return any(isinstance(r, GridSkipped) and r.slot == slot and r.phase == phase for r in self._records)

    def _slot_left_loaded(self) -> int | None:
        """On resume: the slot whose grid this run loaded last and that is still on the stage (its sessions'
        coordinates still hold), else None."""
        last = next((r for r in reversed(self._records) if isinstance(r, (GridLoaded, GridSkipped))), None)
        if not isinstance(last, GridLoaded):
            return None
        try:
            return last.slot if self.microscope.loaded_slot() == last.slot else None
        except MicroscopeError:
            return None


def _stamp(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key in ("seq", "time_utc", "microscope_time_s") if key in entry}
