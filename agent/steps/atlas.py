"""Mapping: choose grid squares from an overview, plan a montage, acquire and assemble it.

An `Atlas` is a mosaic (uint16) plus the affine map from its pixels to stage micrometres. The mosaic is
laid out in the camera's own axes (tiles are placed where the calibrated matrix says they are, from the
stage position recorded with each frame), so that one matrix A serves the whole mosaic (the convention of
`drivers.geometry`):

    stage_um = reference_xy_um + A @ ((col, row) - reference_px)

Tiles rarely stitch perfectly (stage repeat error, backlash): overlaps are averaged, so a seam shows as a
slight blur rather than a step, and each tile's stage position is kept for later checks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.steps.motion import approach_move
from drivers.base import Frame, FrameMetadata, Microscope, StagePosition
from drivers.geometry import image_centre_px, pixel_to_stage_about_um, stage_to_pixel_about

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Atlas:
    """A mosaic and its pixel -> stage map (see module docstring)."""

    image: np.ndarray
    preset: str
    matrix_um_per_px: np.ndarray
    reference_xy_um: tuple[float, float]
    reference_px: tuple[float, float]
    tile_stage_xy_um: tuple[tuple[float, float], ...] = ()

    @property
    def pixel_size_um(self) -> float:
        """Mean scale of the matrix, micrometres per pixel."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix_um_per_px))))

    def pixel_to_stage_um(self, col_row_px: np.ndarray) -> np.ndarray:
        """(…, 2) (col, row) mosaic pixels -> (…, 2) stage (x_um, y_um)."""
        return pixel_to_stage_about_um(col_row_px, self.reference_px, self.reference_xy_um, self.matrix_um_per_px)

    def stage_to_pixel(self, xy_um: np.ndarray) -> np.ndarray:
        """(…, 2) stage (x_um, y_um) -> (…, 2) (col, row) mosaic pixels."""
        return stage_to_pixel_about(xy_um, self.reference_px, self.reference_xy_um, self.matrix_um_per_px)

    def geometry(self) -> dict[str, object]:
        """JSON-serialisable description of the pixel -> stage map (for the journal and TIFF metadata)."""
        return {
            "preset": self.preset,
            "matrix_um_per_px": self.matrix_um_per_px.tolist(),
            "reference_xy_um": list(self.reference_xy_um),
            "reference_px": list(self.reference_px),
            "tile_stage_xy_um": [list(t) for t in self.tile_stage_xy_um],
            "shape_px": list(self.image.shape),
        }

    def as_frame(self, time_s: float) -> Frame:
        """The mosaic as a `Frame` whose metadata carries the geometry (for `write_frame_tiff`)."""
        centre = self.pixel_to_stage_um(image_centre_px(self.image.shape))
        metadata = FrameMetadata(
            preset=self.preset,
            magnification=1.0,
            pixel_size_um=self.pixel_size_um,
            stage=StagePosition(x_um=float(centre[0]), y_um=float(centre[1])),
            exposure_s=0.0,
            time_s=time_s,
            extra={"atlas": self.geometry()},
        )
        return Frame(image=self.image, metadata=metadata)

    @classmethod
    def from_frame(cls, frame: Frame) -> Atlas:
        """Rebuild an atlas from a frame written by `as_frame` (used on resume)."""
        geometry = frame.metadata.extra["atlas"]
        if isinstance(geometry, str):
            geometry = json.loads(geometry)
        return cls(
            image=np.asarray(frame.image),
            preset=str(geometry["preset"]),
            matrix_um_per_px=np.asarray(geometry["matrix_um_per_px"], dtype=np.float64),
            reference_xy_um=tuple(geometry["reference_xy_um"]),  # type: ignore[arg-type]
            reference_px=tuple(geometry["reference_px"]),  # type: ignore[arg-type]
            tile_stage_xy_um=tuple(tuple(t) for t in geometry.get("tile_stage_xy_um", [])),  # type: ignore[misc]
        )


def frame_atlas(frame: Frame, matrix_um_per_px: np.ndarray) -> Atlas:
    """A single frame as an atlas."""
    centre = image_centre_px(frame.image.shape)
    return Atlas(
        image=np.asarray(frame.image),
        preset=frame.metadata.preset,
        matrix_um_per_px=np.asarray(matrix_um_per_px),
        reference_xy_um=(frame.metadata.stage.x_um, frame.metadata.stage.y_um),
        reference_px=(float(centre[0]), float(centre[1])),
        tile_stage_xy_um=((frame.metadata.stage.x_um, frame.metadata.stage.y_um),),
    )


def plan_tiles(
    box_um: tuple[float, float, float, float],
    matrix_um_per_px: np.ndarray,
    frame_shape_px: tuple[int, int],
    overlap_fraction: float,
) -> list[tuple[float, float]]:
    """Stage positions (x_um, y_um) of montage tiles that cover `box_um`, in snake order.

    Tiles step along the camera's own axes, so neighbouring tiles overlap by `overlap_fraction` of a frame
    even when the camera is rotated relative to the stage.
    """
    x_min, x_max, y_min, y_max = box_um
    matrix = np.asarray(matrix_um_per_px, dtype=np.float64)
    rows, cols = frame_shape_px
    corners_um = np.array([[x_min, y_min], [x_min, y_max], [x_max, y_min], [x_max, y_max]])
    centre_um = corners_um.mean(axis=0)
    corners_px = (corners_um - centre_um) @ np.linalg.inv(matrix).T  # (col, row) offsets
    span_cols = float(np.ptp(corners_px[:, 0]))
    span_rows = float(np.ptp(corners_px[:, 1]))
    step_cols = cols * (1.0 - overlap_fraction)
    step_rows = rows * (1.0 - overlap_fraction)
    n_cols = max(1, math.ceil((span_cols - cols) / step_cols) + 1) if span_cols > cols else 1
    n_rows = max(1, math.ceil((span_rows - rows) / step_rows) + 1) if span_rows > rows else 1
    positions: list[tuple[float, float]] = []
    for i in range(n_rows):
        col_indices = range(n_cols) if i % 2 == 0 else reversed(range(n_cols))
        for j in col_indices:
            offset_px = np.array([(j - (n_cols - 1) / 2) * step_cols, (i - (n_rows - 1) / 2) * step_rows])
            x_um, y_um = centre_um + matrix @ offset_px
            positions.append((float(x_um), float(y_um)))
    return positions


def assemble(frames: Sequence[Frame], matrix_um_per_px: np.ndarray) -> Atlas:
    """Place frames in one mosaic by their recorded stage positions; overlaps are averaged."""
    if not frames:
        raise ValueError("assemble needs at least one frame")
    matrix = np.asarray(matrix_um_per_px, dtype=np.float64)
    inverse = np.linalg.inv(matrix)
    first = frames[0]
    rows, cols = first.image.shape
    origin_xy = np.array([first.metadata.stage.x_um, first.metadata.stage.y_um])
    offsets = []
    for frame in frames:
        if frame.image.shape != (rows, cols):
            raise ValueError("all montage frames must have the same shape")
        stage_xy = np.array([frame.metadata.stage.x_um, frame.metadata.stage.y_um])
        offsets.append(inverse @ (stage_xy - origin_xy))  # (col, row) of this tile in tile-0 pixels
    offsets_arr = np.round(np.array(offsets)).astype(np.int64)
    minimum = offsets_arr.min(axis=0)
    placed = offsets_arr - minimum
    height = int(placed[:, 1].max()) + rows
    width = int(placed[:, 0].max()) + cols
    if len(frames) == 1:
        mosaic = np.asarray(first.image).copy()
    else:
        total = np.zeros((height, width), dtype=np.float64)
        weight = np.zeros((height, width), dtype=np.float32)
        for frame, (col0, row0) in zip(frames, placed, strict=True):
            total[row0 : row0 + rows, col0 : col0 + cols] += frame.image
            weight[row0 : row0 + rows, col0 : col0 + cols] += 1.0
        empty = weight == 0
        weight[empty] = 1.0
        mosaic = np.clip(np.rint(total / weight), 0, 65535).astype(np.uint16)
        if empty.any():  # fill holes (none for a planned montage) with the nearest pixel
            indices = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
            mosaic = mosaic[tuple(indices)]
    centre = image_centre_px((rows, cols))
    reference_px = (float(centre[0] - minimum[0]), float(centre[1] - minimum[1]))
    return Atlas(
        image=mosaic,
        preset=first.metadata.preset,
        matrix_um_per_px=matrix,
        reference_xy_um=(float(origin_xy[0]), float(origin_xy[1])),
        reference_px=reference_px,
        tile_stage_xy_um=tuple((f.metadata.stage.x_um, f.metadata.stage.y_um) for f in frames),
    )


def acquire_montage(
    microscope: Microscope,
    positions_xy_um: Sequence[tuple[float, float]],
    *,
    preset: str,
    exposure_s: float,
    approach_um: float,
) -> list[Frame]:
    """Acquire one frame at each stage position (in the given order) at `preset`."""
    microscope.set_preset(preset)
    frames = []
    for x_um, y_um in positions_xy_um:
        approach_move(microscope, x_um, y_um, approach_um)
        frames.append(microscope.acquire(exposure_s))
    return frames


@dataclass(frozen=True)
class GridSquare:
    """A grid square seen in the overview: centre in stage um, area, and how typical it looks."""

    x_um: float
    y_um: float
    area_um2: float
    typicality: float


def find_squares(overview: Atlas, bar_mask: np.ndarray) -> list[GridSquare]:
    """Grid squares in an overview: connected non-bar regions of similar size, scored by typicality.

    Typicality is how close a square's mean and spread are to the median square (robust z-scores):
    empty (vacuum), broken, or heavily contaminated squares stand out and score low.
    """
    open_area = ~np.asarray(bar_mask, dtype=bool)
    open_area = ndimage.binary_opening(open_area, iterations=1)
    labels, count = ndimage.label(open_area)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    image = overview.image.astype(np.float64)
    means = ndimage.mean(image, labels, index)
    stds = ndimage.standard_deviation(image, labels, index)
    centres = np.array(ndimage.center_of_mass(open_area, labels, index))  # (row, col)
    touches_edge = np.zeros(count, dtype=bool)
    for edge in (labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]):
        present = np.unique(edge[edge > 0])
        touches_edge[present - 1] = True
    big_enough = areas > 0.1 * np.median(areas[areas > 20]) if np.any(areas > 20) else areas > 0
    keep = big_enough & ~touches_edge
    if not np.any(keep):
        return []
    median_area = float(np.median(areas[keep]))
    keep &= (areas > 0.4 * median_area) & (areas < 2.5 * median_area)

    def robust_z(values: np.ndarray) -> np.ndarray:
        centre = np.median(values[keep])
        spread = 1.4826 * np.median(np.abs(values[keep] - centre)) or (abs(centre) * 0.05 + 1e-9)
        return np.abs(values - centre) / spread

    score = 1.0 / (1.0 + robust_z(means) + 0.5 * robust_z(stds) + 0.5 * robust_z(areas))
    pixel_area_um2 = overview.pixel_size_um**2
    stage_xy = overview.pixel_to_stage_um(centres[:, ::-1])
    squares = [
        GridSquare(
            x_um=float(stage_xy[i, 0]),
            y_um=float(stage_xy[i, 1]),
            area_um2=float(areas[i] * pixel_area_um2),
            typicality=float(score[i]),
        )
        for i in range(count)
        if keep[i]
    ]
    return sorted(squares, key=lambda s: -s.typicality)


def choose_block(
    squares: Sequence[GridSquare], count: int, near_xy_um: tuple[float, float] = (0.0, 0.0), min_typicality: float = 0.2
) -> list[GridSquare]:
    """`count` typical squares forming a compact block: the typical square nearest `near_xy_um`, then its
    nearest typical neighbours."""
    typical = [s for s in squares if s.typicality >= min_typicality] or list(squares)
    if not typical:
        return []
    seed = min(typical, key=lambda s: math.hypot(s.x_um - near_xy_um[0], s.y_um - near_xy_um[1]))
    rest = sorted(typical, key=lambda s: math.hypot(s.x_um - seed.x_um, s.y_um - seed.y_um))
    return rest[:count]


def block_box_um(block: Sequence[GridSquare], margin_um: float) -> tuple[float, float, float, float]:
    """Stage box (x_min, x_max, y_min, y_max) covering the squares of `block` plus `margin_um`."""
    half_side = max(math.sqrt(s.area_um2) for s in block) / 2.0 + margin_um
    xs = [s.x_um for s in block]
    ys = [s.y_um for s in block]
    return (min(xs) - half_side, max(xs) + half_side, min(ys) - half_side, max(ys) + half_side)
