"""Subscribers to a session's records, and the file writer behind the steps' output port.

The session emits every record to its subscribers in order: the journal writer first (it stamps the record
with `seq`, UTC time and microscope time, durably), then the others, which receive the stamped record:

- `EventPublisher`: the `EventBus` topics a console or log follows (`state`, `journal`, `prompt`, `target`,
  `summary`, plus `atlas` and `progress` notices);
- `CalibrationWriter`: `calibration.json` after every measured preset;
- `TableWriter`: `targets.csv`, `targets.json`, `targets.nav` after the target list and every outcome (and
  `targets_on_map.nav` on a SerialEM map).

`FileWriter` writes the frames, previews and atlas outputs steps hand to the output port. Every file is
written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.session import outputs
from agent.session.events import EventBus
from agent.session.journal import Journal
from agent.session.outcomes import TargetRecord
from agent.session.records import (
    CalibrationChecked,
    CalibrationMeasured,
    PromptAsked,
    Record,
    SummaryWritten,
    TargetFinished,
    TargetsPlanned,
    Transition,
)
from agent.steps.stage_calibration import CALIBRATION_NAME, CalibrationSet, PresetCalibration
from drivers.base import Frame
from drivers.formats.images import write_frame_tiff

logger = logging.getLogger(__name__)

#: A subscriber: called with every stamped record, in the order they are emitted.
Subscriber = Callable[[Record], None]


class JournalWriter:
    """Appends every record to the journal (flushed and fsynced) and stamps it with its envelope."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.last_entry: dict[str, Any] = {}

    def __call__(self, record: Record) -> Record:
        entry = self.journal.append(record)
        self.last_entry = entry
        envelope = {key: entry[key] for key in ("seq", "time_utc", "microscope_time_s")}
        return record.model_copy(update=envelope)


class EventPublisher:
    """Publishes records on an `EventBus` under the topics consoles and logs follow."""

    def __init__(self, bus: EventBus, journal_writer: JournalWriter) -> None:
        self.bus = bus
        self._journal_writer = journal_writer

    def __call__(self, record: Record) -> None:
        entry = self._journal_writer.last_entry
        if isinstance(record, Transition):
            self.bus.publish("state", state=record.state, microscope_time_s=record.microscope_time_s)
        self.bus.publish("journal", entry=entry)
        if isinstance(record, PromptAsked):
            self.bus.publish("prompt", prompt_id=record.prompt_id, answered_by=record.answered_by)
        elif isinstance(record, TargetFinished):
            self.bus.publish("target", **record.result().model_dump(mode="json"))
        elif isinstance(record, SummaryWritten):
            self.bus.publish("summary", **_summary(record))

    def atlas_ready(self, heatmap: str, n_targets: int) -> None:
        """Announce the atlas heat map (relative path) and the number of planned targets."""
        self.bus.publish("atlas", heatmap=heatmap, targets=n_targets)

    def progress(self, summary: dict[str, Any]) -> None:
        """Announce the session's numbers after a target."""
        self.bus.publish("progress", **summary)


def _summary(record: SummaryWritten) -> dict[str, Any]:
    data = record.payload()
    data.pop("type", None)
    return data


class CalibrationWriter:
    """Keeps `calibration.json` in the session folder up to date with every measured preset and every stored
    preset whose check passed (`calibration_check` ok)."""

    def __init__(self, session_dir: Path, calibration: CalibrationSet) -> None:
        self.path = session_dir / CALIBRATION_NAME
        self.calibration = calibration

    def __call__(self, record: Record) -> None:
        if isinstance(record, CalibrationMeasured):
            preset = PresetCalibration.model_validate(record.model_dump(include=set(PresetCalibration.model_fields)))
        elif isinstance(record, CalibrationChecked) and record.result == "ok" and record.calibration is not None:
            preset = PresetCalibration.model_validate(record.calibration)
        else:
            return
        self.calibration = self.calibration.with_preset(preset)
        self.calibration.save(self.path)


class TableWriter:
    """Rewrites the target tables (CSV, JSON, SerialEM navigator) after the plan and after every outcome."""

    def __init__(self, session_dir: Path, context: Any) -> None:
        self.session_dir = session_dir
        self.context = context
        #: the operator's navigator (bytes as read) and its map item, on a SerialEM map session
        self._navigator: tuple[bytes, Any] | None = None

    def __call__(self, record: Record) -> None:
        if isinstance(record, TargetsPlanned):
            # the record comes before the session adds a round's targets to its list: write them at once
            known = {t.target_id for t in self.context.targets}
            self.write([*self.context.targets, *(t for t in record.targets if t.target_id not in known)])
        elif isinstance(record, TargetFinished):
            self.write()

    def write(self, targets: list[TargetRecord] | None = None) -> None:
        """Write the tables from the session's targets (or `targets`) and outcomes now (and, on a SerialEM map,
        `targets_on_map.nav`)."""
        ctx = self.context
        planned = ctx.targets if targets is None else targets
        outputs.write_target_tables(self.session_dir, planned, ctx.results, ctx.calibration, ctx.atlas)
        if ctx.plan.area.serialem_map is not None:
            self._write_on_map(planned)

    def _write_on_map(self, planned: list[TargetRecord]) -> None:
        """`targets_on_map.nav` (`outputs.write_targets_on_map`) over the operator's navigator as it was read the
        first time; a navigator that cannot be read any more is logged, not fatal (the other tables stand)."""
        from drivers.formats.nav import NavFormatError, parse_nav

        source = self.context.plan.area.serialem_map
        assert source is not None
        try:
            if self._navigator is None:
                raw = Path(source.nav_path).read_bytes()
                items = parse_nav(raw.decode("utf-8", errors="replace"), where=source.nav_path)
                map_item = next(item for item in items if item.map_id == source.map_id)
                self._navigator = (raw, map_item)
            outputs.write_targets_on_map(self.session_dir, *self._navigator, planned, self.context.results)
        except (OSError, NavFormatError, StopIteration) as exc:
            logger.warning("targets_on_map.nav not written: %s (%s)", source.nav_path, exc)


class FileWriter:
    """Writes what steps hand to the output port: frames (TIFF with metadata), previews, atlas outputs."""

    def __init__(self, session_dir: Path) -> None:
        self.session_dir = session_dir

    def _path(self, relative_path: str) -> Path:
        path = self.session_dir / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def frame(self, relative_path: str, frame: Frame) -> str:
        """Write `frame` at `relative_path`; returns the path relative to the session folder."""
        path = write_frame_tiff(self._path(relative_path), frame)
        return str(Path(path).relative_to(self.session_dir))

    def previews(self, target_id: str, search: Frame | None, diffraction: Frame | None) -> dict[str, str]:
        """A target's PNG previews; kind -> relative path."""
        written = outputs.write_target_thumbnails(self.session_dir, target_id, search, diffraction)
        return {kind: str(Path(path).relative_to(self.session_dir)) for kind, path in written.items()}

    def atlas_outputs(
        self, atlas: Any, analysis: Any, decision: Any, targets: list[TargetRecord], folder: str = "atlas"
    ) -> dict[str, str]:
        """Heat map, masks, gallery and cluster table of the atlas in `folder`; kind -> relative path."""
        written = outputs.write_atlas_outputs(self.session_dir, atlas, analysis, decision, targets, folder)
        return {kind: str(Path(path).relative_to(self.session_dir)) for kind, path in written.items()}
