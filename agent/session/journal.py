"""The session journal: an append-only JSON-lines file that survives a crash at any instant.

Every line is one JSON object with at least `seq` (1, 2, ...), `type`, `time_utc` (ISO 8601) and
`microscope_time_s`. A line is written with a single `write` of the whole line, then flushed and
fsynced before `append` returns, so after a crash the file holds every entry that was acknowledged plus
at most one torn last line, which `read_journal` ignores (with a warning).

Every line is a typed record of `agent.session.records` (one pydantic model per `type`): `Journal.append`
takes a record (validated when it was made) and `read_records` validates every line it reads, naming the
line that does not fit. `read_journal` gives the raw dictionaries (for display).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.session.records import KNOWN_TYPES, AnyRecord, Record, parse_record

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"


class JournalError(Exception):
    """The journal cannot be written or is unreadable beyond a torn last line."""


def _json_default(value: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-serialisable."""
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot write {type(value).__name__} to the journal")


def read_journal(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete entries of a journal, in order. A torn last line (crash mid-write) is skipped.

    Raises `JournalError` if a line other than the last is not valid JSON (the file was damaged by
    something other than a crash).
    """
    journal_path = Path(path)
    if not journal_path.exists():
        return []
    raw_lines = journal_path.read_bytes().split(b"\n")
    entries: list[dict[str, Any]] = []
    for index, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("entry is not an object")
        except ValueError as exc:
            is_last = all(not rest.strip() for rest in raw_lines[index + 1 :])
            if is_last:
                logger.warning("%s: ignoring torn last line (%d bytes)", journal_path, len(raw))
                continue
            raise JournalError(f"{journal_path}: line {index + 1} is not valid JSON ({exc}); file is damaged") from exc
        entries.append(entry)
    return entries


def superseded_seqs(entries: list[dict[str, Any]]) -> set[int]:
    """The `seq` of every line a resume superseded. A `session` line with event `resume` names the checkpoint it
    continued from (`checkpoint_seq`, see `agent.session.restore`); the lines between that checkpoint and the
    resume belong to a step that was cut and done again, so their times and counts are not the session's."""
    superseded: set[int] = set()
    for entry in entries:
        checkpoint = entry.get("checkpoint_seq")
        if entry.get("type") == "session" and entry.get("event") == "resume" and isinstance(checkpoint, int):
            superseded.update(range(checkpoint + 1, int(entry.get("seq") or 0)))
    return superseded


def live_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`entries` without the lines a resume superseded (`superseded_seqs`)."""
    superseded = superseded_seqs(entries)
    return [e for e in entries if e.get("seq") not in superseded]


def read_records(path: str | os.PathLike[str]) -> list[AnyRecord]:
    """Every complete line of a journal as its typed record (see `read_journal` for torn lines).

    A line of a type this release does not know (written by a newer release) is skipped with a warning;
    a line of a known type that does not validate raises `JournalError` naming the line.
    """
    records = []
    for entry in read_journal(path):
        if entry.get("type") not in KNOWN_TYPES:
            logger.warning("%s: skipping entry seq %s of unknown type %r", path, entry.get("seq"), entry.get("type"))
            continue
        try:
            records.append(parse_record(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            raise JournalError(
                f"{path}: entry seq {entry.get('seq')} (type {entry.get('type')!r}) is not a valid journal record: "
                f"{where}: {first.get('msg')}"
            ) from None
    return records


class Journal:
    """Appends entries to `session_dir/journal.jsonl` (or `name`); thread-safe; resumes numbering after a restart.

    `clock_s` is a callable giving the session's microscope time, stamped on every entry.
    """

    def __init__(self, session_dir: str | os.PathLike[str], clock_s: Any = None, name: str = JOURNAL_NAME) -> None:
        self.path = Path(session_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._clock_s = clock_s
        self._truncate_torn_tail()
        existing = read_journal(self.path)
        self._seq = int(existing[-1]["seq"]) if existing else 0
        self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open for the session's lifetime

    def _truncate_torn_tail(self) -> None:
        """Cut a torn last line so that the next entry starts on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            logger.warning("%s: removing torn last line (%d bytes)", self.path, len(data) - cut)
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)
                handle.flush()
                os.fsync(handle.fileno())

    @property
    def seq(self) -> int:
        """Sequence number of the last entry written."""
        return self._seq

    def set_clock(self, clock_s: Any) -> None:
        """Use `clock_s()` (seconds of microscope time) to stamp entries from now on."""
        self._clock_s = clock_s

    def append(self, record: Record) -> dict[str, Any]:
        """Write one record durably (flush + fsync) and return the line written, envelope included.

        The envelope (`seq`, `time_utc`, `microscope_time_s` from the clock) comes first; a record with a
        `microscope_time_s` of its own (a target's outcome, the summary) keeps its own.
        """
        if not isinstance(record, Record):
            raise TypeError(f"a journal takes agent.session.records models, not {type(record).__name__}")
        fields = record.payload()
        with self._lock:
            if self._handle.closed:
                raise JournalError(f"{self.path}: journal is closed")
            microscope_time_s = float(self._clock_s()) if self._clock_s is not None else None
            entry = {
                "seq": self._seq + 1,
                "type": fields.pop("type"),
                "time_utc": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "microscope_time_s": microscope_time_s,
                **fields,
            }
            line = json.dumps(entry, default=_json_default, separators=(",", ":")).encode() + b"\n"
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._seq += 1
            return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry written so far (re-read from disk)."""
        return read_journal(self.path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries())

    def close(self) -> None:
        """Close the file; later `append` calls raise `JournalError`."""
        with self._lock:
            if not self._handle.closed:
                self._handle.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
