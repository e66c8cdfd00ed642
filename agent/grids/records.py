"""The run journal of a multi-grid run (`grids.jsonl` in the run folder): one typed record per event.

Written by `agent.session.journal.Journal` (durable, one line per record, stamped with `seq`, UTC and the
run's microscope time), read back by `read_run_records` for `--resume`. Each grid's sessions keep their own
journals in the grid's folder; this journal says which grid was loaded when, what the atlas pass found, how
the grids were ranked and which were screened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from agent.session.journal import JournalError, read_journal
from agent.session.records import Record

RUN_JOURNAL_NAME = "grids.jsonl"


class RunStarted(Record):
    """A multi-grid run started or resumed: its grid plan and the screening plan every grid's session uses."""

    type: Literal["run"] = "run"
    event: Literal["start", "resume"]
    run_plan: dict[str, Any]
    plan: dict[str, Any]
    instrument: str


class GridLoaded(Record):
    """A grid is on the stage: `load_s` microscope seconds of exchange (0 when it was on the stage already)."""

    type: Literal["grid_loaded"] = "grid_loaded"
    slot: int
    phase: Literal["atlas", "screen"]
    load_s: float


class GridSkipped(Record):
    """A slot that is not used further: empty, failed to load, or its atlas pass failed."""

    type: Literal["grid_skipped"] = "grid_skipped"
    slot: int
    label: str = Field(default="", description="the grid's name in the cassette's inventory, if it has one")
    phase: Literal["atlas", "screen"]
    reason: str
    session_s: float = Field(default=0.0, description="microscope seconds its session spent before it ended")
    load_s: float = Field(default=0.0, description="microscope seconds of a transfer that failed")


class GridAssessed(Record):
    """A grid's atlas pass finished: `assessment` is an `agent.grids.assess.GridAssessment`."""

    type: Literal["grid_assessed"] = "grid_assessed"
    slot: int
    folder: str
    assessment: dict[str, Any]


class GridsRanked(Record):
    """The grids in the order they are worth screening (`order`, best first) and the rule that ranked them."""

    type: Literal["grids_ranked"] = "grids_ranked"
    order: list[int]
    scores: dict[str, float]
    thick_ice: list[int] = Field(default_factory=list)
    rule: str


class GridScreening(Record):
    """A grid's screening session started (`event` start, with its budget) or ended (`done`, its summary)."""

    type: Literal["grid_screening"] = "grid_screening"
    event: Literal["start", "done"]
    slot: int
    folder: str
    budget_s: float
    summary: dict[str, Any] | None = None
    reason: str = Field(default="", description="done before its budget: why the grid was left for the next")


class RunFinished(Record):
    """The run ended: `state` done (budget spent or nothing worth screening left), aborted or failed."""

    type: Literal["run_end"] = "run_end"
    state: Literal["done", "aborted", "failed"]
    reason: str = ""


RunRecord = Annotated[
    RunStarted | GridLoaded | GridSkipped | GridAssessed | GridsRanked | GridScreening | RunFinished,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(RunRecord)


def read_run_records(run_dir: Path) -> list[Any]:
    """Every complete record of the run journal in `run_dir`, typed; `JournalError` naming a line that does not
    fit (a torn last line is ignored, as in every journal)."""
    path = Path(run_dir) / RUN_JOURNAL_NAME
    records = []
    for entry in read_journal(path):
        try:
            records.append(_ADAPTER.validate_python(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise JournalError(
                f"{path}: entry seq {entry.get('seq')} (type {entry.get('type')!r}) is not a run record: "
                f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}"
            ) from None
    return records


def is_run_folder(folder: Path) -> bool:
    """True when `folder` holds a multi-grid run (its run journal)."""
    return (Path(folder) / RUN_JOURNAL_NAME).is_file()


def spent_s(records: list[Any]) -> float:
    """Microscope seconds the run's journal accounts for: grid loads, finished atlas passes and screening
    sessions, and sessions that ended without a result. A session that is running (or was cut and not yet
    finished) is not in it."""
    total = 0.0
    for record in records:
        if isinstance(record, GridLoaded):
            total += record.load_s
        elif isinstance(record, GridAssessed):
            total += float(record.assessment.get("atlas_pass_s") or 0.0)
        elif isinstance(record, GridSkipped):
            total += record.session_s + record.load_s
        elif isinstance(record, GridScreening) and record.event == "done" and record.summary:
            total += float(record.summary.get("microscope_time_s") or 0.0)
    return total
