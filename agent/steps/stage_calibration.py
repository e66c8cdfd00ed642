"""Image -> stage calibration: measure the matrix A of each optics preset on the instrument.

Convention (drivers.geometry): the specimen point under pixel p = (col_px, row_px) of a frame taken with the
stage at S is `S + A @ (p - image_centre_px(shape))`. Cameras are rotated, scaled and sometimes flipped
relative to the stage, differently at each magnification, so A is measured, never assumed:

1. acquire a reference frame at S, then frames at S + d1 and S + d2 (d1 along x, d2 along y), every
   position approached from the same side so backlash is the same;
2. phase-correlate each against the reference (scikit-image, sub-pixel): moving the stage by d moves the
   image content by s = -A^-1 d pixels, so A = -[d1 d2] [s1 s2]^-1. The moves grow from a few pixels
   (a periodic grid mesh cannot alias) to a fifth of the field of view (precision), each predicted from
   the matrix so far so that only a small residual is correlated;
3. the last round moves +-x, +-y and along both diagonals both ways, and fits A with an offset by least
   squares (stage repeat error averages out, the reference frame's own error is absorbed; one outlier
   move is dropped); the RMS misfit must stay under 5 % of the move (or the stage's repeat error) and the
   scale within a factor 1.5 of the preset's nominal pixel size, otherwise `CalibrationError`.

Images are high-pass filtered before correlation, because uneven illumination, hot pixels and a data bar
are fixed to the camera and would otherwise pull the correlation peak to zero shift.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from scipy import ndimage
from scipy.signal import windows

from agent.locate.preprocess import block_sum
from agent.steps.motion import approach_move
from drivers.base import Microscope, MicroscopeError
from drivers.formats.images import write_atomic

logger = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration.json"
#: Version of the calibration file format (`CalibrationSet.format_version`). Files without the field were
#: written by release 0.1.0 and are version 1; a file of any other version is refused.
CALIBRATION_FORMAT_VERSION = 1


class CalibrationError(MicroscopeError):
    """A calibration measurement failed or gave an implausible matrix (too little texture, a jump)."""


class CalibrationFileError(ValueError):
    """A calibration file cannot be used: unreadable, not a calibration, or of an unknown format version.
    The message names the file."""


class PresetCalibration(BaseModel):
    """The measured image -> stage matrix of one optics preset, with how well it was measured."""

    model_config = ConfigDict(frozen=True)

    preset: str
    matrix_um_per_px: tuple[tuple[float, float], tuple[float, float]]
    nominal_pixel_size_um: float
    rotation_deg: float = Field(description="angle of the camera's +col axis in stage coordinates")
    scale_um_per_px: tuple[float, float] = Field(description="lengths of A's columns (col, row axes)")
    flipped: bool = Field(description="True if camera and stage have opposite handedness")
    residual_px: float = Field(description="RMS misfit of the least-squares fit over the last test moves, pixels")
    shift_um: float
    stage_xy_um: tuple[float, float]
    measured_utc: str

    @property
    def matrix(self) -> np.ndarray:
        """A as a (2, 2) float64 array, um per pixel."""
        return np.asarray(self.matrix_um_per_px, dtype=np.float64)

    @classmethod
    def from_matrix(
        cls,
        preset: str,
        matrix_um_per_px: np.ndarray,
        nominal_pixel_size_um: float,
        *,
        residual_px: float,
        shift_um: float,
        stage_xy_um: tuple[float, float],
        measured_utc: str,
    ) -> PresetCalibration:
        """The calibration of `preset` whose matrix A (2, 2; um per px) is given; its rotation, column scales
        and handedness are read off A (`describe_matrix`)."""
        matrix = np.asarray(matrix_um_per_px, dtype=np.float64)
        rotation_deg, scales, flipped = describe_matrix(matrix)
        return cls(
            preset=preset,
            matrix_um_per_px=((float(matrix[0, 0]), float(matrix[0, 1])), (float(matrix[1, 0]), float(matrix[1, 1]))),
            nominal_pixel_size_um=nominal_pixel_size_um,
            rotation_deg=rotation_deg,
            scale_um_per_px=scales,
            flipped=flipped,
            residual_px=residual_px,
            shift_um=shift_um,
            stage_xy_um=stage_xy_um,
            measured_utc=measured_utc,
        )

    @field_validator("matrix_um_per_px")
    @classmethod
    def _invertible(
        cls, matrix: tuple[tuple[float, float], tuple[float, float]]
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """A must be finite and invertible (its columns neither zero nor parallel): pixels map to the stage and
        back."""
        values = np.asarray(matrix, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("the matrix has entries that are not finite numbers")
        scale = float(np.max(np.abs(values)))
        if scale == 0.0 or abs(float(np.linalg.det(values))) < 1e-6 * scale * scale:
            raise ValueError("the matrix is singular (it cannot map stage moves back to pixels)")
        return matrix


class CalibrationSet(BaseModel):
    """Calibrations of several presets of one instrument; saved as `calibration.json` in a session folder and
    as `<instrument>.json` in the instrument's calibration store (`agent.steps.calibration_store`)."""

    model_config = ConfigDict(frozen=True)

    format_version: int = CALIBRATION_FORMAT_VERSION
    instrument: str
    saved_utc: str | None = Field(default=None, description="when the file was last written (ISO 8601, UTC)")
    presets: dict[str, PresetCalibration] = Field(default_factory=dict)

    def matrix(self, preset: str) -> np.ndarray:
        """A of `preset`; raises KeyError with a clear message if it was not calibrated."""
        try:
            return self.presets[preset].matrix
        except KeyError:
            raise KeyError(f"preset {preset!r} is not calibrated (have: {sorted(self.presets)})") from None

    def with_preset(self, calibration: PresetCalibration) -> CalibrationSet:
        """A copy with `calibration` added or replaced."""
        return self.model_copy(update={"presets": {**self.presets, calibration.preset: calibration}})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically as JSON, dated (`saved_utc`); readable by colleagues as the umask allows."""
        dated = self.model_copy(update={"saved_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return write_atomic(path, dated.model_dump_json(indent=2).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationSet:
        """Read a file written by `save` (or by release 0.1.0). Raises `CalibrationFileError` (a ValueError)
        naming the file when it cannot be read, is not a calibration, or has an unknown format version."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CalibrationFileError(f"{path}: not a readable crystal-locator calibration file ({exc})") from exc
        if not isinstance(data, dict):
            raise CalibrationFileError(f"{path}: not a crystal-locator calibration file (not a JSON object)")
        version = data.get("format_version", 1)
        if version != CALIBRATION_FORMAT_VERSION:
            raise CalibrationFileError(
                f"{path}: calibration format version {version!r} is unknown to this release (it reads version "
                f"{CALIBRATION_FORMAT_VERSION}); use the release that wrote it, or measure again"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise CalibrationFileError(f"{path}: not a crystal-locator calibration file ({problems})") from exc


def highpass(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Float32 image with slow illumination removed and hot/dead pixels clipped, tapered at the edges.

    The slow background is a box filter of width ~2 sigma (running sums: cost independent of sigma).
    """
    data = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(data, (0.05, 99.95))  # hot/dead pixels are fixed to the camera: clip them
    data = np.clip(data, low, high)
    width = max(3, int(2 * sigma_px) | 1)
    data = data - ndimage.uniform_filter(data, size=width, mode="nearest")
    rows, cols = data.shape
    # A Tukey taper (flat middle, cosine edges) rather than Hann: non-periodic structure near the frame
    # edges (the grid rim in an overview) must survive, or a periodic mesh aliases the correlation.
    taper = np.outer(windows.tukey(rows, 0.25), windows.tukey(cols, 0.25)).astype(np.float32)
    return data * taper


def measure_shift_px(reference: np.ndarray, moved: np.ndarray, sigma_px: float = 20.0) -> tuple[np.ndarray, float]:
    """How far the content of `moved` is displaced relative to `reference`, as (d_col, d_row) pixels.

    Large frames are binned to at most ~1024 px first (sub-pixel precision is kept by upsampling the
    correlation peak). Returns the shift and the normalised correlation peak height (0..1, higher is more
    reliable).
    """
    from skimage.registration import phase_cross_correlation

    factor = max(1, min(reference.shape) // 512)
    ref = highpass(block_sum(reference, factor), sigma_px / factor)
    mov = highpass(block_sum(moved, factor), sigma_px / factor)
    shift_row_col, _error, _phase = phase_cross_correlation(ref, mov, upsample_factor=20, normalization=None)
    # skimage gives the shift that registers `moved` onto `reference`: the content moved by minus that.
    displacement = -np.array([shift_row_col[1], shift_row_col[0]], dtype=np.float64)
    shifted = np.roll(mov, (-round(displacement[1]), -round(displacement[0])), axis=(0, 1))
    denominator = float(np.linalg.norm(ref) * np.linalg.norm(shifted)) or 1.0
    quality = float(np.sum(ref * shifted) / denominator)
    return displacement * factor, quality


def structure_isotropy(image: np.ndarray, sigma_px: float) -> float:
    """Smaller / larger eigenvalue of the image's global structure tensor (0: one direction only, 1: even).

    A straight edge (a grid bar seen at high magnification) constrains a shift across it but not along
    it, so correlation there is meaningless along the edge; this detects it before any move is trusted.
    """
    factor = max(1, min(image.shape) // 512)
    data = highpass(block_sum(image, factor), sigma_px / factor)
    grad_rows = ndimage.sobel(data, axis=0)
    grad_cols = ndimage.sobel(data, axis=1)
    tensor = np.array(
        [
            [float(np.sum(grad_cols * grad_cols)), float(np.sum(grad_cols * grad_rows))],
            [float(np.sum(grad_cols * grad_rows)), float(np.sum(grad_rows * grad_rows))],
        ]
    )
    eigenvalues = np.linalg.eigvalsh(tensor)
    return float(eigenvalues[0] / eigenvalues[1]) if eigenvalues[1] > 0 else 0.0


def _fit_with_offset(stage_moves: np.ndarray, pixel_moves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares M, t with pixel_moves ~ M @ stage_moves + t; one move whose misfit exceeds three
    times the median (a slipped stage, a bad correlation) is dropped and the fit repeated."""
    keep = np.ones(stage_moves.shape[1], dtype=bool)
    for _ in range(2):
        design = np.column_stack([stage_moves[:, keep].T, np.ones(int(keep.sum()))])
        solution, *_ = np.linalg.lstsq(design, pixel_moves[:, keep].T, rcond=None)
        m_matrix, offset = solution[:2].T, solution[2]
        misfit = np.linalg.norm(m_matrix @ stage_moves + offset[:, None] - pixel_moves, axis=0)
        worst = int(np.argmax(np.where(keep, misfit, -1.0)))
        if keep.sum() <= 5 or misfit[worst] <= 3.0 * float(np.median(misfit[keep])):
            break
        keep[worst] = False
    return m_matrix, offset


def describe_matrix(matrix: np.ndarray) -> tuple[float, tuple[float, float], bool]:
    """Rotation (deg) of the +col axis, column lengths (um/px), and whether A flips handedness."""
    col_axis, row_axis = matrix[:, 0], matrix[:, 1]
    rotation_deg = math.degrees(math.atan2(col_axis[1], col_axis[0]))
    scales = (float(np.linalg.norm(col_axis)), float(np.linalg.norm(row_axis)))
    return rotation_deg, scales, bool(np.linalg.det(matrix) < 0)


def displacement_near_px(
    reference: np.ndarray, moved: np.ndarray, predicted_px: np.ndarray, sigma_px: float
) -> tuple[np.ndarray, float]:
    """Displacement (d_col, d_row) of `moved` relative to `reference`, searched near `predicted_px`.

    The frames are cropped to their predicted overlap (integer part of the prediction) and only the small
    residual is phase-correlated, so periodic specimens (a grid mesh) cannot alias a large shift.
    """
    rows, cols = reference.shape
    d_col, d_row = (round(float(v)) for v in predicted_px)
    r0, r1 = max(0, -d_row), min(rows, rows - d_row)
    c0, c1 = max(0, -d_col), min(cols, cols - d_col)
    if r1 - r0 < 32 or c1 - c0 < 32:
        raise CalibrationError("calibration test move left too little overlap between frames")
    ref_crop = reference[r0:r1, c0:c1]
    mov_crop = moved[r0 + d_row : r1 + d_row, c0 + d_col : c1 + d_col]
    residual, quality = measure_shift_px(ref_crop, mov_crop, sigma_px)
    return np.array([d_col, d_row], dtype=np.float64) + residual, quality


def measure_preset(
    microscope: Microscope,
    preset: str,
    *,
    exposure_s: float,
    stage_xy_um: tuple[float, float] | None = None,
    shift_fraction: float = 0.35,
    first_shift_px: float = 4.0,
    min_first_shift_um: float = 2.0,
    approach_um: float = 0.0,
    min_quality: float = 0.05,
    max_residual_fraction: float = 0.05,
    stage_repeat_um: float = 0.5,
    min_isotropy: float = 0.05,
) -> PresetCalibration:
    """Measure A for `preset` around `stage_xy_um` (default: where the stage is now).

    Test moves grow geometrically from `first_shift_px` pixels (small enough that a periodic mesh cannot
    alias), but at least `min_first_shift_um` (well above a stage's repeat error of a few tenths of a
    micrometre), to `shift_fraction` of the field of view; each larger move is predicted from the matrix
    measured so far and only the residual is correlated. The last round moves +-x, +-y and both ways along
    both diagonals and fits A (with a common offset) by least squares, which averages out stage repeat
    error; the RMS misfit is the reported residual. Leaves the stage back at `stage_xy_um`. Raises
    `CalibrationError` when the correlation is too weak, the fit is poor, or the scale is implausible.
    """
    info = microscope.info()
    nominal = info.preset(preset)
    microscope.set_preset(preset)
    if stage_xy_um is None:
        here = microscope.get_stage()
        stage_xy_um = (here.x_um, here.y_um)
    x0, y0 = stage_xy_um
    where = f"calibration of {preset!r} at ({x0:.1f}, {y0:.1f}) um"
    frame_rows = info.camera_shape_px[0] // nominal.binning
    frame_cols = info.camera_shape_px[1] // nominal.binning
    shifts_px = _test_shifts_px(
        microscope,
        (x0, y0),
        shift_fraction * min(frame_rows, frame_cols),
        nominal.pixel_size_um,
        first_shift_px=first_shift_px,
        min_first_shift_um=min_first_shift_um,
        approach_um=approach_um,
        where=where,
    )
    sigma_px = max(4.0, min(frame_rows, frame_cols) / 40.0)

    def frame_at(dx_um: float, dy_um: float) -> np.ndarray:
        approach_move(microscope, x0 + dx_um, y0 + dy_um, approach_um, always=True)
        return np.asarray(microscope.acquire(exposure_s).image)

    reference = frame_at(0.0, 0.0)
    isotropy = structure_isotropy(reference, sigma_px)
    if isotropy < min_isotropy:
        raise CalibrationError(
            f"{where}: the image has structure in one direction "
            f"only (isotropy {isotropy:.3f} < {min_isotropy}: an edge, not a corner); move to a corner or texture"
        )
    matrix, residual_px, shift_um = _fit_matrix(
        reference, frame_at, shifts_px, nominal.pixel_size_um, sigma_px, min_quality, preset=preset, where=where
    )
    approach_move(microscope, x0, y0, approach_um, always=True)
    return _checked_calibration(
        preset,
        matrix,
        residual_px,
        shift_um,
        nominal.pixel_size_um,
        (x0, y0),
        max_residual_fraction=max_residual_fraction,
        stage_repeat_um=stage_repeat_um,
    )


def _checked_calibration(
    preset: str,
    matrix: np.ndarray,
    residual_px: float,
    shift_um: float,
    pixel_size_um: float,
    stage_xy_um: tuple[float, float],
    *,
    max_residual_fraction: float,
    stage_repeat_um: float,
) -> PresetCalibration:
    """The `PresetCalibration` of a fitted matrix A (um/px), measured around `stage_xy_um` (um) with a last
    move of `shift_um`, once `_check_fit` accepts its misfit (px) and scale against the nominal
    `pixel_size_um`."""
    x0, y0 = stage_xy_um
    rotation_deg, scales, flipped = describe_matrix(matrix)
    _check_fit(
        preset,
        residual_px,
        shift_um / pixel_size_um,
        scales,
        pixel_size_um,
        max_residual_fraction=max_residual_fraction,
        stage_repeat_um=stage_repeat_um,
    )
    logger.info(
        "calibrated %s: rotation %.2f deg, scale %.4g/%.4g um/px, flipped=%s, residual %.2f px",
        preset,
        rotation_deg,
        scales[0],
        scales[1],
        flipped,
        residual_px,
    )
    return PresetCalibration.from_matrix(
        preset,
        matrix,
        pixel_size_um,
        residual_px=residual_px,
        shift_um=shift_um,
        stage_xy_um=(float(x0), float(y0)),
        measured_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _test_shifts_px(
    microscope: Microscope,
    stage_xy_um: tuple[float, float],
    final_shift_px: float,
    pixel_size_um: float,
    *,
    first_shift_px: float,
    min_first_shift_um: float,
    approach_um: float,
    where: str,
) -> list[float]:
    """The test move of each round (px, growing fourfold up to `final_shift_px`), the last one cut to the
    room the stage limits leave around `stage_xy_um` (um). `CalibrationError` when there is no room."""
    x0, y0 = stage_xy_um
    limits = microscope.stage_limits()
    room_um = min(
        x0 - limits.x_min_um - approach_um,
        limits.x_max_um - x0,
        y0 - limits.y_min_um - approach_um,
        limits.y_max_um - y0,
    )
    final_shift_px = min(final_shift_px, room_um / pixel_size_um)  # small stages (tile mosaics)
    if final_shift_px < 3.0:
        raise CalibrationError(f"{where}: too close to the stage limits for test moves")
    shifts_px = [min(final_shift_px, max(first_shift_px, min_first_shift_um / pixel_size_um))]
    while shifts_px[-1] * 4 < final_shift_px:
        shifts_px.append(shifts_px[-1] * 4)
    if shifts_px[-1] < final_shift_px:
        shifts_px.append(final_shift_px)
    return shifts_px


def _fit_matrix(
    reference: np.ndarray,
    frame_at: Callable[[float, float], np.ndarray],
    shifts_px: list[float],
    pixel_size_um: float,
    sigma_px: float,
    min_quality: float,
    *,
    preset: str,
    where: str,
) -> tuple[np.ndarray, float, float]:
    """The rounds of test moves: x and y moves of each size in `shifts_px`, the last round also -x, -y and
    both diagonals both ways with a least-squares fit (`_fit_with_offset`). `frame_at(dx_um, dy_um)`
    acquires a frame moved by that much from the reference position. Returns the matrix A (um/px), the
    last round's RMS misfit (px, the worst move left out) and its move (um)."""
    matrix: np.ndarray | None = None
    residual_px = 0.0
    shift_um = 0.0
    for round_index, step_px in enumerate(shifts_px):
        shift_um = step_px * pixel_size_um
        last = round_index == len(shifts_px) - 1
        unit_moves = (
            [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)] if last else [(1, 0), (0, 1)]
        )
        stage_moves = shift_um * np.array(unit_moves, dtype=np.float64).T  # (2, n) columns d_i
        pixel_moves = _pixel_moves(reference, frame_at, stage_moves, matrix, sigma_px, min_quality, where=where)
        if last:
            # displacement = M d + t: the intercept t absorbs the reference frame's own stage error,
            # which every displacement shares; A = -M^-1.
            m_matrix, offset = _fit_with_offset(stage_moves, pixel_moves)
        else:
            m_matrix, offset = pixel_moves @ np.linalg.inv(stage_moves), np.zeros(2)
        if abs(np.linalg.det(m_matrix)) < 1e-12:
            raise CalibrationError(f"calibration of {preset!r}: the test moves gave parallel image shifts")
        matrix = -np.linalg.inv(m_matrix)
        misfit = np.linalg.norm(m_matrix @ stage_moves + offset[:, None] - pixel_moves, axis=0)
        residual_px = float(np.sqrt(np.mean(np.sort(misfit**2)[: max(2, len(misfit) - 1)])))
    assert matrix is not None
    return matrix, residual_px, shift_um


def _pixel_moves(
    reference: np.ndarray,
    frame_at: Callable[[float, float], np.ndarray],
    stage_moves: np.ndarray,
    matrix: np.ndarray | None,
    sigma_px: float,
    min_quality: float,
    *,
    where: str,
) -> np.ndarray:
    """Image displacement (d_col, d_row px) for each stage move (columns of `stage_moves`, um), searched
    near the prediction of `matrix` (the previous round's; None: near zero). `CalibrationError` when a
    correlation peak is below `min_quality`."""
    pixel_moves = np.zeros_like(stage_moves)
    for column in range(stage_moves.shape[1]):
        predicted = np.zeros(2) if matrix is None else -np.linalg.inv(matrix) @ stage_moves[:, column]
        displacement, quality = displacement_near_px(reference, frame_at(*stage_moves[:, column]), predicted, sigma_px)
        if quality < min_quality:
            raise CalibrationError(
                f"{where}: correlation too weak "
                f"(peak {quality:.3f} < {min_quality}); move to an area with more structure"
            )
        pixel_moves[:, column] = displacement
    return pixel_moves


def _check_fit(
    preset: str,
    residual_px: float,
    expected_shift_px: float,
    scales: tuple[float, float],
    pixel_size_um: float,
    *,
    max_residual_fraction: float,
    stage_repeat_um: float,
) -> None:
    """`CalibrationError` when the misfit (px) of the last round, whose move was `expected_shift_px`, is
    too large or a measured scale (um/px) is not within a factor 1.5 of the nominal `pixel_size_um`."""
    # The misfit may reach the stage's repeat error (a few tenths of a um: many pixels at high
    # magnification) or a small fraction of the move, whichever is larger.
    allowed_px = max(max_residual_fraction * expected_shift_px, stage_repeat_um / pixel_size_um)
    if residual_px > allowed_px:
        raise CalibrationError(
            f"calibration of {preset!r}: test moves disagree by {residual_px:.1f} px RMS "
            f"(expected shift {expected_shift_px:.0f} px); the stage may have slipped or the area lacks texture"
        )
    for scale in scales:
        if not pixel_size_um / 1.5 <= scale <= pixel_size_um * 1.5:
            raise CalibrationError(
                f"calibration of {preset!r}: measured {scale:.4g} um/px, nominal {pixel_size_um:.4g}; "
                "check the preset's pixel size"
            )
