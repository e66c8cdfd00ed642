"""Scoring a diffraction snapshot: how many Bragg spots, and how strong above the background.

A crystal in the beam gives sharp spots; amorphous ice or film gives diffuse rings; the central beam is a
bright disc with a smooth halo. All but the spots are (nearly) rotationally symmetric about the beam, so:

0. remove hot pixels: a pixel far above its 3x3 median while its neighbours are not elevated is a
   detector defect (a Bragg spot spreads over several pixels, so its neighbours are bright too);
1. find the beam centre (brightest point of a smoothed copy) and mask a disc around it;
2. background = the azimuthal median in each 1-px-wide radius bin; noise = the azimuthal robust sigma
   (1.4826 x median absolute deviation) in the same bin, so rings and the halo are modelled, not counted;
3. spots = local maxima of the lightly smoothed residual above `threshold_sigma` x the local noise, at
   least `min_separation_px` apart.

`signal_to_background` is the mean spot height over the mean background. Both are reported; the
screening plan decides the threshold (`min_spots`). Nothing here depends on the simulator: the steps
hold for any counting or integrating camera frame with a central beam.

Speed: the 3x3 median, the minimum and maximum filters and the per-bin medians have exact fast paths (order
statistics picked by min/max networks and a partition instead of scipy's rank filters and a full sort); they
give the same values bit for bit, and frames they cannot promise that for (NaN, negative zeros, ties of the
sort key) take the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.locate.preprocess import block_sum


@dataclass(frozen=True)
class DiffractionScore:
    """Result of `score_diffraction`: spot count, strength and where the spots are."""

    n_spots: int
    signal_to_background: float
    spots_col_row_px: tuple[tuple[float, float], ...]
    noise_sigma: float

    def as_dict(self) -> dict[str, float | int]:
        """JSON-friendly summary (without the spot list)."""
        return {"n_spots": self.n_spots, "signal_to_background": round(self.signal_to_background, 3)}


def score_diffraction(
    image: np.ndarray,
    *,
    threshold_sigma: float = 6.0,
    min_separation_px: int | None = None,
    beam_mask_fraction: float = 0.06,
    max_spots: int = 500,
) -> DiffractionScore:
    """Count Bragg spots in a diffraction frame (any 2-D numeric array)."""
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2 or min(data.shape) < 16:
        raise ValueError(f"diffraction frame must be 2-D and at least 16x16 px, got {data.shape}")
    data = remove_hot_pixels(data)
    factor = max(1, min(data.shape) // 1024)
    data = block_sum(data, factor)  # spots survive 2x2 binning; the radial statistics get 4x cheaper
    rows, cols = data.shape
    size = min(rows, cols)
    separation = min_separation_px or max(3, size // 100)
    smoothed = ndimage.gaussian_filter(data, 1.0)
    centre_row, centre_col = _smoothed_argmax(data, 4.0)
    radius = np.hypot(np.arange(rows)[:, None] - centre_row, np.arange(cols)[None, :] - centre_col)
    radius_bin = radius.astype(np.int64)
    background, noise = _radial_median_and_sigma(smoothed, radius_bin)
    residual = smoothed - background
    outside_beam = radius > beam_mask_fraction * size
    noise_sigma = float(_median(noise[outside_beam])) if np.any(outside_beam) else float(_median(noise))

    candidates = residual > threshold_sigma * noise
    candidates &= outside_beam
    peaks = _window_maxima(residual, candidates, 2 * separation + 1)
    spot_rows, spot_cols = np.nonzero(peaks)
    if len(spot_rows) > max_spots:
        strongest = np.argsort(residual[spot_rows, spot_cols])[::-1][:max_spots]
        spot_rows, spot_cols = spot_rows[strongest], spot_cols[strongest]
    heights = residual[spot_rows, spot_cols]
    mean_background = float(np.mean(background[outside_beam])) or 1.0
    signal = float(np.mean(heights)) / abs(mean_background) if len(heights) else 0.0
    spots = tuple(
        (float(c) * factor + (factor - 1) / 2, float(r) * factor + (factor - 1) / 2)
        for r, c in zip(spot_rows, spot_cols, strict=True)
    )
    return DiffractionScore(
        n_spots=len(spots), signal_to_background=signal, spots_col_row_px=spots, noise_sigma=noise_sigma
    )


def _smoothed_argmax(data: np.ndarray, sigma_px: float, block_px: int = 32) -> tuple[int, int]:
    """(row, col) of `np.argmax(ndimage.gaussian_filter(data, sigma_px))`, smoothing only the blocks that can
    hold the maximum: a Gaussian average is at most (1 + 1e-6) x the largest value within its reach (<= one
    block), so a block whose 3x3 neighbourhood peaks below a smoothed value already found is skipped. The
    smoothed values of a block come from a crop with the filter's reach around it: the same arithmetic, so
    the same values. Negative values (rounding of sums that cancel), NaN or infinities, and frames where most
    blocks qualify take the whole filter."""
    reach = int(4.0 * sigma_px + 0.5)  # ndimage's default truncate (4 sigma)
    rows, cols = data.shape
    n_r, n_c = -(-rows // block_px), -(-cols // block_px)
    padded = np.pad(data, ((0, n_r * block_px - rows), (0, n_c * block_px - cols)), constant_values=-np.inf)
    block_max = padded.reshape(n_r, block_px, n_c, block_px).max(axis=(1, 3))
    if reach > block_px or not np.isfinite(block_max).all() or float(data.min()) < 0:
        return _argmax_2d(ndimage.gaussian_filter(data, sigma_px))
    bound = ndimage.maximum_filter(block_max, size=3, mode="constant", cval=-np.inf)
    bound = bound + np.abs(bound) * 1e-6 + 1e-30

    def smoothed_block(b: int) -> tuple[np.ndarray, int, int]:
        r0, c0 = (b // n_c) * block_px, (b % n_c) * block_px
        cr0, cc0 = max(0, r0 - reach), max(0, c0 - reach)
        crop = ndimage.gaussian_filter(data[cr0:min(rows, r0 + block_px + reach), cc0:min(cols, c0 + block_px + reach)],
                                       sigma_px)
        return crop[r0 - cr0:r0 - cr0 + block_px, c0 - cc0:c0 - cc0 + block_px], r0, c0

    order = np.argsort(bound.ravel())[::-1]
    best = float(smoothed_block(int(order[0]))[0].max())
    candidates = np.flatnonzero(bound.ravel() >= best)
    if candidates.size > bound.size // 8:
        return _argmax_2d(ndimage.gaussian_filter(data, sigma_px))
    blocks = [smoothed_block(int(b)) for b in candidates]
    peak = max(float(block.max()) for block, _, _ in blocks)
    first = min((r0 + int(r)) * cols + c0 + int(c) for block, r0, c0 in blocks for r, c in zip(
        *np.nonzero(block == peak), strict=True))
    return first // cols, first % cols


def _argmax_2d(array: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(array)), array.shape)
    return int(row), int(col)


def _radial_median_and_sigma(image: np.ndarray, radius_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel azimuthal median and robust sigma of `image` over its radius bin."""
    flat_bins = radius_bin.ravel()
    n_bins = int(flat_bins.max()) + 1
    counts = np.bincount(flat_bins, minlength=n_bins)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # the pixels grouped by bin (a stable radix sort of small integers); order within a bin does not matter
    by_bin = np.argsort(flat_bins.astype(np.int16 if n_bins <= 2**15 else np.int64), kind="stable")
    sorted_bins = np.repeat(np.arange(n_bins), counts)  # = flat_bins[by_bin]
    image_values = image.ravel()[by_bin]
    values = image_values.astype(np.float64)
    medians = _per_bin_median(values, sorted_bins, starts, counts, image_values)
    mad = _per_bin_median(np.abs(values - np.repeat(medians, counts)), sorted_bins, starts, counts)
    sigma = np.maximum(1.4826 * mad, np.sqrt(np.maximum(medians, 0.0)) * 0.5 + 1e-6)
    return medians[radius_bin], sigma[radius_bin]


def _per_bin_median(
    x: np.ndarray, bins: np.ndarray, starts: np.ndarray, counts: np.ndarray, x_narrow: np.ndarray | None = None
) -> np.ndarray:
    """Lower median of `x` (float64) in each bin (0 for empty bins); `x` and `bins` sorted by bin, bin b at
    `starts[b]` for `counts[b]` values (so bins = repeat(arange, counts)); `x_narrow`: the same values in a
    narrower dtype (faster to partition).

    Defined by a stable sort of bin + value scaled into [0, 0.5] (sorted by bin, then by value within a bin;
    float64 keeps ~40 bits for the value). The same value is found by a partition of each bin's values (the
    key grows with the value), which is exact unless two different values share its key (then the full sort
    decides: the key, not the value, orders the values), or a zero median among signed zeros.
    """
    valid = counts > 0
    medians = np.zeros(counts.size)
    low, high = float(x.min()), float(x.max())
    key = bins + (x - low) / ((high - low) or 1.0) * 0.5
    kth = starts[valid] + (counts[valid] - 1) // 2
    if np.isfinite(low) and np.isfinite(high):
        partitioned = x if x_narrow is None else x_narrow
        for b in np.flatnonzero(valid):
            middle = (int(counts[b]) - 1) // 2
            medians[b] = np.partition(partitioned[starts[b]:starts[b] + counts[b]], middle)[middle]
        median_key = np.arange(counts.size) + (medians - low) / ((high - low) or 1.0) * 0.5
        at_median = key == np.repeat(median_key, counts)
        signed_zeros = np.any(medians == 0) and np.any(np.signbit(x) & (x == 0))  # a partition's zero may be -0
        if not signed_zeros and np.array_equal(x[at_median], np.repeat(medians, counts)[at_median]):
            return medians
    medians[valid] = x[np.argsort(key, kind="stable")][kth]
    return medians


def remove_hot_pixels(image: np.ndarray, isolation: float = 0.75, min_excess_sigma: float = 5.0) -> np.ndarray:
    """Replace isolated outliers (hot pixels) by their 3x3 median; returns a float32 copy.

    A pixel is a hot pixel when it exceeds its 3x3 median by more than `min_excess_sigma` robust sigmas
    of (image - median) and that excess is more than `isolation` of its height above the local minimum:
    a Gaussian spot of sigma 1 px keeps ~40 % of its height above its median, a lone pixel ~100 %.
    """
    data = np.array(image, dtype=np.float32)
    median = _median3x3(data)
    excess = data - median
    spread = 1.4826 * float(_median(np.abs(excess - _median(excess)))) or 1.0
    hot = excess > min_excess_sigma * spread
    if np.isnan(data).any():
        height = data - ndimage.minimum_filter(data, size=5)
    else:  # the 5x5 minimum only where it matters (exact: the same values as the filter's there)
        height = np.zeros_like(data)
        rows, cols = np.nonzero(hot)
        height[rows, cols] = data[rows, cols] - _window_extremes_at(np.pad(data, 2, mode="symmetric"), 2, rows,
                                                                    cols, 5, maximum=False)
    hot &= excess > isolation * np.maximum(height, 1e-6)
    data[hot] = median[hot]
    return data


def _median(values: np.ndarray) -> np.floating:
    """`np.median(values)` of a float array, bit for bit, mostly without partitioning all of it: the middle
    order statistics are picked from the values between two sample quantiles that must hold them (checked by
    counting; otherwise, and for NaN, small arrays or a zero median among signed zeros, `np.median` itself)."""
    flat = values.ravel()
    n = flat.size
    if n < 65536:
        return np.median(flat)
    ranks = [n // 2 - 1, n // 2] if n % 2 == 0 else [n // 2]
    sample = np.sort(flat[:: n // 4096])
    margin = 4 * int(np.sqrt(sample.size)) + 2
    middle = sample.size // 2
    low, high = sample[max(0, middle - margin)], sample[min(sample.size - 1, middle + margin)]
    below = int(np.count_nonzero(flat < low))
    above = int(np.count_nonzero(flat > high))
    window = flat[(flat >= low) & (flat <= high)]
    if below + window.size + above != n or not below <= ranks[0] or not ranks[-1] < below + window.size:
        return np.median(flat)  # NaN (no comparison holds) or the sample quantiles missed the middle
    if low == high:  # all the window's values are equal (integer frames: often 0)
        picked = window[: len(ranks)]
    else:
        picked = np.partition(window, [r - below for r in ranks])[[r - below for r in ranks]]
    if np.any(picked == 0) and np.any(np.signbit(window) & (window == 0)):
        return np.median(flat)  # which zero (+0 or -0) `np.median` returns depends on its partition
    return np.mean(picked)


def _median3x3(data: np.ndarray) -> np.ndarray:
    """`ndimage.median_filter(data, size=3)` (mode reflect) of a 2-D float32 array, by a min/max network.

    Sort each column of three, then the median of nine is the median of (the largest column minimum, the
    median of the column medians, the smallest column maximum): the same element, so the same value. NaN
    and negative zeros (whose order a network and a rank filter may break differently) take scipy's filter.
    """
    if np.isnan(data).any() or (np.signbit(data) & (data == 0)).any():
        return ndimage.median_filter(data, size=3)
    padded = np.pad(data, 1, mode="symmetric")  # numpy's symmetric is ndimage's reflect
    top, mid, bottom = padded[:-2], padded[1:-1], padded[2:]
    low, high = np.minimum(top, mid), np.maximum(top, mid)
    middle = np.minimum(high, bottom)
    np.maximum(low, middle, out=middle)
    np.minimum(low, bottom, out=low)
    np.maximum(high, bottom, out=high)
    cols = data.shape[1]
    max_low = np.maximum(low[:, :cols], low[:, 1:cols + 1])
    np.maximum(max_low, low[:, 2:], out=max_low)
    min_high = np.minimum(high[:, :cols], high[:, 1:cols + 1])
    np.minimum(min_high, high[:, 2:], out=min_high)
    mid_med = _median_of_three(middle[:, :cols], middle[:, 1:cols + 1], middle[:, 2:])
    return _median_of_three(max_low, mid_med, min_high)


def _median_of_three(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Elementwise median of three arrays: max(min(a, b), min(max(a, b), c)), in a new array."""
    upper = np.maximum(a, b)
    np.minimum(upper, c, out=upper)
    lower = np.minimum(a, b)
    return np.maximum(lower, upper, out=lower)


def _window_maxima(data: np.ndarray, candidates: np.ndarray, size: int) -> np.ndarray:
    """`candidates & (data == ndimage.maximum_filter(data, size))` (mode reflect, odd `size` >= 3), the window
    maximum taken at the candidates only, first over 3x3 (a candidate below a neighbour is no maximum) and
    then over the whole window: the same comparison of the same values. NaN, or a window wider than the
    array, take scipy's filter."""
    half = size // 2
    if size % 2 == 0 or size < 3 or half >= min(data.shape) or np.isnan(data).any():
        return candidates & (data == ndimage.maximum_filter(data, size=size))
    padded = np.pad(data, half, mode="symmetric")  # numpy's symmetric is ndimage's reflect
    rows, cols = np.nonzero(candidates)
    for width in (3, size):
        keep = _window_extremes_at(padded, half, rows, cols, width, maximum=True) == data[rows, cols]
        rows, cols = rows[keep], cols[keep]
    peaks = np.zeros(data.shape, dtype=bool)
    peaks[rows, cols] = True
    return peaks


def _window_extremes_at(
    padded: np.ndarray, pad: int, rows: np.ndarray, cols: np.ndarray, size: int, *, maximum: bool
) -> np.ndarray:
    """Maximum (or minimum) over the `size` x `size` window (odd size <= 2 pad + 1) centred on each pixel
    (rows[i], cols[i]) of an array padded by `pad` on every side."""
    start = pad - size // 2
    windows = np.lib.stride_tricks.sliding_window_view(padded[start:padded.shape[0] - start,
                                                              start:padded.shape[1] - start], (size, size))
    reduce = np.max if maximum else np.min
    out = np.empty(rows.size, dtype=padded.dtype)
    chunk = max(1, 2**21 // (size * size))
    for first in range(0, rows.size, chunk):
        last = min(rows.size, first + chunk)
        out[first:last] = reduce(windows[rows[first:last], cols[first:last]].reshape(last - first, -1), axis=1)
    return out
