"""Calibrating an instrument outside a session (`crystal-locator calibrate`): the calibrating step on a context
of its own, every preset measured (never checked), retried at the next site when a site shows too little.

No session folder: frames are not written and records are only kept in memory (the per-preset time comes
from them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agent.config import ScreeningPlan
from agent.session.outcomes import TargetRecord
from agent.session.records import CalibrationChecked, Record
from agent.steps.atlas import Atlas
from agent.steps.calibrate import calibrate
from agent.steps.context import SessionContext
from agent.steps.stage_calibration import CalibrationError, CalibrationSet
from drivers.base import Frame, Microscope

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstrumentCalibration:
    """The measured presets and the microscope time (s) each took, by preset."""

    calibration: CalibrationSet
    time_s: dict[str, float]


@dataclass
class _Records:
    """A `StepOutput` that keeps records in memory and writes no files."""

    records: list[Record] = field(default_factory=list)

    def record(self, record: Record) -> None:
        self.records.append(record)

    def save_frame(self, kind: str, relative_path: str, frame: Frame, target_id: str | None = None) -> str:
        return relative_path

    def save_target_previews(self, target_id: str, search: Frame, diffraction: Frame | None) -> dict[str, str]:
        return {}

    def save_atlas_outputs(
        self, atlas: Atlas, analysis: Any, decision: Any, targets: list[TargetRecord], folder: str = "atlas"
    ) -> None:
        return None


def calibrate_instrument(microscope: Microscope, plan: ScreeningPlan) -> InstrumentCalibration:
    """Measure every preset `plan` uses on `microscope` (see `agent.steps.calibrate.presets_to_calibrate`), at
    the sites a session would use, taking the next site after a `CalibrationError` (at most
    `plan.recovery.max_retries` times). Raises the last `CalibrationError`, or any other `MicroscopeError`."""
    info = microscope.info()
    output = _Records()
    base_s = float(microscope.microscope_time_s())
    ctx = SessionContext(
        plan=plan,
        microscope=microscope,
        info=info,
        session_id="calibrate",
        output=output,
        clock_s=lambda: float(microscope.microscope_time_s()) - base_s,
        calibration=CalibrationSet(instrument=info.name),
        recalibrate=True,
    )
    for attempt in range(plan.recovery.max_retries + 1):
        ctx.calibration_attempt = attempt
        try:
            calibrate(ctx)
            break
        except CalibrationError as exc:
            if attempt == plan.recovery.max_retries:
                raise
            logger.warning("calibration attempt %d failed (%s); trying the next site", attempt + 1, exc)
    time_s: dict[str, float] = {}
    for record in output.records:
        if isinstance(record, CalibrationChecked):
            time_s[record.preset] = record.time_s
    return InstrumentCalibration(calibration=ctx.calibration, time_s=time_s)
