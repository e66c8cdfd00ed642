"""Journal records: one pydantic model per record type, told apart by `type`, validated on write and read.

A journal line is a record plus its envelope (`seq`, `time_utc`, `microscope_time_s`, stamped by
`agent.session.journal.Journal`; a checkpoint (`is_checkpoint`) also carries `stage` and `optics_preset`,
stamped by the session's recorder). The runner and the steps emit records; the journal writer, the event
publisher and the file writers subscribe to them (`agent.session.writers`). Resume rebuilds a session's
context from these records alone (`agent.session.restore`).

Journals written by release 0.1.0 (before this module existed) hold the same fields and parse unchanged;
fields this release does not know are ignored (a newer release's additions), a missing or wrong field
is an error that names the line (`JournalError`).

| type | written when |
| --- | --- |
| `session` | a session starts (`event="start"`, with the plan) or resumes (`event="resume"`) |
| `transition` | the state machine enters a state |
| `calibration` | a preset's image -> stage matrix was measured |
| `calibration_check` | what became of a preset's calibration: stored one checked ok, check failed, or measured |
| `artifact` | a file was written (path relative to the session folder) |
| `mapping` | the atlas montage was planned (`event="plan"`) or assembled (`event="done"`) |
| `locating` | the atlas was clustered |
| `prompt` | the operator was asked |
| `labelling` | the crystal clusters were decided |
| `targets` | the planned target list |
| `target` | one target's outcome |
| `fault` | a step raised (with the action the error table chose) |
| `recovery` | what the runner did about a fault |
| `control` | pause / resume |
| `budget` | the time budget ended the target list |
| `summary` | the session's final numbers |
| `alert` | an alert went out by webhook or e-mail, or could not (`agent.alerts`) |
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from agent.session.outcomes import SessionSummary, TargetRecord, TargetResult
from drivers.base import StagePosition

_RECORD = ConfigDict(frozen=True, extra="ignore")


class Record(BaseModel):
    """Base of every journal record: the envelope fields, filled in by the journal when it is written."""

    model_config = _RECORD

    seq: int | None = None
    time_utc: str | None = None
    microscope_time_s: float | None = None
    stage: StagePosition | None = Field(default=None, description="checkpoints: the stage position when written")
    optics_preset: str | None = Field(default=None, description="checkpoints: the active preset when written")

    def payload(self) -> dict[str, Any]:
        """The record's own fields as JSON-ready data, without the envelope (a record whose model has a
        `microscope_time_s` of its own, a target's outcome or the summary, keeps it); the checkpoint stamps
        only when set."""
        data = self.model_dump(mode="json", exclude={"seq", "time_utc"})
        for key in ("microscope_time_s", "stage", "optics_preset"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class SessionStarted(Record):
    """A new session; `plan` is the frozen plan as saved in `plan.json`."""

    type: Literal["session"] = "session"
    event: Literal["start", "resume"]
    session: str
    plan: dict[str, Any] | None = None
    instrument: str | None = None
    state: str | None = Field(default=None, description="resume: the state the session continues from")
    finished_targets: list[str] = Field(default_factory=list)
    checkpoint_seq: int | None = Field(
        default=None,
        description="resume: the journal line the session continues from; the lines after it, up to this one, "
        "are superseded (their work is done again)",
    )
    discarded_time_s: float | None = Field(
        default=None,
        description="resume: microscope seconds the interrupted run spent after the checkpoint (at least up to its "
        "last journal line): done again, counted once in the session's time",
    )


class Transition(Record):
    """The state machine entered `state`."""

    type: Literal["transition"] = "transition"
    state: str


class CalibrationMeasured(Record):
    """One preset's measured image -> stage matrix (the fields of `agent.steps.stage_calibration.PresetCalibration`)."""

    type: Literal["calibration"] = "calibration"
    preset: str
    matrix_um_per_px: tuple[tuple[float, float], tuple[float, float]]
    nominal_pixel_size_um: float
    rotation_deg: float
    scale_um_per_px: tuple[float, float]
    flipped: bool
    residual_px: float
    shift_um: float
    stage_xy_um: tuple[float, float]
    measured_utc: str


class CalibrationChecked(Record):
    """What the calibrating step did with one preset (one record per preset, after any `calibration`):
    `ok`: the stored matrix passed its check move and is used (`calibration` holds it, for resume);
    `failed`: the check missed (`error_px` over `tolerance_px`, or `reason`) and the preset was measured
    again; `measured`: measured without a check (`reason`: nothing stored, the preset changed, or
    `--recalibrate`). `time_s` is the microscope time spent on the preset (check and measurement)."""

    type: Literal["calibration_check"] = "calibration_check"
    preset: str
    result: Literal["ok", "failed", "measured"]
    reason: str = ""
    error_px: float | None = None
    tolerance_px: float | None = None
    shift_px: float | None = None
    time_s: float = 0.0
    stored_utc: str | None = Field(default=None, description="when the stored matrix was measured")
    calibration: dict[str, Any] | None = Field(default=None, description="ok: the stored preset calibration used")


class ArtifactWritten(Record):
    """A file was written; `path` is relative to the session folder."""

    type: Literal["artifact"] = "artifact"
    kind: str
    path: str
    target_id: str | None = None


class MappingPlanned(Record):
    """The atlas montage's stage box (x_min, x_max, y_min, y_max um), tile count and chosen squares."""

    type: Literal["mapping"] = "mapping"
    event: Literal["plan", "done"]
    round: int = Field(default=1, ge=1, description="which round of mapping (sessions sized by a budget map several)")
    box_um: tuple[float, float, float, float]
    tiles: int | None = None
    squares: list[dict[str, float]] = Field(default_factory=list)
    path: str | None = Field(default=None, description="done: the atlas TIFF, relative to the session folder")
    shape_px: tuple[int, int] | None = None


class ClusterCount(BaseModel):
    """One cluster of the atlas analysis: its id, cells and fraction of the unmasked cells."""

    model_config = _RECORD

    cluster_id: int
    n_cells: int
    fraction: float


class Located(Record):
    """The atlas was clustered: cluster sizes and the locator's suggested crystal clusters."""

    type: Literal["locating"] = "locating"
    clusters: list[ClusterCount]
    suggested: list[int]
    rule: str


class PromptAsked(Record):
    """The operator was asked which clusters hold crystals; `answered_by` is None if nobody answered."""

    type: Literal["prompt"] = "prompt"
    prompt_id: str | None = None
    answered_by: str | None = None


class Labelled(Record):
    """Which clusters hold crystals (and which are mixed), and where each cluster's label came from."""

    type: Literal["labelling"] = "labelling"
    crystal_clusters: list[int]
    mixed_clusters: list[int] = Field(default_factory=list)
    sources: dict[int, str] = Field(default_factory=dict)
    confidences: dict[int, float] = Field(default_factory=dict)
    prompt_id: str | None = None
    answered_by: str | None = None
    asked: bool = False
    notes: list[str] = Field(default_factory=list)


class TargetsPlanned(Record):
    """The targets planned in one round of mapping, in visiting order (a session's targets are those of all
    its rounds)."""

    type: Literal["targets"] = "targets"
    targets: list[TargetRecord]
    round: int = Field(default=1, ge=1)


class RankedTarget(BaseModel):
    """One pending target's place after a re-ranking: its id and the classifier's probability."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_id: str
    p_diffract: float | None = Field(default=None, ge=0.0, le=1.0, description="None: no features to rank by")


class TargetsRanked(Record):
    """The crystal classifier was refit during the session (after `after_outcomes` of its outcomes) and the
    targets not yet visited were re-ranked: `targets` in their new visiting order. Resume applies it as
    recorded."""

    type: Literal["ranked"] = "ranked"
    after_outcomes: int = Field(ge=0)
    classifier: str = ""
    targets: list[RankedTarget]


class TargetFinished(TargetResult, Record):
    """One target's outcome (the fields of `agent.session.outcomes.TargetResult`)."""

    type: Literal["target"] = "target"

    def result(self) -> TargetResult:
        """The outcome as a plain `TargetResult`."""
        return TargetResult.model_validate(self.model_dump(include=set(TargetResult.model_fields)))


class FaultRaised(Record):
    """A step raised; `action` is what the runner's error table chose (see `agent.session.policy`)."""

    type: Literal["fault"] = "fault"
    state: str
    error: str
    message: str
    target_id: str | None = None
    action: str | None = None
    traceback: str | None = Field(default=None, description="only for errors nobody expected")


class RecoveryTaken(Record):
    """What the runner did about a fault: retry, skip_target, pause, give_up."""

    type: Literal["recovery"] = "recovery"
    action: str
    state: str | None = None
    attempt: int | None = None
    target_id: str | None = None
    reason: str | None = None


class ControlApplied(Record):
    """The session was paused (with the state it will resume) or resumed."""

    type: Literal["control"] = "control"
    command: Literal["pause", "resume"]
    resume_to: str | None = None
    reason: str | None = None


class BudgetSpent(Record):
    """The time budget ended the target list."""

    type: Literal["budget"] = "budget"
    message: str


class BridgeRestarted(Record):
    """The bridge server answered with a new server id: it restarted, and the microscope behind it may have
    been reset (its stage, optics or image shift); the session goes on, re-reading what it needs."""

    type: Literal["bridge_restart"] = "bridge_restart"
    endpoint: str
    old_server_id: str | None = None
    new_server_id: str


class AlertSent(Record):
    """An alert (`kind`: end, failure, pause, no_diffraction) went out on `channel` (webhook, email), or could
    not after `attempts` tries (`error`, without secrets); written by `agent.alerts.monitor`."""

    type: Literal["alert"] = "alert"
    kind: str
    channel: str
    ok: bool
    attempts: int = 0
    status: int | None = None
    error: str = ""


class SummaryWritten(SessionSummary, Record):
    """The final summary (the fields of `agent.session.outcomes.SessionSummary`, which allows extra scores)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: Literal["summary"] = "summary"


AnyRecord = Annotated[
    SessionStarted
    | Transition
    | CalibrationMeasured
    | CalibrationChecked
    | ArtifactWritten
    | MappingPlanned
    | Located
    | PromptAsked
    | Labelled
    | TargetsPlanned
    | TargetsRanked
    | TargetFinished
    | FaultRaised
    | RecoveryTaken
    | ControlApplied
    | BudgetSpent
    | BridgeRestarted
    | AlertSent
    | SummaryWritten,
    Field(discriminator="type"),
]

RECORD_ADAPTER: TypeAdapter[AnyRecord] = TypeAdapter(AnyRecord)

#: The `type` of every record this release reads.
KNOWN_TYPES: frozenset[str] = frozenset(
    model.model_fields["type"].default for model in get_args(get_args(AnyRecord)[0])
)


def is_checkpoint(record: Record) -> bool:
    """True for a record whose result a resumed session keeps: the session's start, a measured or checked
    calibration, the overview image, the assembled atlas, the labelling decision, the planned targets, a
    re-ranking of the targets left, a target's outcome.

    `agent.session.restore` continues from the last one; the session stamps them with the stage position and
    the active preset (`stage`, `optics_preset`) so that a simulator can be restarted where the session was.
    A new record type whose result resume keeps must be listed here."""
    if isinstance(record, ArtifactWritten):
        return record.kind == "overview"
    if isinstance(record, MappingPlanned):
        return record.event == "done"
    if isinstance(record, SessionStarted):
        return record.event == "start"
    return isinstance(
        record, CalibrationMeasured | CalibrationChecked | Labelled | TargetsPlanned | TargetsRanked | TargetFinished
    )


def parse_record(entry: dict[str, Any]) -> AnyRecord:
    """The typed record of one journal line; raises `pydantic.ValidationError` if it does not fit."""
    return RECORD_ADAPTER.validate_python(entry)
