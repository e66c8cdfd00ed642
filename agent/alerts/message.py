"""The alert message: one JSON-ready model that every channel sends, with a one-line text for chat and subject.

Counts are the session's targets so far (planned, visited, diffracting: outcome `recorded`); rates are per
hour of microscope time.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, computed_field

from agent.alerts.plan import AlertKind

#: How each kind reads in the text line.
_HEADLINES: dict[str, str] = {
    "end": "session ended",
    "failure": "session FAILED",
    "pause": "session PAUSED, waiting",
    "no_diffraction": "no diffracting crystal",
    "test": "test alert",
}


def now_utc() -> str:
    """The time now, ISO 8601 UTC to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AlertMessage(BaseModel):
    """One alert: what happened (`kind`, `detail`), to which session (`session`, `folder`, on `host`), and how
    the session stands (`state`, counts, `diffracting_per_hour`, `microscope_time_s`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: AlertKind
    session: str
    folder: str = ""
    host: str = Field(default_factory=socket.gethostname)
    state: str = ""
    detail: str = ""
    targets_found: int = 0
    targets_visited: int = 0
    diffracting: int = Field(default=0, description="targets with outcome recorded (confirmed and diffracting)")
    diffracting_per_hour: float | None = Field(default=None, description="per hour of the session's microscope time")
    microscope_time_s: float | None = None
    time_utc: str = Field(default_factory=now_utc)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def text(self) -> str:
        """One line for a chat channel: who, what, why, and the counts."""
        line = f"crystal-locator {self.session} on {self.host}: {_HEADLINES[self.kind]}"
        if self.state:
            line += f" (state {self.state})"
        if self.detail:
            line += f": {self.detail}"
        return f"{line}. {self.counts_line()}"

    @property
    def subject(self) -> str:
        """The e-mail subject (without the plan's prefix)."""
        return f"{self.session} on {self.host}: {_HEADLINES[self.kind]}"

    def counts_line(self) -> str:
        """`3 diffracting of 12 visited (40 planned), 2.5 per hour, 1.2 h microscope time`."""
        text = f"{self.diffracting} diffracting of {self.targets_visited} visited ({self.targets_found} planned)"
        if self.diffracting_per_hour is not None:
            text += f", {self.diffracting_per_hour:.1f} per hour"
        if self.microscope_time_s is not None:
            text += f", {self.microscope_time_s / 3600:.2f} h microscope time"
        return text

    def body(self) -> str:
        """The e-mail body: the text line, then one field per line."""
        lines = [self.text, ""]
        lines += [
            f"Session:    {self.session}",
            f"Folder:     {self.folder}",
            f"Host:       {self.host}",
            f"Event:      {self.kind}",
            f"State:      {self.state}",
            f"Targets:    {self.counts_line()}",
            f"Time (UTC): {self.time_utc}",
        ]
        if self.detail:
            lines.append(f"Detail:     {self.detail}")
        return "\n".join(lines) + "\n"
