"""A live status line in the terminal for a screening session, fed by session events (rich)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class TerminalProgress:
    """Shows state, targets visited / found, confirmed and microscope time while a session runs.

    Subscribe `on_event` to the session's `EventBus`; use as a context manager around `run()`.
    On a non-interactive output (CI, a pipe) it prints one line per state change instead.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._interactive = self.console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.fields[state]:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("confirmed {task.fields[confirmed]}  microscope {task.fields[time]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            disable=not self._interactive,
        )
        self._task = self._progress.add_task("targets", total=None, state="idle", confirmed=0, time="0 s")

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_event(self, topic: str, event: dict[str, Any]) -> None:
        """Event listener (see `agent.session.events.EventBus.subscribe`)."""
        if topic == "state":
            time_s = event.get("microscope_time_s") or 0.0
            self._progress.update(self._task, state=event["state"], time=f"{time_s:.0f} s")
            if not self._interactive:
                print(f"[{time_s:8.1f} s] {event['state']}", file=sys.stderr, flush=True)
        elif topic == "atlas":
            self._progress.update(self._task, total=max(1, int(event.get("targets", 0))))
        elif topic == "progress":
            self._progress.update(
                self._task,
                completed=int(event.get("targets_visited", 0)),
                confirmed=int(event.get("targets_confirmed", 0)),
                time=f"{event.get('microscope_time_s', 0):.0f} s",
            )
        elif topic == "target" and not self._interactive:
            print(
                f"  {event['target_id']}: {event['outcome']} {event.get('reason', '')}".rstrip(),
                file=sys.stderr,
                flush=True,
            )


def summary_table(summary: dict[str, Any]) -> Table:
    """The session summary as a two-column table."""
    table = Table(title=f"session {summary.get('session', '')}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("state", summary.get("state")),
        ("targets found", summary.get("targets_found")),
        ("targets visited", summary.get("targets_visited")),
        ("targets confirmed", summary.get("targets_confirmed")),
        ("diffracting (ready for collection)", summary.get("targets_recorded")),
        ("operator prompts", summary.get("prompts")),
        ("microscope time (s)", summary.get("microscope_time_s")),
        ("  of it fixed: calibration, mapping, analysis (s)", _fixed_total(summary)),
        ("  per visited target (s)", summary.get("per_target_time_s")),
        ("diffracting crystals per microscope hour", summary.get("diffracting_per_hour")),
        ("microscope time per diffracting crystal (s)", summary.get("time_per_diffracting_s")),
        ("confirmed crystals per hour (found again, any diffraction)", summary.get("confirmed_per_hour")),
        ("precision (ground truth)", summary.get("precision")),
        ("recall of crystals in mapped area", summary.get("recall")),
        ("recall of diffracting crystals", summary.get("recall_diffracting")),
        ("faults", summary.get("faults")),
        ("wall time (s)", summary.get("wall_time_s")),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, str(value))
    return table


def _fixed_total(summary: dict[str, Any]) -> float | None:
    """Seconds of the summary's fixed costs, summed over states (None if the summary has none)."""
    fixed = summary.get("fixed_time_s")
    return round(sum(fixed.values()), 1) if isinstance(fixed, dict) and fixed else None
