"""Resume: rebuild a session's context from its journal records and the files they name.

The records say how far the session got: measured calibrations, the overview image, each round's atlas
(`mapping` done, its TIFF), the labelling decision, the planned targets of every round and every finished
target's outcome. The atlas
analysis is recomputed from the atlas TIFF (deterministic for the plan's settings). The session continues at
the first step whose result is missing: `calibrating`, `locating`, `targeting`, or `moving` to the first
unfinished target (`done` when none is left). Finished targets are never visited again. Journals written by
release 0.1.0 resume the same way (their lines are the same records).

**The checkpoint.** Those records are the checkpoints (`agent.session.records.is_checkpoint`); the session
resumes from the last one. Everything journalled after it belongs to a step that was cut and is done again
from its start, so those lines are superseded: restore replays the journal only up to the checkpoint (the
prompts, faults and state times counted after it are not counted twice), and the `session`/`resume` record
names the checkpoint (`checkpoint_seq`) so that a later resume skips the superseded lines too. Between a
checkpoint and the start of the next step nothing touches the microscope, so the checkpoint's stamps are
the state that step started from: its microscope time, and (written since issue 20) the stage position and
the active preset. `resume_point(folder)` returns them so that whoever makes the microscope can start a
simulator there (`crystal-locator screen --resume` does); a real stage simply stays where it is.

**Microscope time.** The resumed session's clock restarts at the checkpoint's microscope time, not at the
last time the interrupted run journalled. Redoing the cut step costs microscope time again, and on a
simulator started at the checkpoint it costs exactly what it cost the first time, so a session killed at
any moment and resumed reports the same `microscope_time_s` (and time per state, and every other number)
as an uninterrupted run: the summary counts each step of the session once. The time the interrupted run
spent after its checkpoint, work that was lost and redone, is not hidden: the resume record carries it as
`discarded_time_s`. (On a real microscope that time was really spent; it is reported there, not added to
the session's figures, which describe the session as it would have run without the crash.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import PLAN_NAME, PlanError, load_plan
from agent.locate.analysis import analyse
from agent.prompts.policy import LabellingDecision
from agent.session.journal import JOURNAL_NAME, JournalError, read_records, superseded_seqs
from agent.session.records import (
    AnyRecord,
    ArtifactWritten,
    CalibrationChecked,
    CalibrationMeasured,
    FaultRaised,
    Labelled,
    MappingPlanned,
    PromptAsked,
    SessionStarted,
    TargetFinished,
    TargetsPlanned,
    TargetsRanked,
    is_checkpoint,
)
from agent.steps import learn
from agent.steps.atlas import Atlas, frame_atlas
from agent.steps.context import SearchField
from agent.steps.stage_calibration import CALIBRATION_NAME, CalibrationSet, PresetCalibration
from drivers.base import Microscope, StagePosition
from drivers.formats.images import ImageFormatError, read_frame_tiff

if TYPE_CHECKING:
    from agent.session.screening import ScreeningSession


#: Artifact kinds of the frames a session takes (previews, maps and tables are not frames).
FRAME_KINDS = frozenset({"overview", "atlas", "search", "centred", "diffraction"})


@dataclass(frozen=True)
class ResumePoint:
    """Where a session resumes: its checkpoint record's `seq`, its microscope time (s), the stage position and
    active preset stamped on it (None in journals older than issue 20), and the last microscope time the
    interrupted run journalled (s)."""

    checkpoint_seq: int
    microscope_time_s: float
    stage: StagePosition | None
    optics_preset: str | None
    last_time_s: float
    #: True when the last frame before the checkpoint was a diffraction snapshot: a driver may have left the
    #: optics in diffraction (`drivers.base.Microscope.acquire_diffraction`), and a restarted simulator must too.
    in_diffraction: bool = False

    @property
    def discarded_time_s(self) -> float:
        """Microscope seconds journalled after the checkpoint: work that is done again."""
        return max(0.0, self.last_time_s - self.microscope_time_s)


def live_records(records: list[AnyRecord]) -> list[AnyRecord]:
    """`records` without the lines an earlier resume superseded (those between its checkpoint and itself)."""
    resumes = [r.model_dump(include={"type", "event", "seq", "checkpoint_seq"}) for r in records if r.type == "session"]
    superseded = superseded_seqs(resumes)
    return [r for r in records if r.seq is None or r.seq not in superseded]


def checkpoint_index(records: list[AnyRecord]) -> int:
    """Index in `records` (live records) of the last checkpoint; 0 when there is none (resume from the start)."""
    return max((i for i, r in enumerate(records) if is_checkpoint(r)), default=0)


def find_resume_point(records: list[AnyRecord]) -> ResumePoint:
    """The checkpoint a session with these journal records (non-empty) resumes from."""
    live = live_records(records)
    index = checkpoint_index(live)
    checkpoint = live[index]
    frames = [r.kind for r in live[: index + 1] if isinstance(r, ArtifactWritten) and r.kind in FRAME_KINDS]
    return ResumePoint(
        checkpoint_seq=int(checkpoint.seq or 0),
        microscope_time_s=float(checkpoint.microscope_time_s or 0.0),
        stage=checkpoint.stage,
        optics_preset=checkpoint.optics_preset,
        last_time_s=float(max((r.microscope_time_s or 0.0) for r in live)),
        in_diffraction=bool(frames) and frames[-1] == "diffraction",
    )


def resume_point(folder: Path) -> ResumePoint | None:
    """Where the session in `folder` would resume (None when its journal is missing, empty or unreadable;
    `resume_session` then says what is wrong)."""
    try:
        records = read_records(Path(folder) / JOURNAL_NAME)
    except JournalError:
        return None
    return find_resume_point(records) if records else None


def resume_session(
    cls: type[ScreeningSession], microscope: Microscope, folder: Path, **kwargs: Any
) -> ScreeningSession:
    """A `ScreeningSession` of `cls` rebuilt from `folder`, in the state to continue from.

    Raises `SessionError` when the folder is not a session, its plan or journal cannot be read, or a file
    the journal names is missing or damaged."""
    from agent.session.screening import SessionError

    try:
        records = read_records(folder / JOURNAL_NAME)
    except JournalError as exc:
        raise SessionError(f"{folder}: cannot resume: {exc}") from exc
    if not (folder / PLAN_NAME).exists() or not records:
        raise SessionError(f"{folder}: not a screening session folder (no {PLAN_NAME} or empty journal)")
    point = find_resume_point(records)
    live = live_records(records)
    replay = live[: checkpoint_index(live) + 1]
    try:
        plan = load_plan(folder / PLAN_NAME)
        calibration = _calibration(folder, replay)
    except (PlanError, ValueError) as exc:
        raise SessionError(f"{folder}: cannot resume: {exc}") from exc
    session = cls(microscope, plan, folder, calibration=calibration, **kwargs)
    _continue_clock(session, point)
    session._wall_before_s = earlier_wall_s(records)
    try:
        state = _restore(session, replay)
    except (OSError, ImageFormatError) as exc:
        raise SessionError(
            f"{folder}: cannot resume: a file the journal names is missing or damaged ({exc})"
        ) from exc
    resumed = SessionStarted(
        event="resume",
        session=session.session_id,
        state=state,
        finished_targets=sorted(session.results),
        checkpoint_seq=point.checkpoint_seq,
        discarded_time_s=round(point.discarded_time_s, 6),
    )
    session.record(resumed)
    session.runner.set_state(state)
    return session


def _calibration(folder: Path, records: list[AnyRecord]) -> CalibrationSet | None:
    """`calibration.json` if the session wrote one, with the presets its journal recorded over it (None if
    neither has any). The journal line of a preset is written before `calibration.json`, so a kill between
    the two leaves the preset in the journal only; it is kept all the same (it was a checkpoint)."""
    saved = CalibrationSet.load(folder / CALIBRATION_NAME) if (folder / CALIBRATION_NAME).exists() else None
    settled = [
        r
        for r in records
        if isinstance(r, CalibrationMeasured) or (isinstance(r, CalibrationChecked) and r.calibration is not None)
    ]
    instrument = next((r.instrument for r in records if isinstance(r, SessionStarted) and r.instrument), None)
    if not settled or (instrument is None and saved is None):
        return saved
    calibration = saved if saved is not None else CalibrationSet(instrument=str(instrument))
    for record in settled:
        if isinstance(record, CalibrationChecked):  # a stored preset whose check passed
            fields = dict(record.calibration or {})
        else:
            fields = record.model_dump(include=set(PresetCalibration.model_fields))
        calibration = calibration.with_preset(PresetCalibration.model_validate(fields))
    return calibration


def earlier_wall_s(records: list[AnyRecord]) -> float:
    """Real seconds the session ran before this resume: each part (from its start or resume record to its last
    line, by `time_utc`) summed; the time between parts, when nothing ran, is not counted."""
    total_s = 0.0
    first: datetime | None = None
    last: datetime | None = None
    for record in records:
        if record.time_utc is None:
            continue
        now = datetime.fromisoformat(record.time_utc)
        if isinstance(record, SessionStarted) and record.event == "resume" and first is not None and last is not None:
            total_s += (last - first).total_seconds()
            first = None
        first = first or now
        last = now
    if first is not None and last is not None:
        total_s += (last - first).total_seconds()
    return max(0.0, total_s)


def _continue_clock(session: ScreeningSession, point: ResumePoint) -> None:
    """The session's clock continues at the checkpoint's microscope time (see the module docstring). A
    microscope whose own clock already reads that time (a simulator started there) is used as it is."""
    now_s = float(session.microscope.microscope_time_s())
    if now_s == point.microscope_time_s:
        session._clock_offset_s, session._clock_base_s = 0.0, 0.0
    else:
        session._clock_offset_s, session._clock_base_s = point.microscope_time_s, now_s


def _restore(session: ScreeningSession, records: list[AnyRecord]) -> str:
    """Fill `session`'s context from `records` (the live records up to the checkpoint); returns the state
    to continue from."""
    ctx = session.ctx
    mapped: MappingPlanned | None = None
    mapping_started_s = 0.0
    planned_this_round = False
    overview_kept = False
    search_image: ArtifactWritten | None = None
    for record in records:
        session.state_times(record)
        if isinstance(record, MappingPlanned) and record.event == "plan":
            mapping_started_s = float(record.microscope_time_s or 0.0)
        elif isinstance(record, MappingPlanned) and record.event == "done":
            mapped, planned_this_round, ctx.decision = record, False, None
            ctx.map_boxes_um.append(record.box_um)
            ctx.last_mapping_s = float(record.microscope_time_s or 0.0) - mapping_started_s
        elif isinstance(record, ArtifactWritten) and record.kind == "overview":
            overview_kept = True
        elif isinstance(record, ArtifactWritten) and record.kind in ("search", "centred"):
            search_image = record
        elif isinstance(record, PromptAsked):
            ctx.prompts += 1
        elif isinstance(record, FaultRaised):
            session.runner.faults += 1
        elif isinstance(record, Labelled):
            ctx.decision = _decision(record)
        elif isinstance(record, TargetsPlanned):
            ctx.targets.extend(record.targets)
            planned_this_round = True
        elif isinstance(record, TargetsRanked):
            learn.apply_ranking(ctx, record)
        elif isinstance(record, SessionStarted) and record.event == "start" and record.time_utc:
            ctx.started_utc = datetime.fromisoformat(record.time_utc)
        elif isinstance(record, TargetFinished):
            ctx.results[record.target_id] = record.result()
    ctx.rounds = len(ctx.map_boxes_um)
    if mapped is not None and mapped.path is not None:
        ctx.atlas = Atlas.from_frame(read_frame_tiff(session.session_dir / mapped.path))
        ctx.map_box_um = mapped.box_um
    overview_path = session.session_dir / "overview.tif"
    if overview_kept and overview_path.exists() and session.plan.presets.overview in ctx.calibration.presets:
        matrix = ctx.calibration.matrix(session.plan.presets.overview)
        ctx.overview = frame_atlas(read_frame_tiff(overview_path), matrix)
    if ctx.atlas is not None and (ctx.decision is not None or planned_this_round):
        ctx.analysis = analyse(ctx.atlas.image, session.plan.locate)
    if planned_this_round:
        ctx.field = _search_field(session, search_image, records[-1].stage if records else None)
        return {"next_target": "moving", "map_more": "mapping"}.get(session.engine.advance(), "done")
    if ctx.decision is not None:
        return "targeting"
    if ctx.atlas is not None:
        return "locating"
    return "calibrating"


def _search_field(
    session: ScreeningSession, image: ArtifactWritten | None, stage: StagePosition | None
) -> SearchField | None:
    """The search image the stage sat on at the checkpoint (`ctx.field`), when the session reaches targets by
    image shift and the checkpoint's stage is where that image was taken: the resumed run then visits the
    targets in that field as the interrupted one would have."""
    if image is None or stage is None or session.ctx.image_shift_limit_um() <= 0:
        return None
    frame = read_frame_tiff(session.session_dir / image.path)
    taken_at = frame.metadata.stage
    if abs(taken_at.x_um - stage.x_um) > 1e-6 or abs(taken_at.y_um - stage.y_um) > 1e-6:
        return None
    return SearchField(frame=frame, path=image.path)


def _decision(record: Labelled) -> LabellingDecision:
    """The labelling decision as it was recorded."""
    return LabellingDecision(
        crystal_clusters=tuple(record.crystal_clusters),
        mixed_clusters=tuple(record.mixed_clusters),
        sources=dict(record.sources),
        confidences=dict(record.confidences),
        prompt_id=record.prompt_id,
        answered_by=record.answered_by,
        asked=record.asked,
        notes=list(record.notes),
    )
