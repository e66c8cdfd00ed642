"""A live status line in the terminal for a screening session, fed by session events (rich)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class TerminalProgress:
    """Shows state, targets visited / found, confirmed and microscope time (the instrument's clock, not the
    wall clock: a simulator's is virtual) against the budget while a session runs.

    Subscribe `on_event` to the session's `EventBus`; use as a context manager around `run()`.
    On a non-interactive output (CI, a pipe) it prints one line per state change and one per target instead
    (target n of the N planned so far, microscope time, budget left).
    """

    def __init__(self, console: Console | None = None, budget_s: float | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.budget_s = budget_s
        self._found = 0
        self._visited = 0
        self._pending_line: str | None = None
        self._interactive = self.console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.fields[state]:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("confirmed {task.fields[confirmed]}  microscope time {task.fields[time]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            disable=not self._interactive,
        )
        self._task = self._progress.add_task("targets", total=None, state="idle", confirmed=0, time=self._clock(0.0))

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def _clock(self, time_s: float, left_estimate_s: float | None = None) -> str:
        """Microscope time, with the budget left when there is one, else an estimate of the time the planned
        targets still need (`left_estimate_s`) when one is known."""
        if self.budget_s is not None:
            return f"{time_s:.0f} s, {max(0.0, self.budget_s - time_s):.0f} s of the budget left"
        if left_estimate_s is not None:
            return f"{time_s:.0f} s, about {left_estimate_s:.0f} s more for the planned targets"
        return f"{time_s:.0f} s"

    def on_event(self, topic: str, event: dict[str, Any]) -> None:
        """Event listener (see `agent.session.events.EventBus.subscribe`)."""
        if topic == "state":
            time_s = event.get("microscope_time_s") or 0.0
            self._progress.update(self._task, state=event["state"], time=self._clock(time_s))
            if not self._interactive:
                print(f"[microscope {time_s:8.1f} s] {event['state']}", file=sys.stderr, flush=True)
        elif topic == "atlas":
            self._found += int(event.get("targets", 0))
            self._progress.update(self._task, total=max(1, self._found))
        elif topic == "target":
            self._visited += 1
            line = f"  {event['target_id']} ({self._visited} of {max(self._found, self._visited)} planned): "
            self._pending_line = line + f"{event['outcome']} {event.get('reason', '')}".rstrip()
        elif topic == "progress":
            time_s = float(event.get("microscope_time_s", 0) or 0.0)
            self._found = max(self._found, int(event.get("targets_found", 0)))
            per_target_s = event.get("per_target_time_s")
            visited = int(event.get("targets_visited", 0))
            left_s = (self._found - visited) * float(per_target_s) if per_target_s else None
            self._progress.update(
                self._task,
                total=max(1, self._found),
                completed=int(event.get("targets_visited", 0)),
                confirmed=int(event.get("targets_confirmed", 0)),
                time=self._clock(time_s, left_s),
            )
            if self._pending_line is not None and not self._interactive:
                print(f"{self._pending_line}  [microscope {self._clock(time_s, left_s)}]", file=sys.stderr, flush=True)
            self._pending_line = None


def summary_table(summary: dict[str, Any]) -> Table:
    """The session summary as a two-column table."""
    table = Table(title=f"session {summary.get('session', '')}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("state", summary.get("state")),
        ("targets found", summary.get("targets_found")),
        ("targets visited", summary.get("targets_visited")),
        ("targets confirmed (found again at search)", summary.get("targets_confirmed")),
        ("targets snapped directly (no search image)", summary.get("targets_snapped_directly")),
        ("diffracting (ready for collection)", summary.get("targets_recorded")),
        ("operator prompts", summary.get("prompts")),
        ("microscope time (s; the instrument's clock)", summary.get("microscope_time_s")),
        ("  time budget (s)", summary.get("time_budget_s")),
        ("  rounds of mapping", summary.get("rounds")),
        ("  of it fixed: calibration, mapping, analysis (s)", _fixed_total(summary)),
        ("  per visited target (s)", summary.get("per_target_time_s")),
        ("diffracting crystals per microscope hour", summary.get("diffracting_per_hour")),
        ("microscope time per diffracting crystal (s)", summary.get("time_per_diffracting_s")),
        ("confirmed crystals per hour (found again, any diffraction)", summary.get("confirmed_per_hour")),
        ("precision (ground truth)", summary.get("precision")),
        ("  each crystal counted once", summary.get("precision_unique")),
        ("recall of crystals in mapped area", summary.get("recall")),
        ("recall of diffracting crystals", summary.get("recall_diffracting")),
        ("faults", summary.get("faults")),
        ("wall time (s; all parts of a resumed session)", summary.get("wall_time_s")),
        ("ended by", summary.get("limited_by")),
        ("targets ranked by", summary.get("ranked_by")),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, str(value))
    return table


def _fixed_total(summary: dict[str, Any]) -> float | None:
    """Seconds of the summary's fixed costs, summed over states (None if the summary has none)."""
    fixed = summary.get("fixed_time_s")
    return round(sum(fixed.values()), 1) if isinstance(fixed, dict) and fixed else None
