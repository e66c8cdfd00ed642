"""Where label memory keeps its records: one append-only JSON-lines file per memory folder (`labels.jsonl`).

Every record is one line written with a single `write`, flushed and fsync'ed; a crash can at worst
leave a torn last line, which reading skips (with a warning) and the next append steps over. Prune and
clear rewrite the file atomically. A lock file serialises writers of several processes on one machine.
Exports are one JSON document (`EXPORT_FORMAT`) holding every record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from agent.config import user_data_dir
from agent.prompts.label_records import LabelMemoryError, LabelRecord, utc_now
from drivers.formats.images import write_atomic

logger = logging.getLogger(__name__)

#: File name of the append log inside a memory folder.
LABELS_FILE_NAME = "labels.jsonl"
#: Environment variable that overrides the default memory folder.
LABELS_ENV_VAR = "CRYSTAL_LOCATOR_LABELS"
EXPORT_FORMAT = "crystal-locator-labels"
EXPORT_VERSION = 1
RecordT = TypeVar("RecordT", bound=BaseModel)


def default_labels_dir() -> Path:
    """The per-user memory folder: `$CRYSTAL_LOCATOR_LABELS`, else `$XDG_DATA_HOME/crystal-locator/labels`,
    else `~/.local/share/crystal-locator/labels`. Not created here."""
    return user_data_dir("labels", LABELS_ENV_VAR)


class LabelLog(Generic[RecordT]):
    """An append log of one memory folder (created if missing), read back with a cache that notices changes.

    `file_name` and `record_type` say which log: the cluster labels (`labels.jsonl`, `LabelRecord`, the
    default) or the visited objects' outcomes (`agent.prompts.object_records`). Safe for one writer thread
    per process and several processes on one machine (lock file).
    """

    def __init__(
        self, folder: Path, file_name: str = LABELS_FILE_NAME, record_type: type[RecordT] = LabelRecord  # type: ignore[assignment]
    ) -> None:
        self.folder = folder
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabelMemoryError(f"cannot create the label memory folder {self.folder}: {exc}") from exc
        if not self.folder.is_dir():
            raise LabelMemoryError(f"{self.folder} is not a folder; pass a folder for the label memory")
        self.path = self.folder / file_name
        self.record_type = record_type
        self._lock_path = self.folder / f".{Path(file_name).stem}.lock"
        #: (inode, size, mtime) of the file when `records()` last read it; None before or after a rewrite.
        self.cache_key: tuple[int, int, int] | None = None
        self._records: list[RecordT] = []
        #: Lines that could not be read at the last load (torn tail after a crash, or corrupt).
        self.skipped_lines = 0

    def records(self) -> list[RecordT]:
        """Every readable record, oldest first (read again only when the file changed)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self.cache_key, self.skipped_lines = [], None, 0
            return []
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key == self.cache_key:
            return self._records
        records, skipped = _parse_lines(self.path.read_bytes(), self.path, self.record_type)
        self._records, self.cache_key, self.skipped_lines = records, key, skipped
        return records

    def append(self, records: Sequence[RecordT]) -> list[RecordT]:
        """Append `records`, one line each, in one write; durable (flushed, fsync'ed) when this returns."""
        records = list(records)
        if not records:
            return []
        payload = b"".join(r.model_dump_json().encode() + b"\n" for r in records)
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size > 0:
                    with open(self.path, "rb") as handle:
                        handle.seek(size - 1)
                        if handle.read(1) != b"\n":  # a torn line from a crash: step over it
                            payload = b"\n" + payload
                _write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        logger.debug("label memory %s: appended %d record(s)", self.path, len(records))
        return records

    def rewrite(self, doomed: Callable[[RecordT], bool]) -> int:
        """Rewrite the file atomically without the records `doomed` says to remove; returns how many went.
        Unreadable lines are kept verbatim."""
        with self._locked():
            raw = self.path.read_bytes() if self.path.exists() else b""
            kept: list[bytes] = []
            removed = 0
            for line in raw.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    record = self.record_type.model_validate_json(line)
                except ValidationError:
                    kept.append(line)  # not ours to judge: keep unreadable lines verbatim
                    continue
                if doomed(record):
                    removed += 1
                else:
                    kept.append(line)
            write_atomic(self.path, b"".join(line + b"\n" for line in kept))
        self.cache_key = None
        logger.info("label memory %s: removed %d record(s)", self.path, removed)
        return removed

    def export(self, path: str | os.PathLike[str], extra: dict[str, list[Any]] | None = None) -> Path:
        """Write all records to one JSON file (atomically); `read_label_file` reads it back. `extra`: more lists
        of JSON-ready records under their own keys (the memory's object outcomes, `object_records`), which
        readers that do not know them ignore."""
        records = self.records()
        document = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_utc": utc_now().isoformat(),
            "records": [r.model_dump(mode="json") for r in records],
            **(extra or {}),
        }
        return write_atomic(path, json.dumps(document, indent=1).encode())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: one process at a time is the caller's job
            yield
            return
        with open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_label_file(path: str | os.PathLike[str]) -> list[LabelRecord]:
    """The records of an export (JSON) or of another memory's `labels.jsonl`; `LabelMemoryError` if unreadable."""
    return read_export(path, "records", LabelRecord)


def read_export(
    path: str | os.PathLike[str], key: str, record_type: type[RecordT]  # type: ignore[type-var]
) -> list[RecordT]:
    """The `key` records of an export (JSON; none when it has no such list), or every line of a `.jsonl` log of
    `record_type`; `LabelMemoryError` naming the file when it is unreadable or a record does not validate."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise LabelMemoryError(f"cannot read {source}: {exc}") from exc
    if source.suffix == ".jsonl":
        incoming, _ = _parse_lines(raw, source, record_type)
        return incoming
    try:
        document = json.loads(raw)
        if document.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {EXPORT_FORMAT!r}")
        if key != "records" and key not in document:
            return []
        return [record_type.model_validate(r) for r in document[key]]
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
        raise LabelMemoryError(f"{source} is not a label export: {exc}") from exc


def _parse_lines(
    raw: bytes, path: Path, record_type: type[RecordT] = LabelRecord  # type: ignore[assignment]
) -> tuple[list[RecordT], int]:
    lines = raw.split(b"\n")
    records: list[RecordT] = []
    skipped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(record_type.model_validate_json(line))
        except ValidationError as exc:
            _refuse_other_layout(line, path, number, record_type, exc)
            skipped += 1
            torn = number == len(lines)  # no newline after it: a write cut short by a crash
            logger.warning("label memory %s: skipping %s line %d", path, "torn last" if torn else "unreadable", number)
    return records, skipped


def _refuse_other_layout(line: bytes, path: Path, number: int, record_type: type[BaseModel], error: Exception) -> None:
    """Raise `LabelMemoryError` when `line` is a whole JSON record that this release cannot read (written by
    another release, or edited by hand): it is refused with the file, line and layout named, never skipped
    in silence. Lines that are not JSON objects (a torn write, garbage) return: the caller skips them."""
    try:
        document = json.loads(line)
    except ValueError:
        return
    if not isinstance(document, dict):
        return
    fields = record_type.model_fields
    layout = document.get("format", "none" if "format" in fields else None)
    wanted = fields["format"].default if "format" in fields else None
    which = f"record format {layout}" if layout is not None else "a record layout"
    reason = str(error).splitlines()[1:3]
    raise LabelMemoryError(
        f"{path} line {number}: {which} this release of crystal-locator cannot read "
        + (f"(it reads format {wanted}); " if wanted is not None else "; ")
        + "written by another release or edited by hand ("
        + "; ".join(r.strip() for r in reason)
        + "). Export it with the release that wrote it, or move the file away to start a new memory."
    )


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]
