"""Image <-> stage geometry: where on the specimen (stage micrometres) a camera pixel lies, and back.

A pixel is addressed as the vector p = (col_px, row_px) (x to the right, y down the rows), with the
centre of pixel (0, 0) at (0, 0). An image whose reference pixel c lies under the stage position S maps
pixel p to

    stage_um = S_xy_um + A @ (p - c)

where A (2x2, micrometres per pixel) depends on the optics preset: rotation, scale and possibly a flip
between camera and stage axes. For a single frame c is the image centre (`image_centre_px`) and S the
stage position recorded with the frame; a mosaic (`agent.steps.atlas.Atlas`) keeps its own reference pixel.
Drivers do not promise any particular A; the agent measures it (agent.steps.stage_calibration) by moving the
stage a known offset and phase-correlating.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_centre_px(shape: tuple[int, ...]) -> np.ndarray:
    """The centre of an image of `shape` (rows, cols) as a (col_px, row_px) vector, float64."""
    rows, cols = int(shape[0]), int(shape[1])
    return np.array([(cols - 1) / 2.0, (rows - 1) / 2.0], dtype=np.float64)


def pixel_to_stage_about_um(
    col_row_px: np.ndarray,
    reference_px: np.ndarray | Sequence[float],
    reference_xy_um: np.ndarray | Sequence[float],
    matrix_um_per_px: np.ndarray,
) -> np.ndarray:
    """Map pixel vectors `(..., 2)` as (col_px, row_px) to stage (x_um, y_um), given the stage position
    `reference_xy_um` under the pixel `reference_px` (col, row) and the matrix A (2x2, um per pixel)."""
    offsets = np.asarray(col_row_px, dtype=np.float64) - np.asarray(reference_px, dtype=np.float64)
    return np.asarray(reference_xy_um, dtype=np.float64) + offsets @ np.asarray(matrix_um_per_px, dtype=np.float64).T


def stage_to_pixel_about(
    xy_um: np.ndarray,
    reference_px: np.ndarray | Sequence[float],
    reference_xy_um: np.ndarray | Sequence[float],
    matrix_um_per_px: np.ndarray,
) -> np.ndarray:
    """Inverse of `pixel_to_stage_about_um`: stage (x_um, y_um) vectors `(..., 2)` -> (col_px, row_px)."""
    inverse = np.linalg.inv(np.asarray(matrix_um_per_px, dtype=np.float64))
    offsets = np.asarray(xy_um, dtype=np.float64) - np.asarray(reference_xy_um, dtype=np.float64)
    return np.asarray(reference_px, dtype=np.float64) + offsets @ inverse.T


def pixel_to_stage_um(
    col_row_px: np.ndarray, shape: tuple[int, ...], stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray
) -> np.ndarray:
    """Map pixel vectors `(..., 2)` as (col_px, row_px) of a frame of `shape` (rows, cols) taken with the
    stage at `stage_xy_um` to stage (x_um, y_um) with matrix A (see the module docstring)."""
    return pixel_to_stage_about_um(col_row_px, image_centre_px(shape), stage_xy_um, matrix_um_per_px)


def stage_to_pixel(
    xy_um: np.ndarray, shape: tuple[int, ...], stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray
) -> np.ndarray:
    """Inverse of `pixel_to_stage_um`: stage (x_um, y_um) vectors `(..., 2)` -> (col_px, row_px)."""
    return stage_to_pixel_about(xy_um, image_centre_px(shape), stage_xy_um, matrix_um_per_px)
