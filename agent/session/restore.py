"""Resume: rebuild a session's context from its journal records and the files they name.

The records say how far the session got: measured calibrations, the atlas (`mapping` done, its TIFF), the
labelling decision, the planned targets and every finished target's outcome. The atlas analysis is
recomputed from the atlas TIFF (deterministic for the plan's settings). The session continues at the first
step whose result is missing: `calibrating`, `locating`, `targeting`, or `moving` to the first unfinished
target (`done` when none is left). Finished targets are never visited again. Journals written by release
0.1.0 resume the same way (their lines are the same records).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import PLAN_NAME, PlanError, load_plan
from agent.locate.analysis import analyse
from agent.prompts.policy import LabellingDecision
from agent.session.journal import JOURNAL_NAME, JournalError, read_records
from agent.session.records import (
    AnyRecord,
    CalibrationMeasured,
    FaultRaised,
    Labelled,
    MappingPlanned,
    PromptAsked,
    SessionStarted,
    TargetFinished,
    TargetsPlanned,
)
from agent.steps.atlas import Atlas, frame_atlas
from agent.steps.stage_calibration import CALIBRATION_NAME, CalibrationSet, PresetCalibration
from drivers.base import Microscope
from drivers.formats.images import ImageFormatError, read_frame_tiff

if TYPE_CHECKING:
    from agent.session.screening import ScreeningSession


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
    try:
        plan = load_plan(folder / PLAN_NAME)
        calibration = _calibration(folder, records)
    except (PlanError, ValueError) as exc:
        raise SessionError(f"{folder}: cannot resume: {exc}") from exc
    session = cls(microscope, plan, folder, calibration=calibration, **kwargs)
    try:
        state = _restore(session, records)
    except (OSError, ImageFormatError) as exc:
        raise SessionError(
            f"{folder}: cannot resume: a file the journal names is missing or damaged ({exc})"
        ) from exc
    resumed = SessionStarted(
        event="resume", session=session.session_id, state=state, finished_targets=sorted(session.results)
    )
    session.record(resumed)
    session.runner.set_state(state)
    return session


def _calibration(folder: Path, records: list[AnyRecord]) -> CalibrationSet | None:
    """`calibration.json` if the session wrote one, else the presets its journal recorded (None if none)."""
    if (folder / CALIBRATION_NAME).exists():
        return CalibrationSet.load(folder / CALIBRATION_NAME)
    measured = [r for r in records if isinstance(r, CalibrationMeasured)]
    instrument = next((r.instrument for r in records if isinstance(r, SessionStarted) and r.instrument), None)
    if not measured or instrument is None:
        return None
    calibration = CalibrationSet(instrument=instrument)
    for record in measured:
        fields = record.model_dump(include=set(PresetCalibration.model_fields))
        calibration = calibration.with_preset(PresetCalibration.model_validate(fields))
    return calibration


def _restore(session: ScreeningSession, records: list[AnyRecord]) -> str:
    """Fill `session`'s context from `records`; returns the state to continue from."""
    ctx = session.ctx
    session._clock_offset_s = float(max((r.microscope_time_s or 0.0) for r in records))
    session._clock_base_s = float(session.microscope.microscope_time_s())
    mapped: MappingPlanned | None = None
    planned: TargetsPlanned | None = None
    for record in records:
        session.state_times(record)
        if isinstance(record, MappingPlanned) and record.event == "done":
            mapped = record
        elif isinstance(record, PromptAsked):
            ctx.prompts += 1
        elif isinstance(record, FaultRaised):
            session.runner.faults += 1
        elif isinstance(record, Labelled):
            ctx.decision = _decision(record)
        elif isinstance(record, TargetsPlanned):
            planned = record
        elif isinstance(record, TargetFinished):
            ctx.results[record.target_id] = record.result()
    if planned is not None:
        ctx.targets = list(planned.targets)
    if mapped is not None and mapped.path is not None:
        ctx.atlas = Atlas.from_frame(read_frame_tiff(session.session_dir / mapped.path))
        ctx.map_box_um = mapped.box_um
    overview_path = session.session_dir / "overview.tif"
    if overview_path.exists() and session.plan.presets.overview in ctx.calibration.presets:
        matrix = ctx.calibration.matrix(session.plan.presets.overview)
        ctx.overview = frame_atlas(read_frame_tiff(overview_path), matrix)
    if ctx.atlas is not None and (ctx.decision is not None or planned is not None):
        ctx.analysis = analyse(ctx.atlas.image, session.plan.locate)
    if planned is not None:
        return "moving" if session.engine.advance() == "next_target" else "done"
    if ctx.decision is not None:
        return "targeting"
    if ctx.atlas is not None:
        return "locating"
    return "calibrating"


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
