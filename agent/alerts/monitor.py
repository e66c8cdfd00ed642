"""When to alert: a subscriber to a session's journal records that sends an alert when something needs a person.

`AlertMonitor` is handed every record the session emits (after the journal wrote it, so every record carries
the session's microscope time) and decides:

- `pause`: a `control` record pausing the session (a lost bridge connection, which resumes by itself when the
  microscope answers again, or a pause someone asked for): one alert per pause;
- `failure`: the transition to `failed`, with the last fault: once;
- `end`: the `summary` record (done, aborted, or failed when failures are not alerted on their own): once; the
  session then waits up to `end_wait_s` for the alerts still being sent, so the last one goes out before the
  process ends;
- `no_diffraction`: `no_diffraction_min` minutes of microscope time spent visiting targets (moving .. recording,
  and recovering from a fault during a visit; not mapping, not paused) without a diffracting target (outcome
  `recorded`): one alert per such quiet stretch, armed again by the next diffracting target.

Sending happens on the dispatcher's thread (`agent.alerts.dispatch`); what became of each alert is journalled
as an `alert` record by this subscriber, on the session's thread, with the next record it sees.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.alerts.channels import AlertSender, build_senders
from agent.alerts.dispatch import AlertDispatcher
from agent.alerts.message import AlertMessage
from agent.alerts.plan import AlertKind, AlertPlan
from agent.alerts.secrets import AlertConfigError
from agent.session.journal import Journal, JournalError, live_entries, read_journal
from agent.session.records import (
    AlertSent,
    ControlApplied,
    FaultRaised,
    Record,
    SummaryWritten,
    TargetFinished,
    TargetsPlanned,
    Transition,
)
from agent.session.states import TARGET_STATES

if TYPE_CHECKING:
    from agent.session.screening import ScreeningSession

logger = logging.getLogger(__name__)


class QuietClock:
    """Microscope seconds spent visiting targets since the last diffracting one, and whether the
    no-diffraction alert is armed (it fires once per quiet stretch of `limit_s`)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.quiet_s = 0.0
        self.armed = True
        self._visiting = False
        self._last_time_s: float | None = None

    def observe(self, record: Record) -> bool:
        """Account for `record`; True when the quiet stretch has just reached `limit_s` (fire the alert now)."""
        time_s = record.microscope_time_s
        if time_s is not None:
            if self._visiting and self._last_time_s is not None and time_s > self._last_time_s:
                self.quiet_s += time_s - self._last_time_s
            self._last_time_s = time_s
        if isinstance(record, Transition):
            # a fault during a visit is still visiting; a pause, mapping or the end is not
            self._visiting = record.state in TARGET_STATES or (record.state == "recovering" and self._visiting)
        elif isinstance(record, TargetFinished) and record.outcome == "recorded":
            self.quiet_s = 0.0
            self.armed = True
            return False
        if self.armed and self.quiet_s >= self.limit_s:
            self.armed = False
            return True
        return False


class AlertMonitor:
    """Subscribes to a session's records (`ScreeningSession.subscribe`) and sends its alerts; never raises into
    the session once built. `senders` default to the plan's channels (`build_senders`, which reads the secrets:
    `AlertConfigError` if one is missing)."""

    def __init__(
        self,
        plan: AlertPlan,
        session: str,
        folder: Path,
        journal: Journal,
        senders: list[AlertSender] | None = None,
    ) -> None:
        self.plan = plan
        self.session = session
        self.folder = Path(folder).resolve()
        self.journal = journal
        self.dispatcher = AlertDispatcher(build_senders(plan) if senders is None else senders)
        self.quiet = QuietClock(plan.no_diffraction_min * 60.0)
        self.state = ""
        self.time_s: float | None = None
        self._found: set[str] = set()
        self._visited: set[str] = set()
        self._diffracting: set[str] = set()
        self._last_fault = ""
        self._failure_sent = False
        self.closed = False
        self._count_earlier_targets()

    @classmethod
    def for_session(cls, session: ScreeningSession) -> AlertMonitor:
        """The monitor of `session`'s plan; a channel that cannot be set up (a missing secret) is the session's
        `SessionError`, raised before anything is sent or screened."""
        try:
            return cls(session.plan.alerts, session.session_id, session.session_dir, session.recorder.journal)
        except AlertConfigError as exc:
            from agent.session.screening import SessionError

            session.recorder.close()
            raise SessionError(f"alerts: {exc}") from exc

    def _count_earlier_targets(self) -> None:
        """A resumed session's targets and outcomes so far, from its journal, so that counts start right."""
        try:
            entries = live_entries(read_journal(self.journal.path))
        except JournalError as exc:
            logger.warning("alerts: counts start at zero, the journal cannot be read: %s", exc)
            return
        for entry in entries:
            if entry.get("type") == "targets":
                self._found.update(str(t.get("target_id")) for t in entry.get("targets") or [])
            elif entry.get("type") == "target":
                self._note_outcome(str(entry.get("target_id")), str(entry.get("outcome")))

    def _note_outcome(self, target_id: str, outcome: str) -> None:
        self._visited.add(target_id)
        if outcome == "recorded":
            self._diffracting.add(target_id)
        else:
            self._diffracting.discard(target_id)

    # the subscriber ---------------------------------------------------------------------------------
    def __call__(self, record: Record) -> None:
        """Look at one stamped record: count, decide, send; journal what became of earlier alerts."""
        if self.closed:
            return
        self._tally(record)
        if self.quiet.observe(record):
            minutes = self.plan.no_diffraction_min
            self.send("no_diffraction", f"no diffracting target in the last {minutes:g} min of visiting targets")
        if isinstance(record, ControlApplied) and record.command == "pause":
            self.send("pause", _pause_detail(record))
        elif isinstance(record, Transition) and record.state == "failed":
            self._failure_sent = self.send("failure", self._last_fault or "the session failed")
        elif isinstance(record, SummaryWritten):
            self._end(record)
            return
        self.journal_results()

    def _tally(self, record: Record) -> None:
        if record.microscope_time_s is not None:
            self.time_s = record.microscope_time_s
        if isinstance(record, Transition):
            self.state = record.state
        elif isinstance(record, TargetsPlanned):
            self._found.update(t.target_id for t in record.targets)
        elif isinstance(record, TargetFinished):
            self._note_outcome(record.target_id, record.outcome)
        elif isinstance(record, FaultRaised):
            self._last_fault = f"{record.error}: {record.message}"[:400]

    def message(self, kind: AlertKind, detail: str = "", **fields: Any) -> AlertMessage:
        """The alert of `kind` with the session's counts now (`fields` override them)."""
        hours = (self.time_s or 0.0) / 3600.0
        values: dict[str, Any] = {
            "kind": kind,
            "session": self.session,
            "folder": str(self.folder),
            "state": self.state,
            "detail": detail,
            "targets_found": len(self._found),
            "targets_visited": len(self._visited),
            "diffracting": len(self._diffracting),
            "diffracting_per_hour": len(self._diffracting) / hours if hours > 0 else None,
            "microscope_time_s": self.time_s,
        }
        values.update(fields)
        return AlertMessage(**values)

    def send(self, kind: AlertKind, detail: str = "", **fields: Any) -> bool:
        """Queue the alert of `kind` if the plan sends that kind; True if it was queued."""
        if not self.plan.sends(kind):
            return False
        return self.dispatcher.submit(self.message(kind, detail, **fields))

    def _end(self, summary: SummaryWritten) -> None:
        """The session's last record: its end alert (unless its failure was alerted), then wait (bounded) for
        the alerts still going out and journal what became of them."""
        self.state = summary.state
        if not (summary.state == "failed" and self._failure_sent):
            self.send(
                "end",
                _end_detail(summary),
                targets_found=summary.targets_found,
                targets_visited=summary.targets_visited,
                diffracting=summary.targets_recorded,
                diffracting_per_hour=summary.diffracting_per_hour,
                microscope_time_s=summary.microscope_time_s,
            )
        self.dispatcher.drain(self.plan.end_wait_s)
        self.journal_results()
        note = f"still being sent when the session ended (end_wait_s = {self.plan.end_wait_s:g} s): not confirmed"
        for message in self.dispatcher.unfinished():
            logger.warning("alerts: the %s alert was %s", message.kind, note)
            for sender in self.dispatcher.senders:
                self._journal(AlertSent(kind=message.kind, channel=sender.channel, ok=False, error=note))
        self.close()

    def journal_results(self) -> None:
        """Journal an `alert` record for every delivery finished since the last call."""
        for delivery in self.dispatcher.results():
            self._journal(AlertSent(**delivery.model_dump()))

    def _journal(self, record: AlertSent) -> None:
        try:
            self.journal.append(record)
        except (JournalError, OSError) as exc:
            logger.warning("alerts: could not journal the %s alert's delivery: %s", record.kind, exc)

    def close(self) -> None:
        """Stop the sending thread; later records are ignored."""
        self.closed = True
        self.dispatcher.close()


def _pause_detail(record: ControlApplied) -> str:
    if record.reason:
        return (
            f"{record.reason}; it resumes by itself when the microscope answers again, or resume it from the console"
        )
    return "paused on request; it waits until someone resumes it from the console"


def _end_detail(summary: SummaryWritten) -> str:
    if summary.limited_by:
        return f"finished, limited by {summary.limited_by}"
    ended = {"done": "finished", "aborted": "aborted", "failed": "failed"}
    return ended.get(summary.state, f"stopped while {summary.state} (interrupted): it can be resumed")
