"""Image clean-up before features: readout artefacts, uneven illumination, masked areas.

Real camera images carry hot and dead pixels, bright or dark columns and rows (readout stripes), and an
uneven beam. Left in, they dominate patch statistics (one hot pixel sets a patch's range and kurtosis)
and become clusters of their own. `prepare_image` removes them, in this order, on a float64 copy:

0. Saturated lines: a column or row of an integer image clipped at its top grey value (a bright readout column
   in an 8-bit export) is replaced by the interpolation of its neighbours (`repair_saturated_lines`).
1. Hot/dead pixels: a pixel more than 8 robust noise sigmas above the maximum (below the minimum) of its
   8 neighbours is replaced by the mean of that maximum and minimum. The noise sigma is 1.4826 * MAD of
   horizontal neighbour differences / sqrt(2) over the unmasked pixels (self-calibrating: nothing is
   tuned to a detector).
2. Stripes: every pixel is divided by the median of its 8 neighbours along its row (4 on each side,
   unmasked); the median of those ratios over the rows is the column's gain (rows likewise). Columns
   whose gain departs from 1 by more than 5 robust spreads of all gains (and 0.5 %) are divided by it.
   Ratios within a row cancel the illumination, so a column that keeps other rows than its neighbours
   (at a tilted bar edge) is not read as a stripe.
3. Illumination: divided by a smooth background, times the background's median (keeps the grey-value
   scale). The background is a normalised Gaussian convolution over unmasked pixels of a block-averaged
   copy, in two passes: sigma = 1/12 of the shorter side, then 1/24 with objects (pixels more than 3
   robust spreads from the first background) left out, so film thickness variations flatten and crystals
   are not absorbed.
4. Masked pixels (bars, black areas, annotation bands, seam strips, grown by 2 px: `filled_mask`) are set to
   the median film level, so a patch that only touches a bar is described by its film part.

Montages (`agent.locate.seams`): tiles that were exposed apart step in brightness where they meet. The seams
are found on the raw image first; each tile is flattened on its own (step 3), and a strip of
`SEAM_HALF_WIDTH_PX` along each seam is masked like a bar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from agent.locate.bitmask import PACKED_MIN_PX, packed_square_dilation

if TYPE_CHECKING:
    from agent.locate.seams import Seams


def noise_sigma(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Robust pixel-noise estimate (image units) from horizontal neighbour differences. Images of 8- and 16-bit
    integers are differenced as int32 (exact, and the median of whole numbers is the float one's: the middle
    value, or the mean of the two, in float64), without a float64 copy."""
    step = max(1, image.shape[0] // 512)
    if image.dtype.kind in "ui" and image.dtype.itemsize <= 2:
        sampled = image[::step]
        diffs = np.abs(np.subtract(sampled[:, 1:], sampled[:, :-1], dtype=np.int32))
    else:
        diffs = np.abs(np.diff(image[::step].astype(np.float64), axis=1))
    if mask is not None:
        keep = ~(mask[::step, 1:] | mask[::step, :-1])
        diffs = diffs[keep]
    if diffs.size == 0:
        return 0.0
    return float(1.4826 * np.median(diffs) / np.sqrt(2.0))


def remove_outlier_pixels(data: np.ndarray, sigma: float, threshold: float = 8.0) -> int:
    """In place: replace hot/dead pixels of float64 `data` (see module docstring); returns how many.

    Row bands of 64 (the temporaries stay small and cache-resident), each copied with its neighbour rows and
    columns (mirrored at the image's edges, as `np.pad(..., mode="reflect")`) into one re-used buffer; a band
    sees the rows above it as the previous band left them."""
    if sigma <= 0:
        sigma = float(np.std(data)) * 0.05
        if sigma <= 0:
            return 0
    count = 0
    rows, cols = data.shape
    band = 64
    limit = threshold * sigma
    padded = np.empty((band + 2, cols + 2))
    h_max, h_min = np.empty((band + 2, cols)), np.empty((band + 2, cols))
    n_max, n_min, scratch = np.empty((band, cols)), np.empty((band, cols)), np.empty((band, cols))
    hot, cold = np.empty((band, cols), dtype=bool), np.empty((band, cols), dtype=bool)
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        m = r1 - r0
        block = _reflected_band(data, r0, r1, padded[: m + 2])
        # 3-wide horizontal max/min of the rows above and below, plus the left and right neighbours
        hx, hn, nx, nn, tmp = h_max[: m + 2], h_min[: m + 2], n_max[:m], n_min[:m], scratch[:m]
        np.maximum(np.maximum(block[:, :-2], block[:, 1:-1], out=hx), block[:, 2:], out=hx)
        np.minimum(np.minimum(block[:, :-2], block[:, 1:-1], out=hn), block[:, 2:], out=hn)
        np.maximum(np.maximum(hx[:-2], hx[2:], out=nx), np.maximum(block[1:-1, :-2], block[1:-1, 2:], out=tmp), out=nx)
        np.minimum(np.minimum(hn[:-2], hn[2:], out=nn), np.minimum(block[1:-1, :-2], block[1:-1, 2:], out=tmp), out=nn)
        centre = data[r0:r1]
        outliers = np.greater(centre, np.add(nx, limit, out=tmp), out=hot[:m])
        outliers |= np.less(centre, np.subtract(nn, limit, out=tmp), out=cold[:m])
        n_out = int(np.count_nonzero(outliers))
        if n_out:
            centre[outliers] = 0.5 * (nx[outliers] + nn[outliers])
            count += n_out
    return count


#: A line (column or row) is saturated when more than this share of its unmasked pixels sit at the image's top value.
SATURATED_LINE_SHARE = 0.5
#: ... and its neighbours within `SATURATED_NEIGHBOUR_LINES` hold less than this share: a line, not a clipped area.
SATURATED_NEIGHBOUR_SHARE = 0.1
SATURATED_NEIGHBOUR_LINES = 3
#: At most this many neighbouring lines make one defect, and at most this share of all lines are defects.
SATURATED_MAX_RUN_LINES = 3
SATURATED_MAX_SHARE_OF_LINES = 0.01


def repair_saturated_lines(data: np.ndarray, image: np.ndarray, mask: np.ndarray) -> int:
    """In place: replace every saturated column and row of float64 `data` (a copy of the integer `image`) by the
    linear interpolation of the nearest unsaturated lines on either side; returns how many lines.

    A bright readout column clipped at the top grey value (an 8-bit export stretched to its brightest pixels
    clips it) has lost its gain: the stripe clean-up cannot divide it out, so it stayed a bright line across
    the frame, and as the strongest "bright object" of the image it swung the objects' polarity vote. A line is
    saturated when more than `SATURATED_LINE_SHARE` of its pixels outside `mask` sit at `image`'s maximum and its
    neighbours' do not (`SATURATED_NEIGHBOUR_SHARE`), in runs of at most `SATURATED_MAX_RUN_LINES` lines and
    `SATURATED_MAX_SHARE_OF_LINES` of all: a clipped area, or film at the top value all over, is left alone.
    Float images are not clipped to a grey level and are left alone too."""
    if not np.issubdtype(image.dtype, np.integer) or min(image.shape) < 2 * SATURATED_NEIGHBOUR_LINES + 3:
        return 0
    top = image.max()
    repaired = 0
    for axis in (0, 1):  # columns (counted down every 4th row), then rows (along every 4th column)
        sample = (slice(None, None, 4), slice(None)) if axis == 0 else (slice(None), slice(None, None, 4))
        unmasked = np.count_nonzero(~mask[sample], axis=axis)
        share = np.count_nonzero((image[sample] == top) & ~mask[sample], axis=axis) / np.maximum(unmasked, 1)
        bad = (share > SATURATED_LINE_SHARE) & (unmasked >= 8)
        if not bad.any():
            continue
        runs, _count = ndimage.label(bad)
        wide = np.bincount(runs)[runs] > SATURATED_MAX_RUN_LINES  # a clipped area, not a line
        window = 2 * SATURATED_NEIGHBOUR_LINES + 1
        busy = ndimage.maximum_filter1d(np.where(bad, 0.0, share), window) >= SATURATED_NEIGHBOUR_SHARE
        bad &= ~wide & ~busy
        if np.count_nonzero(bad) > SATURATED_MAX_SHARE_OF_LINES * bad.size:
            continue  # clipped film all over, not a few defective lines
        good = np.flatnonzero(~bad)
        lines = data if axis == 0 else data.T  # lines[:, k] is line k: a column, or a row of the transpose
        for line in np.flatnonzero(bad):
            after = int(np.searchsorted(good, line))
            left = int(good[after - 1]) if after > 0 else None
            right = int(good[after]) if after < good.size else None
            if left is None and right is None:
                continue
            if left is None or right is None:
                lines[:, line] = lines[:, left if right is None else right]
            else:
                weight = (line - left) / (right - left)
                lines[:, line] = (1 - weight) * lines[:, left] + weight * lines[:, right]
            repaired += 1
    return repaired


def _reflected_band(data: np.ndarray, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """`out` (r1 - r0 + 2, cols + 2) filled with rows `r0:r1` of `data` and one more row and column on every
    side: the image's own where it has them, else mirrored about the edge row or column (`np.pad(...,
    mode="reflect")`: the row above row 0 is row 1)."""
    rows = data.shape[0]
    out[1:-1, 1:-1] = data[r0:r1]
    out[0, 1:-1] = data[r0 - 1] if r0 > 0 else data[min(1, rows - 1)]
    out[-1, 1:-1] = data[r1] if r1 < rows else data[max(rows - 2, 0)]
    wide = out.shape[1] > 3  # at least two columns
    out[:, 0] = out[:, 2] if wide else out[:, 1]
    out[:, -1] = out[:, -3] if wide else out[:, -2]
    return out


#: Lines a pixel is compared with along its row: 8 on each side.
_STRIPE_WINDOW = 17
#: Passes of the stripe search (a stripe up to this many lines wide is measured against clean neighbours).
_MAX_STRIPE_PASSES = 4
#: Smallest gain error corrected (fraction).
_MIN_STRIPE_GAIN = 0.005


def _nan_median_axis0(values: np.ndarray) -> np.ndarray:
    """Column medians ignoring NaN (NaN where a column has no value); vectorised. The columns are sorted as
    contiguous rows of a transposed copy (the same order statistics as sorting along axis 0, faster)."""
    ordered = np.ascontiguousarray(values.T)
    ordered.sort(axis=1)  # NaN sort last
    n_valid = np.sum(np.isfinite(values), axis=0)
    cols = np.arange(values.shape[1])
    low = np.clip((n_valid - 1) // 2, 0, values.shape[0] - 1)
    high = np.clip(n_valid // 2, 0, values.shape[0] - 1)
    median = 0.5 * (ordered[cols, low] + ordered[cols, high])
    return np.where(n_valid > 0, median, np.nan)


def _window_sums(array: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Per element of the 2-D `array`, the sums of the `half` elements before it and of the `half` after it along
    its row (fewer at the row's ends), from one cumulative sum."""
    rows, cols = array.shape
    total = np.empty((rows, cols + 2 * half + 1))
    total[:, : half + 1] = 0.0
    np.cumsum(array, axis=1, out=total[:, half + 1 : half + 1 + cols])
    total[:, half + 1 + cols :] = total[:, half + cols : half + cols + 1]  # the last sum carried on
    left = total[:, half : half + cols] - total[:, :cols]  # columns c - half .. c - 1
    right = total[:, 2 * half + 1 : 2 * half + 1 + cols] - total[:, half + 1 : half + 1 + cols]
    return left, right


def _line_gains(sample: np.ndarray, exclude: np.ndarray, width: int = _STRIPE_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `sample` (rows x columns, NaN where masked): the median over rows of each pixel divided
    by the level of its neighbours in the same row (up to `width` // 2 on each side, at least 2 on each,
    columns flagged in `exclude` left out; the two sides' means interpolated to the pixel), and the standard
    error of that median. NaN where a column has
    too few such pixels.

    Ratios within a row cancel the illumination and the film level, so columns whose unmasked rows differ
    (a tilted bar edge ending in one column and not the next) are compared fairly; a column median of raw
    values would read the illumination of the rows it happens to keep as a gain. Neighbours on both sides
    cancel a gradient along the row (the beam's fall-off); so the outer two lines are never measured.
    (The arithmetic runs in place, in the order the expressions in the comments give.)
    """
    half = width // 2
    valid = np.isfinite(sample)
    usable = valid & ~exclude[None, :]
    left_sum, right_sum = _window_sums(np.where(usable, sample, 0.0), half)
    n_left, n_right = _window_sums(usable.astype(np.float64), half)
    with np.errstate(divide="ignore", invalid="ignore"):
        # each side's mean sits about (n + 1) / 2 lines away: interpolating between them cancels a gradient
        # along the row even where a mask leaves fewer neighbours on one side
        left_distance = np.add(n_left, 1)
        left_distance /= 2  # (n_left + 1) / 2
        right_distance = np.add(n_right, 1)
        right_distance /= 2
        # local = (right_distance * left_sum / n_left + left_distance * right_sum / n_right)
        #         / (left_distance + right_distance)
        left_sum *= right_distance
        left_sum /= n_left
        right_sum *= left_distance
        right_sum /= n_right
        local = left_sum
        local += right_sum
        left_distance += right_distance
        local /= left_distance
        # np.where(valid & (n_left >= 2) & (n_right >= 2) & (local != 0), sample / local, np.nan)
        keep = valid & (n_left >= 2)
        keep &= n_right >= 2
        keep &= local != 0
        ratio = np.divide(sample, local, out=right_sum)
        ratio[~keep] = np.nan
    gains = _nan_median_axis0(ratio)
    finite = np.isfinite(ratio)
    n_rows = np.sum(finite, axis=0)
    residual = np.subtract(ratio, gains[None, :], out=left_distance)[finite]
    sigma = 1.4826 * float(np.median(np.abs(residual[:: max(1, residual.size // 200_000)]))) if residual.size else 0.0
    # the median of integer counts is quantised (most columns land exactly on 1 at low dose): the spread of
    # the gains then says nothing, and the standard error of each median is the honest yardstick
    standard_error = 1.2533 * sigma / np.sqrt(np.maximum(n_rows, 1))
    enough = n_rows >= max(16, sample.shape[0] // 8)
    return np.where(enough, gains, np.nan), standard_error


def remove_stripes(data: np.ndarray, mask: np.ndarray | None = None, threshold: float = 5.0) -> int:
    """In place: divide out column and row gains that stand out (see module docstring); returns how many
    lines were corrected."""
    corrected = 0
    for axis in (0, 1):
        lines = data if axis == 0 else data.T
        line_mask = None if mask is None else (mask if axis == 0 else mask.T)
        step = max(1, lines.shape[0] // 256)
        sample = lines[::step].astype(np.float64)
        if line_mask is not None:
            sample[line_mask[::step]] = np.nan
        bad = np.zeros(sample.shape[1], dtype=bool)
        for _ in range(_MAX_STRIPE_PASSES):
            gain, standard_error = _line_gains(sample, bad)
            valid = np.isfinite(gain) & (gain > 0)
            if valid.sum() < 16:
                break
            signed = np.where(valid & ~bad, gain - 1.0, 0.0)
            deviation = np.abs(signed)
            clean = valid & ~bad
            spread = 1.4826 * float(np.median(deviation[clean])) if clean.any() else 0.0
            limit = np.maximum(threshold * np.maximum(spread, standard_error), _MIN_STRIPE_GAIN)
            # a stripe pulls its neighbours' means its way, so they seem to deviate the other way: per
            # pass, only lines on the dominant side of their neighbourhood and at least half as strong as
            # its strongest are taken; the next pass measures the rest against neighbours without them
            high = ndimage.maximum_filter1d(signed, size=_STRIPE_WINDOW)
            low = ndimage.minimum_filter1d(signed, size=_STRIPE_WINDOW)
            dominant = np.where(
                signed > 0, (high >= -low) & (signed >= 0.5 * high), (-low >= high) & (signed <= 0.5 * low)
            )
            new = clean & (deviation > limit) & dominant
            if not new.any():
                break
            bad |= new
        else:
            gain, _ = _line_gains(sample, bad)
        factors = np.where(bad & np.isfinite(gain) & (gain > 0), gain, 1.0)
        if (factors != 1.0).any():
            if axis == 0:
                data /= factors[None, :]
            else:
                data /= factors[:, None]
            corrected += int((factors != 1.0).sum())
    return corrected


def _interpolation_weights(n_out: int, n_in: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from block centres (block size `factor`, `n_in` blocks) to `n_out` pixels: per
    pixel the lower and upper block index and the upper block's weight (clamped at the ends)."""
    position = (np.arange(n_out) + 0.5) / factor - 0.5
    position = np.clip(position, 0, n_in - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, position - low


def _divide_by_upsampled(data: np.ndarray, background: np.ndarray, factor: int, level: float) -> None:
    """In place: `data` divided by `background` (blocks of `factor` px) bilinearly upsampled to its shape,
    times `level`. Band by band of rows, so the upsampled background never exists whole (at 4k it would
    be 128 MB written and read again; two matrix products with the interpolation matrices took longer). The
    block indices of the columns rise, so each band's columns are taken by `np.repeat` (the same values as
    indexing, 4x faster), into two buffers used by every band."""
    row_low, row_high, row_frac = _interpolation_weights(data.shape[0], background.shape[0], factor)
    col_low, col_high, col_frac = _interpolation_weights(data.shape[1], background.shape[1], factor)
    tall = background[row_low] * (1 - row_frac)[:, None] + background[row_high] * row_frac[:, None]
    n_blocks = background.shape[1]
    low_counts, high_counts = np.bincount(col_low, minlength=n_blocks), np.bincount(col_high, minlength=n_blocks)
    low_weight = 1 - col_frac
    band = 64
    full, high = np.empty((band, data.shape[1])), np.empty((band, data.shape[1]))
    for r0 in range(0, data.shape[0], band):
        rows = tall[r0 : r0 + band]
        n = rows.shape[0]
        np.multiply(np.repeat(rows, low_counts, axis=1), low_weight, out=full[:n])  # rows[:, col_low] * (1 - f)
        np.multiply(np.repeat(rows, high_counts, axis=1), col_frac, out=high[:n])  # rows[:, col_high] * f
        full[:n] += high[:n]
        block = data[r0 : r0 + band]
        block /= full[:n]
        block *= level


def flatten_illumination(
    data: np.ndarray, mask: np.ndarray, sigma_fraction: float = 1 / 12, seams: Seams | None = None
) -> float:
    """In place: divide float64 `data` by its smooth background times the background median; returns
    that median (the film level). See module docstring. `seams` (None or none found: one tile): a montage's
    seams (`seams.find_seams`); each tile they bound is flattened on its own, so no background is smoothed
    across a seam."""
    factor = max(1, min(data.shape) // 256)
    weight = block_mean(~mask, factor)
    # each block's mean over its unmasked pixels only: a block straddling a bar edge or a burned-in data
    # bar must not carry the bar's value into the background (it darkened or brightened the film beside
    # every mask, and a bright data bar in dark field left a band of false objects along it)
    with np.errstate(divide="ignore", invalid="ignore"):
        small = np.where(weight > 0, _unmasked_block_sum(data, mask, factor) / (weight * factor * factor), 0.0)
    sigma = max(1.0, min(small.shape) * sigma_fraction)
    if not seams:
        background = _background(small, weight, sigma)
    else:
        from agent.locate.seams import tile_labels

        tile_of_block = tile_labels(seams, factor)[: small.shape[0], : small.shape[1]]
        background = np.full(small.shape, np.nan)
        for tile in np.unique(tile_of_block):
            inside = tile_of_block == tile
            background[inside] = _background(small, weight * inside, sigma)[inside]
    if np.all(np.isnan(background)):
        return float(np.median(data))
    level = float(np.nanmedian(background))
    background = np.where(np.isfinite(background), background, level)
    background = np.maximum(background, max(abs(level) * 1e-3, 1e-12))
    _divide_by_upsampled(data, background, factor, level)
    return level


def _background(small: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """The smooth background of the block means `small` over blocks weighted by `weight` (their unmasked
    share), NaN where no weight reaches: pass 1 at `sigma` (blocks), pass 2 at `sigma` / 2 without the
    objects (robust outliers of pass 1; where no film is within its reach, the same at `sigma`), so the film's
    own thickness variations flatten while crystals are not absorbed into the background."""

    def smooth(weights: np.ndarray, width: float) -> np.ndarray:
        numerator = ndimage.gaussian_filter(small * weights, width, mode="nearest")
        denominator = ndimage.gaussian_filter(weights, width, mode="nearest")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denominator > 1e-3, numerator / denominator, np.nan)

    coarse = smooth(weight, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = small / coarse - 1.0
    usable = (weight > 0.5) & np.isfinite(ratio)
    if usable.sum() <= 16:
        return coarse
    centre = np.median(ratio[usable])
    spread = 1.4826 * np.median(np.abs(ratio[usable] - centre)) + 1e-12
    objects = ~np.isfinite(ratio) | (np.abs(ratio - centre) > 3.0 * spread)
    objects = ndimage.maximum_filter(objects.astype(np.uint8), size=3) > 0
    background = smooth(weight * ~objects, max(1.0, sigma / 2.0))
    # inside an object wider than pass 2 reaches (a crystal filling much of a search frame) there is no film:
    # the film around it at pass 1's width, still without the objects, rather than pass 1 itself, which the
    # object has pulled towards its own level (its middle was flattened towards the film level)
    background = np.where(np.isfinite(background), background, smooth(weight * ~objects, sigma))
    return np.where(np.isfinite(background), background, coarse)


def _unmasked_block_sum(data: np.ndarray, mask: np.ndarray, factor: int) -> np.ndarray:
    """Sum over each `factor` x `factor` block of the pixels of `data` outside `mask` (float64, block grid as
    `block_mean`). Band by band of rows, so no full-size masked copy of `data` is made."""
    rows = (data.shape[0] // factor) * factor
    band = factor * max(1, 256 // factor)
    parts = [
        _block_total(np.where(mask[top : top + band], 0.0, data[top : top + band]), factor)
        for top in range(0, rows, band)
    ]
    return np.concatenate(parts, axis=0)[: rows // factor]


def prepare_image(
    image: np.ndarray, mask: np.ndarray, flatten: bool = True, clean: bool = True, seams: Seams | None = None
) -> np.ndarray:
    """A float64 copy of `image` with artefacts removed, illumination flattened and masked pixels set
    to the film level (module docstring; `filled_mask` tells which). `mask` is the bar / black-area mask (image
    shape, bool); `seams` the image's montage seams when the caller has found them already (None: found here,
    `seams.find_seams`)."""
    from agent.locate.seams import find_seams

    if seams is None:
        seams = find_seams(image, mask)  # on the raw image: the stripe clean-up below bends a seam's step
    mask = _with_seam_band(mask, seams)
    data = image.astype(np.float64)
    if clean:
        repair_saturated_lines(data, image, mask)
        remove_outlier_pixels(data, noise_sigma(image, mask))
        remove_stripes(data, mask)
    if flatten:
        level = flatten_illumination(data, mask, seams=seams)
    else:
        unmasked = data[~mask] if (~mask).any() else data.ravel()
        level = float(np.median(unmasked[:: max(1, unmasked.size // 100_000)]))
    if mask.any():
        data[grow_mask(mask, FILL_GROWTH_PX)] = level
    return data


def filled_mask(mask: np.ndarray, seams: Seams) -> np.ndarray:
    """Bool mask of the pixels `prepare_image` sets to the film level for the bar / black-area `mask` and the
    montage `seams`: no measured value is left there, so nothing may be compared with them (an object beside
    a bar or a seam is not judged against the level written over the bar)."""
    return grow_mask(_with_seam_band(np.asarray(mask, dtype=bool), seams), FILL_GROWTH_PX)


def _with_seam_band(mask: np.ndarray, seams: Seams) -> np.ndarray:
    """`mask` with the strip along every seam (`seams.seam_band`, `SEAM_HALF_WIDTH_PX` or 1/256 of the shorter
    side, whichever is wider) added."""
    if not seams:
        return mask
    from agent.locate.seams import seam_band

    return mask | seam_band(seams, max(SEAM_HALF_WIDTH_PX, min(mask.shape) // 256))


#: Side (px, odd) of the square by which `prepare_image` grows the mask before it sets the masked pixels to the
#: film level: bar edges are a pixel or two wide, and their half-dark pixels are not film either.
FILL_GROWTH_PX = 5
#: Half-width (px) of the strip along a montage seam that is masked like a bar (at least one flattening block):
#: the stripe clean-up and the flattening's interpolation both reach a few lines across a seam.
SEAM_HALF_WIDTH_PX = 8


def block_sum(image: np.ndarray, factor: int) -> np.ndarray:
    """Sum of `factor` x `factor` pixel blocks as float32 (edges that do not fill a block are cropped)."""
    if factor <= 1:
        return np.asarray(image, dtype=np.float32)
    return _block_total(np.asarray(image), factor).astype(np.float32)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of `factor` x `factor` pixel blocks as float64 (edges that do not fill a block are cropped)."""
    if factor <= 1:
        return np.asarray(image, dtype=np.float64)
    return _block_total(np.asarray(image), factor) / float(factor * factor)


def _block_total(data: np.ndarray, factor: int) -> np.ndarray:
    """Block sums of `data` (factor >= 2), in float64 (int64 for bool: exact counts; for integer images
    exact too, so the same as numpy's sum over the block axes). 8- and 16-bit integers are summed as integers
    (int32 along the rows of a block, exact, 2-3x faster than in float64) and returned as float64: the same
    whole numbers."""
    rows, cols = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
    if data.dtype.kind in "ui" and data.dtype.itemsize <= 2 and factor <= 1 << 15:
        row_sums = data[:rows, :cols].reshape(rows // factor, factor, cols).sum(axis=1, dtype=np.int32)
        return row_sums.reshape(rows // factor, cols // factor, factor).sum(axis=2, dtype=np.int64).astype(np.float64)
    accumulator = np.int64 if data.dtype == np.bool_ else np.float64
    # the rows of a block first (whole contiguous rows added), then the short runs along each row: summing
    # over both block axes of the 4-D view at once is 3-10x slower
    row_sums = data[:rows, :cols].reshape(rows // factor, factor, cols).sum(axis=1, dtype=accumulator)
    return row_sums.reshape(rows // factor, cols // factor, factor).sum(axis=2, dtype=accumulator)


def grow_mask(mask: np.ndarray, size_px: int) -> np.ndarray:
    """`mask` (bool) dilated by a `size_px` x `size_px` square (odd side; at the border, the square's part
    inside the image): `ndimage.maximum_filter(mask, size_px) > 0` by shifted ORs, several times faster (full-size
    masks on packed bits, `bitmask.packed_square_dilation`)."""
    if size_px % 2 == 0:
        raise ValueError(f"size_px must be odd, got {size_px}")
    if np.size(mask) >= PACKED_MIN_PX and np.ndim(mask) == 2 and size_px <= 127:
        return packed_square_dilation(mask, size_px)
    grown = np.array(mask, dtype=bool)
    for axis in (0, 1):
        source = grown.copy() if size_px > 1 else grown
        view = grown if axis == 0 else grown.T
        src = source if axis == 0 else source.T
        for shift in range(1, size_px // 2 + 1):
            view[shift:] |= src[:-shift]
            view[:-shift] |= src[shift:]
    return grown
