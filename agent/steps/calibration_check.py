"""The cheap check of a stored calibration: one test move, one phase correlation, a few seconds.

A stored image -> stage matrix A of a preset (`agent.steps.calibration_store`) is trusted for a session once
it predicts one known stage move: a reference frame at the site, the stage moved by d (both axes, from the
same side, so backlash is the same), one frame, and the image shift s measured by phase correlation near
the shift A predicts, -A^-1 d (`stage_calibration.displacement_near_px`). The check passes when
|s - (-A^-1 d)| <= max(5 % of |A^-1 d|, 1 um / pixel size) and the correlation peak is clear.

Why this tolerance:
- 5 % of the move is what a fresh measurement is allowed as misfit (`measure_preset`'s
  `max_residual_fraction`), about a 3 deg rotation or a 5 % scale error of A. A 5 % error of A puts a
  target seen at the edge of an atlas frame 2.5 % of that frame off, well inside the search frame that
  looks for it. An uncalibrated (nominal) matrix is off by the camera rotation, several degrees in the
  simulator (3-5 deg plus up to 1.5 per preset, 1-3 % scale), and fails where the move is long enough
  (on a 2048 px camera at every preset); so does a matrix whose camera has been rotated or whose
  magnification has changed since it was stored. Known limit: on a small search frame (below ~640 px,
  e.g. a 512 px or binned camera) the 1 um bound is more than 5 % of the longest move the field allows,
  and a rotation up to ~6 deg passes there (a 512 px session passes a nominal search matrix).
- 1 um bounds the stage's repeat error between the two positions: both frames carry one, so their
  difference has sqrt(2) times the stage's; the simulator's is 0.15 um per axis (`StageModel`), 0.21 um
  for the difference, and 1 um is 4.7 times that. At search magnification (0.04 um/px) that is 25 px;
  the move is made long enough for its 5 % to exceed this bound where the field allows, between 10 % and
  30 % of the field per axis (longer is slower; shorter leaves too little for a 5 % error to show).

What one move cannot see: an error of A that maps this one diagonal move to the right place (a shear
along the other diagonal). Camera rotation and magnification changes, what drifts in practice, are seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.steps.motion import approach_move
from agent.steps.stage_calibration import (
    CalibrationError,
    PresetCalibration,
    displacement_near_px,
    structure_isotropy,
)
from drivers.base import Microscope

#: Allowed error of the predicted shift, as a fraction of the shift (see the module docstring).
CHECK_TOLERANCE_FRACTION = 0.05
#: Bound on the stage's repeat error between the check's two positions, um.
STAGE_REPEAT_BOUND_UM = 1.0
#: The check move per axis, as fractions of the field of view.
MIN_MOVE_FRACTION = 0.10
MAX_MOVE_FRACTION = 0.30
#: Below this normalised correlation peak the frames did not register (as in `measure_preset`).
MIN_QUALITY = 0.05
#: Below this the site shows an edge, not a corner: a shift along the edge cannot be measured there.
MIN_ISOTROPY = 0.05


@dataclass(frozen=True)
class CheckResult:
    """The outcome of checking one preset's stored matrix."""

    preset: str
    passed: bool
    error_px: float | None = None
    tolerance_px: float | None = None
    shift_px: float | None = None
    quality: float | None = None
    reason: str = ""


def check_move_px(pixel_size_um: float, field_px: int) -> float:
    """The check move per axis, pixels: long enough that 5 % of the diagonal move exceeds the stage's
    repeat bound, within 10-30 % of the field."""
    wanted_px = STAGE_REPEAT_BOUND_UM / pixel_size_um / CHECK_TOLERANCE_FRACTION / math.sqrt(2.0)
    return float(np.clip(wanted_px, MIN_MOVE_FRACTION * field_px, MAX_MOVE_FRACTION * field_px))


def check_preset(
    microscope: Microscope,
    stored: PresetCalibration,
    *,
    exposure_s: float,
    stage_xy_um: tuple[float, float],
    approach_um: float = 0.0,
) -> CheckResult:
    """Check `stored` on `microscope` at `stage_xy_um` (see the module docstring): two frames, one move.

    Returns a failed `CheckResult` (with the reason) when the prediction misses, the correlation is weak,
    or the stage has no room for the move; raises `MicroscopeError` subclasses from the stage or camera.
    Leaves the stage at the moved position and the preset applied."""
    info = microscope.info()
    nominal = info.preset(stored.preset)
    microscope.set_preset(stored.preset)
    rows, cols = (n // nominal.binning for n in info.camera_shape_px)
    x0, y0 = stage_xy_um
    limits = microscope.stage_limits()
    room_um = min(limits.x_max_um - x0, limits.y_max_um - y0)
    move_um = min(check_move_px(nominal.pixel_size_um, min(rows, cols)) * nominal.pixel_size_um, room_um)
    if move_um < 3.0 * nominal.pixel_size_um:
        return CheckResult(stored.preset, passed=False, reason="too close to the stage limits for the check move")
    approach_move(microscope, x0, y0, approach_um, always=True)
    reference = np.asarray(microscope.acquire(exposure_s).image)
    sigma_px = max(4.0, min(rows, cols) / 40.0)
    isotropy = structure_isotropy(reference, sigma_px)
    if isotropy < MIN_ISOTROPY:
        reason = f"the site shows structure in one direction only (isotropy {isotropy:.3f})"
        return CheckResult(stored.preset, passed=False, reason=reason)
    # The move goes +x and +y: the stage arrives from the same side as at the reference (same backlash).
    microscope.move_stage(x_um=x0 + move_um, y_um=y0 + move_um, wait=True)
    moved = np.asarray(microscope.acquire(exposure_s).image)
    move = np.array([move_um, move_um])
    predicted = -np.linalg.solve(stored.matrix, move)
    shift_px = float(np.hypot(*predicted))
    tolerance_px = max(CHECK_TOLERANCE_FRACTION * shift_px, STAGE_REPEAT_BOUND_UM / nominal.pixel_size_um)
    try:
        measured, quality = displacement_near_px(reference, moved, predicted, sigma_px)
    except CalibrationError as exc:
        return CheckResult(stored.preset, passed=False, tolerance_px=tolerance_px, shift_px=shift_px, reason=str(exc))
    error_px = float(np.hypot(*(measured - predicted)))
    if quality < MIN_QUALITY:
        reason = f"correlation too weak (peak {quality:.3f} < {MIN_QUALITY})"
    elif error_px > tolerance_px:
        reason = f"the stored matrix misses the test move by {error_px:.1f} px (allowed {tolerance_px:.1f} px)"
    else:
        reason = f"the stored matrix predicts the test move within {error_px:.1f} px (allowed {tolerance_px:.1f} px)"
    return CheckResult(
        stored.preset,
        passed=quality >= MIN_QUALITY and error_px <= tolerance_px,
        error_px=error_px,
        tolerance_px=tolerance_px,
        shift_px=shift_px,
        quality=quality,
        reason=reason,
    )
