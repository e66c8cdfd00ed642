"""A session's records and files: the journal, the subscribers, and the steps' output port.

`SessionRecorder.emit(record)` writes the record to the journal first (durably; it comes back stamped with
`seq`, UTC and microscope time), then hands the stamped record to every subscriber in order: the event
publisher, the calibration writer, the table writer and any added with `subscribe` (a console, a test).
As the steps' `StepOutput` it writes frames, previews and atlas outputs with a `FileWriter` and records
each as an `artifact`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.session.events import EventBus
from agent.session.journal import Journal
from agent.session.outcomes import TargetRecord
from agent.session.records import ArtifactWritten, Record, is_checkpoint
from agent.session.writers import CalibrationWriter, EventPublisher, FileWriter, JournalWriter, TableWriter
from agent.steps.stage_calibration import CalibrationSet
from drivers.base import Frame, MicroscopeError

logger = logging.getLogger(__name__)


class SessionRecorder:
    """Routes a session's records to the journal and its subscribers; implements `StepOutput`."""

    def __init__(
        self,
        session_dir: Path,
        events: EventBus,
        clock_s: Callable[[], float],
        calibration: CalibrationSet,
        context: Any,
    ) -> None:
        self.journal = Journal(session_dir, clock_s=clock_s)
        self.files = FileWriter(session_dir)
        self._journal_writer = JournalWriter(self.journal)
        self.publisher = EventPublisher(events, self._journal_writer)
        self._context = context
        self._guests: list[Callable[[Record], None]] = []
        self._subscribers: list[Callable[[Record], None]] = [
            self.publisher,
            CalibrationWriter(session_dir, calibration),
            TableWriter(session_dir, context),
        ]

    def subscribe(self, subscriber: Callable[[Record], None]) -> None:
        """Call `subscriber(record)` with every record (stamped) from now on, after the journal and the
        session's own writers. An exception it raises is logged and does not stop the session (a console or
        a log must not take a run down); the session's own writers' errors do."""
        self._guests.append(subscriber)

    def emit(self, record: Record) -> None:
        """Journal `record` durably, then hand the stamped record to every subscriber. A checkpoint carries the
        stage position and the active preset (`agent.session.records.is_checkpoint`)."""
        if is_checkpoint(record):
            record = self._with_instrument_state(record)
        stamped = self._journal_writer(record)
        for subscriber in list(self._subscribers):
            subscriber(stamped)
        for guest in list(self._guests):
            try:
                guest(stamped)
            except Exception:
                logger.exception("a record subscriber failed on %s; the session goes on", type(stamped).__name__)

    def _with_instrument_state(self, record: Record) -> Record:
        """`record` stamped with where the stage is and which preset is active (unstamped when the microscope
        does not answer: resume then leaves the stage where it is)."""
        microscope = self._context.microscope
        try:
            stage, preset = microscope.get_stage(), microscope.get_preset()
        except MicroscopeError as exc:
            logger.warning("checkpoint %s without the stage position: %s", type(record).__name__, exc)
            return record
        return record.model_copy(update={"stage": stage, "optics_preset": preset})

    def close(self) -> None:
        """Close the journal (later records raise `JournalError`)."""
        self.journal.close()

    # StepOutput ------------------------------------------------------------------------------------
    def record(self, record: Record) -> None:
        """Journal and publish `record`."""
        self.emit(record)

    def save_frame(self, kind: str, relative_path: str, frame: Frame, target_id: str | None = None) -> str:
        """Write `frame` and record the artifact; returns its path relative to the session."""
        path = self.files.frame(relative_path, frame)
        self.emit(ArtifactWritten(kind=kind, path=path, target_id=target_id))
        return path

    def save_target_previews(self, target_id: str, search: Frame | None, diffraction: Frame | None) -> dict[str, str]:
        """Write a target's PNG previews and record them; kind -> relative path."""
        written = self.files.previews(target_id, search, diffraction)
        for kind, path in written.items():
            self.emit(ArtifactWritten(kind=kind, path=path, target_id=target_id))
        return written

    def save_atlas_outputs(
        self, atlas: Any, analysis: Any, decision: Any, targets: list[TargetRecord], folder: str = "atlas"
    ) -> None:
        """Write the atlas outputs in `folder`, record them and announce the heat map."""
        written = self.files.atlas_outputs(atlas, analysis, decision, targets, folder)
        for kind, path in written.items():
            self.emit(ArtifactWritten(kind=kind, path=path))
        self.publisher.atlas_ready(written.get("heatmap", ""), len(targets))
