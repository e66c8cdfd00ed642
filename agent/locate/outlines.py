"""Faint crystals found by their outline: long straight edges that window statistics cannot see.

Why: a thin plate with a few per cent of contrast (polymer lamellae, thin protein plates) at search
magnification is as dark as the film's own mottle, so no window statistic and no pixel threshold tells
it from the film. A person still sees it, by its edges: the film's mottle is smooth and has no direction,
a crystal facet is a sharp step along a straight line. Averaging the step's derivative along a line of
`length_px` adds the edge up coherently and the mottle and shot noise incoherently.

Steps (`find_outlines`):

1. Straight-edge response (`straight_edge_response`): for each of `N_ORIENTATIONS` edge directions,
   the derivative of the image across the edge (Gaussian derivative of `EDGE_SIGMA_PX`), averaged along
   the edge over `length_px`. Both filters are applied in Fourier space (one forward
   transform, one inverse per direction, float32) on a reflect-padded copy. Per pixel: the largest
   absolute response over the directions.
2. z-score: the response over its robust spread among pixels more than `MASK_MARGIN_PX` from the mask
   (1.4826 MAD about the median). Edges are a small share of the pixels, so this is the film's spread.
3. Edge pixels: the response's ridges (`ridge_pixels`: not smaller than the neighbours across the
   edge), with hysteresis (ridges reaching z >= `z_high` keep their pixels of z >= `z_low`); pixels
   within `MASK_MARGIN_PX` of the mask are ignored (after flattening, the mask's boundary -- a grid bar,
   a hole, a data bar -- is a straight step itself). Three kinds of ridge pixels are dropped:
   - tails: a line that runs on past the end of a facet still half lies on it, so pixels answering less
     than `MIN_RELATIVE_RESPONSE` of the strongest ridge within half a line are cut (outlines end at the
     corners);
   - seams: edges along an image axis whose pieces on one column or row spread over at least
     `SEAM_SPAN_FRACTION` of its pixels off the mask (`seam_mask`) are tile seams, bad columns or readout
     stripes. Faint seams that noise breaks into pieces over less of the frame, and a seam piece that
     grid bars cut down to one square, look like a facet along an image axis and stay;
   - short ridges: under three quarters of a line long. An edge of any length above the threshold makes
     a ridge about a line long or longer (the line keeps its full answer while it covers the whole
     edge), so these are fragments: noise, or irregular edges that NMS broke up.
4. Outlines: ridges less than a line apart (Euclidean) are linked (a polygon's corners answer weaker
   than its sides) and each linked group is filled by its convex hull. Where hulls overlap, the first
   keeps the overlap.
5. Straight only: a dense round or irregular object (an ice ball, debris) has edges strong enough to
   pass the long line where they curve. An outline is kept only when the ridges around it run in few
   directions (`direction_concentration`: the share of their strength in the three strongest of the
   `N_ORIENTATIONS` directions is at least `MIN_DIRECTION_SHARE`; a circle gives 3/12, a needle or a
   rectangle nearly 1). Every ridge around it counts, not only those that passed step 3: a ball's
   ring may have kept one arc only, and an arc runs in few directions.

The outlines are a shape cue, not a verdict: in `agent.locate.analysis` their cells form a cluster of their
own ("outlined"), which the operator or label memory then accepts or rejects like any other. Film folds
and wrinkles are straight too and come out as outlines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from agent.locate.objects import film_statistics

#: Directions of the line filters (180 deg / 12 = 15 deg apart).
N_ORIENTATIONS = 12
#: Gaussian sigma (px) of the derivative across the line.
EDGE_SIGMA_PX = 1.5
#: Pixels this close (px) to the mask are never edge pixels.
MASK_MARGIN_PX = 6
#: Axis-aligned edges spread over this share of a column or row (its pixels off the mask) are a seam ...
SEAM_SPAN_FRACTION = 0.8
#: ... if they cover at least this share of it.
SEAM_MIN_COVER = 0.1
#: Share of edge strength in the three strongest directions from which an outline counts as straight.
MIN_DIRECTION_SHARE = 0.55
#: Ridge pixels answering less than this share of the strongest ridge within half a line are trimmed.
MIN_RELATIVE_RESPONSE = 0.5


@dataclass(frozen=True)
class OutlineTable:
    """Outlines found in one image.

    - `labels` (image shape) int32: outline id (1..n) on each outline's filled hull, 0 elsewhere.
    - `rows_px`, `cols_px`, `area_px`: centroid and area (px) of each outline's pixels in `labels` (index
      i is id i + 1).
    - `edge_px` (int): how many edge pixels each outline has; `edge_z`: their mean straight-edge z-score.
    - `edge_z_map` (image shape) float32: the straight-edge z-score of every pixel (0 near the mask).
    """

    labels: np.ndarray
    rows_px: np.ndarray
    cols_px: np.ndarray
    area_px: np.ndarray
    edge_px: np.ndarray
    edge_z: np.ndarray
    edge_z_map: np.ndarray

    def __len__(self) -> int:
        return len(self.rows_px)


def straight_edge_response(
    data: np.ndarray, length_px: int, sigma_px: float = EDGE_SIGMA_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Largest absolute straight-edge response over `N_ORIENTATIONS` directions (float32, image shape)
    and the index of the direction that gave it (int8). Direction i is the edge's *normal* at
    theta = i * 180 / N_ORIENTATIONS deg from the +column axis towards +row: direction 0 is a vertical
    edge (a step along the columns), `N_ORIENTATIONS` / 2 a horizontal one.

    The response in direction theta is the image's derivative along the normal (Gaussian derivative of
    `sigma_px`) averaged along the edge over `length_px` pixels: a straight step edge of height h gives
    about h / (sigma sqrt(2 pi)) over its length, and the average falls off where the edge bends away
    from the line. Image units per pixel.
    """
    if length_px < 3:
        raise ValueError(f"length_px must be at least 3, got {length_px}")
    pad = int(length_px // 2 + 4 * sigma_px + 1)
    # reflect-pad by at least `pad`, up to sizes the FFT is fast for
    pad_rows, pad_cols = (fft.next_fast_len(n + 2 * pad, real=True) - n for n in data.shape)
    padded = np.pad(
        np.asarray(data, dtype=np.float32),
        ((pad, pad_rows - pad), (pad, pad_cols - pad)),
        mode="reflect",
    )
    spectrum = fft.rfft2(padded, workers=-1)
    ky = (2.0 * np.pi * fft.fftfreq(padded.shape[0])).astype(np.float32)[:, None]
    kx = (2.0 * np.pi * fft.rfftfreq(padded.shape[1])).astype(np.float32)[None, :]
    spectrum *= np.exp(-0.5 * sigma_px**2 * (kx * kx + ky * ky)).astype(np.float32)
    best = np.zeros(data.shape, dtype=np.float32)
    direction = np.zeros(data.shape, dtype=np.int8)
    inner = (slice(pad, pad + data.shape[0]), slice(pad, pad + data.shape[1]))
    for i in range(N_ORIENTATIONS):
        theta = np.pi * i / N_ORIENTATIONS
        across = np.float32(np.cos(theta)) * kx + np.float32(np.sin(theta)) * ky
        along = -np.float32(np.sin(theta)) * kx + np.float32(np.cos(theta)) * ky
        # d/dn is i k.n in Fourier space; a line average of length L along t is sinc(k.t L / 2 pi)
        response_spectrum = spectrum * (1j * across * np.sinc(along * np.float32(length_px / (2.0 * np.pi))))
        response = fft.irfft2(response_spectrum, s=padded.shape, workers=-1)[inner]
        response = np.abs(response)
        direction[response > best] = i
        np.maximum(best, response, out=best)
    return best, direction


def near_mask_px(mask: np.ndarray, margin_px: float = MASK_MARGIN_PX) -> np.ndarray:
    """True within `margin_px` (Euclidean distance, px) of `mask`, and on it."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    return ndimage.distance_transform_edt(~mask) <= margin_px


def edge_z_scores(response: np.ndarray, near_mask: np.ndarray) -> np.ndarray:
    """`response` as robust z-scores (`objects.film_statistics`: median and 1.4826 MAD) against the pixels
    off `near_mask` (float32); 0 on `near_mask`, and everywhere when there are fewer than 1000 pixels to
    measure the spread on."""
    z = np.zeros(response.shape, dtype=np.float32)
    off_mask = ~near_mask
    if np.count_nonzero(off_mask) < 1000:
        return z
    median, spread = film_statistics(response, off_mask, max_samples=500_000)
    np.subtract(response, np.float32(median), out=z)
    z /= np.float32(spread)
    z[near_mask] = 0.0
    return z


def direction_concentration(direction: np.ndarray, weight: np.ndarray) -> float:
    """Share of the total `weight` of edge pixels that falls in their three strongest directions (of
    `N_ORIENTATIONS`): 0.25 for a circle, about 0.5 up to 1 for a polygon of three or fewer edge
    directions (a facet between two directions splits over both), 1 for a single straight edge."""
    histogram = np.bincount(np.asarray(direction, dtype=np.intp), weights=weight, minlength=N_ORIENTATIONS)
    total = float(histogram.sum())
    return float(np.sort(histogram)[::-1][:3].sum() / total) if total > 0 else 0.0


def seam_mask(edges: np.ndarray, direction: np.ndarray, margin_px: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Pixels within `margin_px` of a tile seam or readout line: a column (row) whose edges along the
    image axis (direction 0: a vertical line, `N_ORIENTATIONS` / 2: a horizontal one) spread over at
    least `SEAM_SPAN_FRACTION` of its `valid` pixels (default: all; grid bars interrupt a seam) and
    cover at least `SEAM_MIN_COVER` of them. A facet is one straight piece; a seam is one line across
    the frame, even where noise or bars break it into pieces. Counted over 3 neighbouring columns
    (rows); the margin covers the oblique answers of the line filter where two seams cross."""
    valid = np.ones(edges.shape, dtype=bool) if valid is None else valid
    seams = np.zeros(edges.shape, dtype=bool)
    for axis, aligned in ((0, edges & (direction == 0)), (1, edges & (direction == N_ORIENTATIONS // 2))):
        # axis 0: down each column (vertical lines); axis 1: along each row (horizontal lines)
        aligned = ndimage.maximum_filter1d(aligned, 3, axis=1 - axis)
        size = edges.shape[axis]
        length = np.maximum(valid.sum(axis=axis), SEAM_SPAN_FRACTION * size)  # a line mostly on bars is no seam
        index = np.arange(size)[:, None] if axis == 0 else np.arange(size)[None, :]
        present = aligned.any(axis=axis)
        first = np.where(present, np.where(aligned, index, size).min(axis=axis), 0)
        last = np.where(present, np.where(aligned, index, -1).max(axis=axis), 0)
        spread = present & (last - first >= SEAM_SPAN_FRACTION * length)
        lines = spread & (aligned.sum(axis=axis) >= SEAM_MIN_COVER * length)
        lines = ndimage.binary_dilation(lines, iterations=margin_px)
        seams |= lines[None, :] if axis == 0 else lines[:, None]
    return seams


def ridge_pixels(response: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """True where `response` is not smaller than both neighbours across the edge (non-maximum
    suppression, with the edge normal rounded to the nearest of the 8 neighbours): the edge's centre line."""
    padded = np.pad(response, 1, mode="edge")
    rows, cols = response.shape
    ridge = np.zeros(response.shape, dtype=bool)
    normal_deg = direction.astype(np.float64) * (180.0 / N_ORIENTATIONS)
    sector = np.rint(normal_deg / 45.0).astype(np.intp) % 4  # 0: along x, 1: diagonal, 2: along y, 3: anti
    for index, (dr, dc) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = padded[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        behind = padded[1 - dr : 1 - dr + rows, 1 - dc : 1 - dc + cols]
        ridge |= (sector == index) & (response >= ahead) & (response >= behind)
    return ridge


def find_outlines(
    data: np.ndarray,
    mask: np.ndarray,
    length_px: int,
    *,
    z_high: float = 8.0,
    z_low: float = 5.0,
) -> OutlineTable:
    """Outlines of objects bounded by straight edges in a prepared image (see the module docstring).

    `data` is the cleaned, flattened float image (`preprocess.prepare_image`); `mask` is True on bars,
    holes and other areas with nothing to find; `length_px` the line length (px): about the shortest
    facet worth finding. `z_high` / `z_low` are the hysteresis thresholds in robust sigmas of the
    response (robust z-scores).
    """
    data = np.asarray(data)
    mask = np.asarray(mask, dtype=bool)
    length_px = int(length_px)
    shape = data.shape
    if data.ndim != 2 or mask.shape != shape:
        raise ValueError(f"need a 2-D image and a mask of its shape, got {data.shape} and {mask.shape}")
    if min(shape) < length_px:
        raise ValueError(f"lines of {length_px} px do not fit a {shape[0]}x{shape[1]} image")
    if not np.isfinite(data).all():
        raise ValueError("the image has NaN or infinite pixels")
    response, direction = straight_edge_response(data, length_px)
    near_mask = near_mask_px(mask)
    z = edge_z_scores(response, near_mask)
    ridge = ridge_pixels(response, direction)
    edges = _edge_pixels(ridge, z, direction, near_mask, length_px, z_high=z_high, z_low=z_low)
    if not edges.any():
        return OutlineTable(
            np.zeros(shape, np.int32), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64), np.zeros(0), z
        )
    return _straight_outlines(edges, ridge, z, direction, mask, length_px, z_low=z_low)


def _edge_pixels(
    ridge: np.ndarray,
    z: np.ndarray,
    direction: np.ndarray,
    near_mask: np.ndarray,
    length_px: int,
    *,
    z_high: float,
    z_low: float,
) -> np.ndarray:
    """Step 3 of the module docstring: the bool mask of edge pixels, the `ridge` pixels that pass the
    hysteresis on the z-scores `z` (robust sigmas) less seams, tails and ridges shorter than three
    quarters of a line (`length_px`). All False when no ridge reaches `z_high`."""
    strong = ridge & (z >= z_high)
    if not strong.any():
        return strong
    weak = ridge & (z >= z_low)
    weak &= ~seam_mask(weak, direction, max(1, length_px // 4), valid=~near_mask)
    # tails (module docstring); a faint ridge's tails are below z_low anyway
    nearby_peak = ndimage.maximum_filter(np.where(weak, z, 0.0), size=length_px)
    weak &= z >= MIN_RELATIVE_RESPONSE * nearby_peak
    weak_labels, n_weak = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    seeded = np.zeros(n_weak + 1, dtype=bool)
    seeded[np.unique(weak_labels[strong])] = True
    seeded[0] = False
    sizes = np.bincount(weak_labels.ravel(), minlength=n_weak + 1)
    keep = seeded & (sizes >= 0.75 * length_px)
    return keep[weak_labels]


def _straight_outlines(
    edges: np.ndarray,
    ridge: np.ndarray,
    z: np.ndarray,
    direction: np.ndarray,
    mask: np.ndarray,
    length_px: int,
    *,
    z_low: float,
) -> OutlineTable:
    """Steps 4 and 5 of the module docstring: edge pixels up to about a line (`length_px`) apart are linked
    (pixels within half a line of an edge join), each group is filled by its convex hull (off the mask),
    and a hull is kept when the ridges of z >= `z_low` around it run in few directions. Centroids and
    areas in pixels."""
    shape = edges.shape
    link = max(1, length_px // 2)
    groups, _count = ndimage.label(ndimage.distance_transform_edt(~edges) <= link)
    groups = np.where(edges, groups, 0)
    from skimage.morphology import convex_hull_image

    labels = np.zeros(shape, dtype=np.int32)
    rows_out, cols_out, areas, edge_counts, edge_means = [], [], [], [], []
    for group_id, box in enumerate(ndimage.find_objects(groups), start=1):
        if box is None:
            continue
        member = groups[box] == group_id
        hull = convex_hull_image(member) if member.sum() >= 3 else member
        hull &= ~mask[box]
        if not hull.any():
            continue
        # every ridge around the outline counts (module docstring, step 5)
        near = tuple(slice(max(b.start - link, 0), min(b.stop + link, n)) for b, n in zip(box, shape, strict=True))
        around = np.zeros((near[0].stop - near[0].start, near[1].stop - near[1].start), dtype=bool)
        r0, c0 = box[0].start - near[0].start, box[1].start - near[1].start
        around[r0 : r0 + hull.shape[0], c0 : c0 + hull.shape[1]] = hull
        ridges = (ndimage.distance_transform_edt(~around) <= link) & ridge[near] & (z[near] >= z_low)
        if direction_concentration(direction[near][ridges], z[near][ridges]) < MIN_DIRECTION_SHARE:
            continue
        own = hull & (labels[box] == 0)  # a hull inside an earlier one keeps only what is left
        if not own.any():
            continue
        labels[box][own] = len(rows_out) + 1
        hull_rows, hull_cols = np.nonzero(own)
        rows_out.append(box[0].start + hull_rows.mean())
        cols_out.append(box[1].start + hull_cols.mean())
        areas.append(float(own.sum()))
        edge_counts.append(int(member.sum()))
        edge_means.append(float(z[box][member].mean()))
    return OutlineTable(
        labels,
        np.asarray(rows_out, dtype=np.float64),
        np.asarray(cols_out, dtype=np.float64),
        np.asarray(areas, dtype=np.float64),
        np.asarray(edge_counts, dtype=np.int64),
        np.asarray(edge_means, dtype=np.float64),
        z,
    )
