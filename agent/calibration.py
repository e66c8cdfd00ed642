"""Image -> stage calibration: measure the matrix A of each optics preset on the instrument.

Convention (drivers.base): the specimen point under pixel p = (col_px, row_px) of a frame taken with the
stage at S is `S + A @ (p - image_centre_px(shape))`. Cameras are rotated, scaled and sometimes flipped
relative to the stage, differently at each magnification, so A is measured, never assumed:

1. acquire a reference frame at S, then frames at S + d1 and S + d2 (d1 along x, d2 along y, each about a
   quarter of the field of view), every position approached from the same side so backlash is the same;
2. phase-correlate each against the reference (scikit-image, sub-pixel): moving the stage by d moves the
   image content by s = -A^-1 d pixels, so A = -[d1 d2] [s1 s2]^-1;
3. check with a diagonal move d1 + d2 that the prediction holds (residual in pixels), and that the scale
   is within a factor 1.5 of the preset's nominal pixel size; otherwise raise `CalibrationError`.

Images are high-pass filtered before correlation, because uneven illumination, hot pixels and a data bar
are fixed to the camera and would otherwise pull the correlation peak to zero shift.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from agent.motion import approach_move
from drivers.base import Microscope, MicroscopeError
from drivers.formats.images import write_atomic

logger = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration.json"


class CalibrationError(MicroscopeError):
    """A calibration measurement failed or gave an implausible matrix (too little texture, a jump)."""


class PresetCalibration(BaseModel):
    """The measured image -> stage matrix of one optics preset, with how well it was measured."""

    model_config = ConfigDict(frozen=True)

    preset: str
    matrix_um_per_px: tuple[tuple[float, float], tuple[float, float]]
    nominal_pixel_size_um: float
    rotation_deg: float = Field(description="angle of the camera's +col axis in stage coordinates")
    scale_um_per_px: tuple[float, float] = Field(description="lengths of A's columns (col, row axes)")
    flipped: bool = Field(description="True if camera and stage have opposite handedness")
    residual_px: float = Field(description="check-move prediction error, pixels")
    shift_um: float
    stage_xy_um: tuple[float, float]
    measured_utc: str

    @property
    def matrix(self) -> np.ndarray:
        """A as a (2, 2) float64 array, um per pixel."""
        return np.asarray(self.matrix_um_per_px, dtype=np.float64)


class CalibrationSet(BaseModel):
    """Calibrations of several presets of one instrument; saved as `calibration.json`."""

    model_config = ConfigDict(frozen=True)

    instrument: str
    presets: dict[str, PresetCalibration] = Field(default_factory=dict)

    def matrix(self, preset: str) -> np.ndarray:
        """A of `preset`; raises KeyError with a clear message if it was not calibrated."""
        try:
            return self.presets[preset].matrix
        except KeyError:
            raise KeyError(f"preset {preset!r} is not calibrated (have: {sorted(self.presets)})") from None

    def with_preset(self, calibration: PresetCalibration) -> CalibrationSet:
        """A copy with `calibration` added or replaced."""
        return CalibrationSet(instrument=self.instrument, presets={**self.presets, calibration.preset: calibration})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically as JSON."""
        return write_atomic(path, self.model_dump_json(indent=2).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationSet:
        """Read a file written by `save`; raises ValueError with the file name if it is not one."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a crystal-locator calibration file ({exc})") from exc


def highpass(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Float32 image with slow illumination and single hot pixels removed, tapered at the edges."""
    data = ndimage.median_filter(np.asarray(image, dtype=np.float32), size=3)
    data = data - ndimage.gaussian_filter(data, sigma_px)
    rows, cols = data.shape
    taper = np.outer(np.hanning(rows), np.hanning(cols)).astype(np.float32)
    return data * taper


def measure_shift_px(reference: np.ndarray, moved: np.ndarray, sigma_px: float = 20.0) -> tuple[np.ndarray, float]:
    """How far the content of `moved` is displaced relative to `reference`, as (d_col, d_row) pixels.

    Returns the shift and the normalised correlation peak height (0..1, higher is more reliable).
    """
    from skimage.registration import phase_cross_correlation

    ref = highpass(reference, sigma_px)
    mov = highpass(moved, sigma_px)
    shift_row_col, _error, _phase = phase_cross_correlation(ref, mov, upsample_factor=10, normalization=None)
    # skimage gives the shift that registers `moved` onto `reference`: the content moved by minus that.
    displacement = -np.array([shift_row_col[1], shift_row_col[0]], dtype=np.float64)
    shifted = ndimage.shift(mov, (-displacement[1], -displacement[0]), order=1, mode="constant")
    denominator = float(np.linalg.norm(ref) * np.linalg.norm(shifted)) or 1.0
    quality = float(np.sum(ref * shifted) / denominator)
    return displacement, quality


def describe_matrix(matrix: np.ndarray) -> tuple[float, tuple[float, float], bool]:
    """Rotation (deg) of the +col axis, column lengths (um/px), and whether A flips handedness."""
    col_axis, row_axis = matrix[:, 0], matrix[:, 1]
    rotation_deg = math.degrees(math.atan2(col_axis[1], col_axis[0]))
    scales = (float(np.linalg.norm(col_axis)), float(np.linalg.norm(row_axis)))
    return rotation_deg, scales, bool(np.linalg.det(matrix) < 0)


def measure_preset(
    microscope: Microscope,
    preset: str,
    *,
    exposure_s: float,
    stage_xy_um: tuple[float, float] | None = None,
    shift_fraction: float = 0.2,
    approach_um: float = 0.0,
    min_quality: float = 0.05,
    max_residual_fraction: float = 0.05,
) -> PresetCalibration:
    """Measure A for `preset` around `stage_xy_um` (default: where the stage is now).

    Leaves the stage back at `stage_xy_um` and the preset applied. Raises `CalibrationError` when the
    correlation is too weak, the check move disagrees, or the scale is implausible.
    """
    info = microscope.info()
    nominal = info.preset(preset)
    microscope.set_preset(preset)
    if stage_xy_um is None:
        here = microscope.get_stage()
        stage_xy_um = (here.x_um, here.y_um)
    x0, y0 = stage_xy_um
    frame_rows = info.camera_shape_px[0] // nominal.binning
    frame_cols = info.camera_shape_px[1] // nominal.binning
    shift_um = shift_fraction * nominal.pixel_size_um * min(frame_rows, frame_cols)
    offsets_um = {"ref": (0.0, 0.0), "x": (shift_um, 0.0), "y": (0.0, shift_um), "xy": (shift_um, shift_um)}
    frames: dict[str, np.ndarray] = {}
    for name, (dx_um, dy_um) in offsets_um.items():
        approach_move(microscope, x0 + dx_um, y0 + dy_um, approach_um)
        frames[name] = np.asarray(microscope.acquire(exposure_s).image)
    approach_move(microscope, x0, y0, approach_um)

    sigma_px = max(4.0, min(frame_rows, frame_cols) / 40.0)
    shifts = {}
    for name in ("x", "y", "xy"):
        shift, quality = measure_shift_px(frames["ref"], frames[name], sigma_px)
        if quality < min_quality:
            raise CalibrationError(
                f"calibration of {preset!r} at ({x0:.1f}, {y0:.1f}) um: correlation too weak "
                f"(peak {quality:.3f} < {min_quality}); move to an area with more structure"
            )
        shifts[name] = shift
    stage_moves = np.array([[shift_um, 0.0], [0.0, shift_um]]).T  # columns d1, d2
    pixel_moves = np.column_stack([shifts["x"], shifts["y"]])
    if abs(np.linalg.det(pixel_moves)) < 1e-6:
        raise CalibrationError(f"calibration of {preset!r}: the two test moves gave parallel image shifts")
    matrix = -stage_moves @ np.linalg.inv(pixel_moves)
    predicted_xy = -np.linalg.inv(matrix) @ np.array([shift_um, shift_um])
    residual_px = float(np.linalg.norm(predicted_xy - shifts["xy"]))
    rotation_deg, scales, flipped = describe_matrix(matrix)
    expected_shift_px = shift_um / nominal.pixel_size_um
    if residual_px > max_residual_fraction * expected_shift_px * math.sqrt(2):
        raise CalibrationError(
            f"calibration of {preset!r}: check move off by {residual_px:.1f} px "
            f"(expected shift {expected_shift_px:.0f} px); the stage may have slipped or the area lacks texture"
        )
    for scale in scales:
        if not nominal.pixel_size_um / 1.5 <= scale <= nominal.pixel_size_um * 1.5:
            raise CalibrationError(
                f"calibration of {preset!r}: measured {scale:.4g} um/px, nominal {nominal.pixel_size_um:.4g}; "
                "check the preset's pixel size"
            )
    logger.info(
        "calibrated %s: rotation %.2f deg, scale %.4g/%.4g um/px, flipped=%s, residual %.2f px",
        preset, rotation_deg, scales[0], scales[1], flipped, residual_px,
    )
    return PresetCalibration(
        preset=preset,
        matrix_um_per_px=((float(matrix[0, 0]), float(matrix[0, 1])), (float(matrix[1, 0]), float(matrix[1, 1]))),
        nominal_pixel_size_um=nominal.pixel_size_um,
        rotation_deg=rotation_deg,
        scale_um_per_px=scales,
        flipped=flipped,
        residual_px=residual_px,
        shift_um=shift_um,
        stage_xy_um=(float(x0), float(y0)),
        measured_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
