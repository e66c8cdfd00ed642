"""Ground truth for evaluation, in the pixel frame of one image.

Two sources feed the same `ImageTruth`:

- a simulated specimen (anything with `crystal_id_xy`, `crystals_in_box` and `bar_mask_xy`, see
  `GroundTruth`) plus the frame's stage position and the *true* image->stage matrix: every crystal's
  axis (a capsule: a segment of its length with a half-width) is mapped into pixels;
- a user's labelled image: crystal centres in pixels and an optional radius (see `agent.evaluation.labelled`).

`agent.evaluation` never imports `simulator`: whoever wires an evaluation up passes the specimen in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from drivers.geometry import image_centre_px, pixel_to_stage_um, stage_to_pixel


@runtime_checkable
class GroundTruth(Protocol):
    """What evaluation needs from a simulated specimen (all coordinates stage um)."""

    def crystal_id_xy(self, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 0.0) -> np.ndarray:
        """Id of the crystal at each point (-1 where none)."""
        ...

    def crystals_in_box(self, x_min_um: float, x_max_um: float, y_min_um: float, y_max_um: float) -> list[Any]:
        """Records (id, x_um, y_um, length_um, width_um, angle_deg, diffracts, ...) with centres in the box."""
        ...

    def bar_mask_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where a point lies on a grid bar, the rim or outside the grid."""
        ...


@dataclass(frozen=True)
class PixelCrystal:
    """One true crystal in an image's pixel frame, as a capsule.

    The crystal's long axis runs from (`row0_px`, `col0_px`) to (`row1_px`, `col1_px`) (equal ends for a
    round object); `half_width_px` is half its width. `countable` is False for crystals that recall must
    not count (cut by the frame edge, on a bar). `diffracts` is None when unknown (user labels).
    """

    id: int
    row_px: float
    col_px: float
    row0_px: float
    col0_px: float
    row1_px: float
    col1_px: float
    half_width_px: float
    countable: bool = True
    diffracts: bool | None = None
    length_um: float | None = None


@dataclass(frozen=True)
class ImageTruth:
    """Every true crystal that touches an image, plus (optionally) the true grid-bar mask.

    `um_per_px` converts pixel distances to micrometres (None when the pixel size is unknown: errors are
    then reported in pixels only). `bar_mask` is a bool array of the image shape or None.
    """

    shape_px: tuple[int, int]
    crystals: tuple[PixelCrystal, ...]
    um_per_px: float | None = None
    bar_mask: np.ndarray | None = None
    source: str = ""

    @property
    def n_countable(self) -> int:
        """Number of crystals recall counts."""
        return sum(1 for c in self.crystals if c.countable)


def matrix_scale_um_per_px(matrix_um_per_px: np.ndarray) -> float:
    """Mean linear scale (um per pixel) of an image->stage matrix: sqrt(|det A|)."""
    return float(math.sqrt(abs(float(np.linalg.det(np.asarray(matrix_um_per_px, dtype=np.float64))))))


def frame_box_um(
    shape_px: tuple[int, int], stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray
) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) um of the stage area an image covers (bounding box of its corners)."""
    rows, cols = shape_px
    corners = np.array([[-0.5, -0.5], [cols - 0.5, -0.5], [-0.5, rows - 0.5], [cols - 0.5, rows - 0.5]])
    xy = pixel_to_stage_um(corners, shape_px, stage_xy_um, matrix_um_per_px)
    return float(xy[:, 0].min()), float(xy[:, 0].max()), float(xy[:, 1].min()), float(xy[:, 1].max())


def true_bar_mask(
    truth: GroundTruth, shape_px: tuple[int, int], stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray
) -> np.ndarray:
    """The true grid-bar mask (bool, image shape): `truth.bar_mask_xy` at every pixel's stage position."""
    rows, cols = shape_px
    centre = image_centre_px(shape_px)
    a = np.asarray(matrix_um_per_px, dtype=np.float64)
    dc = np.arange(cols, dtype=np.float64) - centre[0]
    dr = np.arange(rows, dtype=np.float64) - centre[1]
    x = stage_xy_um[0] + a[0, 0] * dc[None, :] + a[0, 1] * dr[:, None]
    y = stage_xy_um[1] + a[1, 0] * dc[None, :] + a[1, 1] * dr[:, None]
    return np.asarray(truth.bar_mask_xy(x, y), dtype=bool)


def truth_for_frame(
    truth: GroundTruth,
    shape_px: tuple[int, int],
    stage_xy_um: tuple[float, float],
    matrix_um_per_px: np.ndarray,
    *,
    edge_margin_px: float = 2.0,
    with_bar_mask: bool = True,
    source: str = "",
) -> ImageTruth:
    """Ground truth of a simulated frame taken at `stage_xy_um` with the true image->stage matrix.

    A crystal is countable when both ends of its axis lie at least `edge_margin_px` plus its half-width
    inside the frame and its centre is not on a bar (bars are excluded from the imaged area).
    """
    um_per_px = matrix_scale_um_per_px(matrix_um_per_px)
    x0, x1, y0, y1 = frame_box_um(shape_px, stage_xy_um, matrix_um_per_px)
    pad_um = 35.0  # crystals up to 70 um long may reach into the frame from outside
    records = truth.crystals_in_box(x0 - pad_um, x1 + pad_um, y0 - pad_um, y1 + pad_um)
    bar_mask = true_bar_mask(truth, shape_px, stage_xy_um, matrix_um_per_px) if with_bar_mask else None
    crystals = _records_to_pixels(records, shape_px, stage_xy_um, matrix_um_per_px, um_per_px, edge_margin_px, truth)
    return ImageTruth(shape_px=shape_px, crystals=tuple(crystals), um_per_px=um_per_px, bar_mask=bar_mask,
                      source=source)


def _records_to_pixels(
    records: Sequence[Any],
    shape_px: tuple[int, int],
    stage_xy_um: tuple[float, float],
    matrix_um_per_px: np.ndarray,
    um_per_px: float,
    edge_margin_px: float,
    truth: GroundTruth,
) -> list[PixelCrystal]:
    if not records:
        return []
    rows, cols = shape_px
    xy = np.array([[r.x_um, r.y_um] for r in records], dtype=np.float64)
    angle = np.deg2rad(np.array([r.angle_deg for r in records], dtype=np.float64))
    length = np.array([r.length_um for r in records], dtype=np.float64)
    width = np.array([r.width_um for r in records], dtype=np.float64)
    half_axis = np.maximum(length - width, 0.0) / 2.0  # capsule: the rounded ends add the half-width back
    direction = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    end0 = stage_to_pixel(xy - direction * half_axis[:, None], shape_px, stage_xy_um, matrix_um_per_px)
    end1 = stage_to_pixel(xy + direction * half_axis[:, None], shape_px, stage_xy_um, matrix_um_per_px)
    centre = stage_to_pixel(xy, shape_px, stage_xy_um, matrix_um_per_px)
    half_width_px = width / 2.0 / um_per_px
    on_bar = np.asarray(truth.bar_mask_xy(xy[:, 0], xy[:, 1]), dtype=bool)
    result = []
    for i, record in enumerate(records):
        margin = edge_margin_px + half_width_px[i]
        ends_c = np.array([end0[i, 0], end1[i, 0]])
        ends_r = np.array([end0[i, 1], end1[i, 1]])
        inside = bool(
            np.all(ends_c >= margin - 0.5) and np.all(ends_c <= cols - 0.5 - margin)
            and np.all(ends_r >= margin - 0.5) and np.all(ends_r <= rows - 0.5 - margin)
        )
        touches = bool(
            ends_c.max() >= -0.5 - half_width_px[i] and ends_c.min() <= cols - 0.5 + half_width_px[i]
            and ends_r.max() >= -0.5 - half_width_px[i] and ends_r.min() <= rows - 0.5 + half_width_px[i]
        )
        if not touches:
            continue
        result.append(PixelCrystal(
            id=int(record.id), row_px=float(centre[i, 1]), col_px=float(centre[i, 0]),
            row0_px=float(end0[i, 1]), col0_px=float(end0[i, 0]), row1_px=float(end1[i, 1]), col1_px=float(end1[i, 0]),
            half_width_px=float(half_width_px[i]), countable=inside and not bool(on_bar[i]),
            diffracts=bool(record.diffracts), length_um=float(record.length_um),
        ))
    return result
