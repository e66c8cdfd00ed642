"""Confirming a target at the search preset: is there an object near the centre, and where exactly?

At search magnification a target is one object (a crystal, or what the atlas took for one) a few to many
times larger than at the atlas, possibly larger than the field of view (graphite flakes), beside ice
balls, debris and grid-bar edges. The test is polarity-free and stated in units of the film's noise:

1. smooth the frame lightly (object scale, not pixels) and model the film (with its uneven
   illumination) as a quadratic surface fitted robustly to pixels known to be film (from the atlas's
   background cluster, mapped into this frame), else to a ring of pixels along the frame border that
   are not grid bar (bars are known from the atlas and mapped into this frame); the frame divided by
   that surface is the relative transmission, and the film noise is its robust sigma (1.4826 x MAD) on
   the ring;
2. pixels that differ from the film level by more than `min_contrast_sigma` noise sigmas, outside the bar
   mask, form objects (connected components, small holes filled);
3. the object nearest the frame centre, within `radius_px`, is the target: its centroid is where the
   stage re-centres, its median contrast (in sigmas) is the confirmation score. Nothing there: rejected.
4. whether that object's outline is round (`agent.locate.objects.is_round`: an ice ball, a frozen
   droplet, where crystals are faceted) is reported in `FoundObject.round_outline`, tested on the frame
   smoothed by 1 px only (the object-scale smoothing would round off a small crystal's corners). Objects
   cut by the frame edge and compound objects (a ball touching a crystal) are never called round. Only
   the object nearest the centre is judged: when it is round the target is rejected, even if a crystal
   lies a little further out (the atlas put the target on the nearest object).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.locate.objects import is_round
from drivers.geometry import image_centre_px


@dataclass(frozen=True)
class FoundObject:
    """An object found near the centre of a frame: centroid (col, row) px, area px, contrast (sigmas), and
    whether its outline is round (an ice ball rather than a crystal)."""

    col_px: float
    row_px: float
    area_px: float
    contrast_sigma: float
    touches_border: bool
    round_outline: bool = False
    #: Indices of the `others_px` points of `find_object_near_centre` that lie on this object (within 2 px).
    holds: tuple[int, ...] = ()


def find_object_near_centre(
    image: np.ndarray,
    *,
    radius_px: float,
    min_contrast_sigma: float = 3.0,
    exclude_mask: np.ndarray | None = None,
    film_mask: np.ndarray | None = None,
    smooth_px: float | None = None,
    min_area_px: float | None = None,
    point_px: tuple[float, float] | None = None,
    others_px: list[tuple[float, float]] | None = None,
) -> FoundObject | None:
    """The object nearest the centre of `image` (or the (col, row) pixel `point_px`: a target seen off-centre
    in another target's search image) within `radius_px`, or None (see module docstring). `others_px`: (col,
    row) pixels (e.g. where earlier snapshots of this frame's area were taken) to test against the object found
    (`FoundObject.holds`: those on it, so one object larger than the atlas saw is snapped once).

    `exclude_mask` (bool, image shape) marks pixels that can never be the object (grid bars);
    `film_mask` (bool) marks pixels known to be plain film (from the atlas): when it holds enough pixels
    it replaces the border ring as the film sample.
    """
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2 or min(data.shape) < 16:
        raise ValueError(f"confirmation needs a 2-D image of at least 16x16 px, got {data.shape}")
    rows, cols = data.shape
    smooth = smooth_px if smooth_px is not None else max(1.0, min(rows, cols) / 256)
    smoothed = ndimage.gaussian_filter(data, smooth)
    excluded = np.zeros(data.shape, dtype=bool) if exclude_mask is None else np.asarray(exclude_mask, dtype=bool)
    ring = _film_sample(excluded, film_mask)
    if ring is None:
        return None
    film, contrast = _film_and_contrast(smoothed, ring, smooth)
    objects = (contrast > min_contrast_sigma) & ~excluded
    objects = ndimage.binary_opening(objects, iterations=1)
    objects = ndimage.binary_fill_holes(objects)
    labels, count = ndimage.label(objects)
    if count == 0:
        return None
    minimum_area = min_area_px if min_area_px is not None else max(4.0, (smooth * 2) ** 2)
    centre = image_centre_px(data.shape)
    point = point_px if point_px is not None else (float(centre[0]), float(centre[1]))
    best, best_label = _nearest_object(objects, labels, count, contrast, radius_px, minimum_area, point)
    if best is not None and not best.touches_border:
        best = _judge_outline(best, best_label, labels, data, film)
    if best is not None and others_px:
        best = dataclasses.replace(best, holds=_points_on(labels == best_label, others_px))
    return best


def _points_on(member: np.ndarray, points_px: list[tuple[float, float]], tolerance_px: int = 2) -> tuple[int, ...]:
    """Indices of the (col, row) `points_px` that lie on the object `member` (bool mask) or within
    `tolerance_px` of it."""
    rows, cols = member.shape
    held = []
    for index, (col, row) in enumerate(points_px):
        c, r = round(float(col)), round(float(row))
        if not (0 <= c < cols and 0 <= r < rows):
            continue
        window = member[max(r - tolerance_px, 0): r + tolerance_px + 1, max(c - tolerance_px, 0): c + tolerance_px + 1]
        if window.any():
            held.append(index)
    return tuple(held)


def _film_sample(excluded: np.ndarray, film_mask: np.ndarray | None) -> np.ndarray | None:
    """Bool mask (image shape) of the pixels the film is measured on: the atlas's film pixels when there
    are at least 64 off the bars (`excluded`), else a ring along the frame border off the bars, else
    everything off the bars; None when fewer than 16 pixels remain."""
    rows, cols = excluded.shape
    border = max(2, min(rows, cols) // 32)
    ring = np.zeros(excluded.shape, dtype=bool)
    ring[:border, :] = ring[-border:, :] = ring[:, :border] = ring[:, -border:] = True
    ring &= ~excluded
    if film_mask is not None and np.count_nonzero(np.asarray(film_mask, dtype=bool) & ~excluded) >= 64:
        ring = np.asarray(film_mask, dtype=bool) & ~excluded
    if ring.sum() < 16:  # the border is all bar: use everything that is not bar
        ring = ~excluded
        if ring.sum() < 16:
            return None
    return ring


def _film_and_contrast(smoothed: np.ndarray, ring: np.ndarray, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """The film surface (`_film_surface`, image units, float32) and every pixel's contrast: its relative
    transmission's distance from 1 in film noise sigmas (robust sigma on `ring`, floored by shot noise
    after smoothing with a Gaussian of `smooth` px)."""
    film = _film_surface(smoothed, ring)
    relative = smoothed / np.maximum(film, 1e-6)
    residual = relative[ring] - 1.0
    noise = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    # Shot noise after smoothing still sets a floor when the ring is perfectly flat.
    noise = max(noise, 1e-6, 0.25 / math.sqrt(max(float(np.median(film[ring])), 1.0)) / max(smooth, 1.0))
    contrast = np.abs(relative - 1.0) / noise
    return film, contrast


def _nearest_object(
    objects: np.ndarray,
    labels: np.ndarray,
    count: int,
    contrast: np.ndarray,
    radius_px: float,
    minimum_area: float,
    point_px: tuple[float, float],
) -> tuple[FoundObject | None, int]:
    """Of the labelled objects (ids 1..count) of at least `minimum_area` px, the one nearest `point_px`
    (col, row) within `radius_px` (distance to the object itself, 0 when the point lies on it), and its
    label (0: none)."""
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    centre = point_px
    best: FoundObject | None = None
    best_label = 0
    best_distance = math.inf
    coms = ndimage.center_of_mass(objects, labels, index)
    touching = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    for label_id, area, (row, col) in zip(index, areas, coms, strict=True):
        if area < minimum_area:
            continue
        member = labels == label_id
        # Distance from the centre to the object itself (0 if the centre lies on it), not its centroid:
        # an object larger than the field of view still counts when the centre is on it.
        row_c = min(max(round(float(centre[1])), 0), member.shape[0] - 1)
        col_c = min(max(round(float(centre[0])), 0), member.shape[1] - 1)
        if member[row_c, col_c]:
            distance = 0.0
        else:
            object_rows, object_cols = np.nonzero(member)
            distance = float(np.min(np.hypot(object_cols - centre[0], object_rows - centre[1])))
        if distance <= radius_px and distance < best_distance:
            best_distance = distance
            best_label = int(label_id)
            best = FoundObject(
                col_px=float(col),
                row_px=float(row),
                area_px=float(area),
                contrast_sigma=float(np.median(contrast[member])),
                touches_border=int(label_id) in touching,
            )
    return best, best_label


def _judge_outline(
    best: FoundObject, best_label: int, labels: np.ndarray, data: np.ndarray, film: np.ndarray
) -> FoundObject:
    """`best` with `round_outline` set by `is_round` on its box of the frame `data`, smoothed by 1 px and
    divided by the `film` surface."""
    rows, cols = data.shape
    # the outline test needs fine detail: a light smoothing, not the object-scale one used to find it
    box = ndimage.find_objects((labels == best_label).astype(np.int32))[0]
    pad = 8
    rows_box = slice(max(box[0].start - pad, 0), min(box[0].stop + pad, rows))
    cols_box = slice(max(box[1].start - pad, 0), min(box[1].stop + pad, cols))
    fine = ndimage.gaussian_filter(data[rows_box, cols_box], 1.0) / np.maximum(film[rows_box, cols_box], 1e-6)
    inner = (
        slice(box[0].start - rows_box.start, box[0].stop - rows_box.start),
        slice(box[1].start - cols_box.start, box[1].stop - cols_box.start),
    )
    round_outline = is_round(fine, inner, labels[box] == best_label, 1.0)
    return dataclasses.replace(best, round_outline=round_outline)


def _film_surface(smoothed: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """A quadratic surface through the film pixels of the ring: robust start at the median, then three
    least-squares rounds on pixels within 3 robust sigmas (objects crossing the ring are left out)."""
    rows, cols = smoothed.shape
    ring_rows, ring_cols = np.nonzero(ring)
    step = max(1, len(ring_rows) // 20000)
    ring_rows, ring_cols = ring_rows[::step], ring_cols[::step]
    values = smoothed[ring_rows, ring_cols].astype(np.float64)

    def design(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        y, x = r / rows - 0.5, c / cols - 0.5
        return np.column_stack([np.ones_like(x), x, y, x * x, x * y, y * y])

    basis = design(ring_rows.astype(np.float64), ring_cols.astype(np.float64))
    # Start from the median (robust to objects covering up to half of the ring), then refine a quadratic
    # on the pixels within 3 robust sigmas of the current model, three times.
    coefficients = np.zeros(6)
    coefficients[0] = float(np.median(values))
    for _ in range(3):
        misfit = values - basis @ coefficients
        sigma = 1.4826 * float(np.median(np.abs(misfit - np.median(misfit)))) or 1e-9
        keep = np.abs(misfit) <= 3 * sigma
        if keep.sum() < 12:
            break
        coefficients, *_ = np.linalg.lstsq(basis[keep], values[keep], rcond=None)
    y = (np.arange(rows, dtype=np.float64) / rows - 0.5)[:, None]
    x = (np.arange(cols, dtype=np.float64) / cols - 0.5)[None, :]
    c = coefficients
    return (c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y).astype(np.float32)
