"""Patch statistics for clustering: grid patches and sliding windows, fully vectorised.

Both functions return the same features, in the same order (`FEATURE_NAMES`), so that a grid patch and
a sliding window can be compared (similarity, label memory):

====================  =====================================================================================
``mean``              mean grey value (image units)
``std``               standard deviation (population, ddof=0)
``rel_std``           std / |mean| (0 where the mean is 0)
``skewness``          third standardised central moment (0 where the patch is flat, see below)
``kurtosis``          excess kurtosis, m4/m2**2 - 3 (0 for a normal distribution; 0 where flat)
``mode``              cheap stand-in for the mode: ``mean - skewness * std / 2`` clipped to [min, max]
                      (exact for gamma-distributed grey values; a histogram mode is meaningless for noisy
                      16-bit data and would cost a histogram per patch)
``range``             max - min
``grad_energy``       mean over the patch of ((x[r, c+1] - x[r, c])**2 + (x[r+1, c] - x[r, c])**2) / 2
                      (forward differences; differences that would leave the image count as 0)
``lag1_corr``         1 - grad_energy / (2 * variance): ~0 for pixel noise, ~1 for smooth structure
                      (0 where flat); a scale-free texture measure
====================  =====================================================================================

Numerics: the image is converted to float64 in row bands and centred on a global reference (the median
of a sub-sample) before summing x, x**2, x**3, x**4; central moments follow from those sums. When a patch
lies so far from the reference that its higher moments cannot be trusted in float64 (variance below
1e-7 * (patch mean - reference)**2, or variance 0), skewness, kurtosis and lag1_corr are reported as 0;
a patch whose min equals its max has std exactly 0.
16-bit data stays in its dtype until a band is converted.

Border handling of `window_features`: the window around a centre pixel is clipped to the image, and the
statistics are over the pixels inside the image (so border windows have fewer pixels; no padding values
enter any statistic). Computing a tile of the output therefore needs a halo of ``window_px // 2 + 1``
input pixels on each side (the +1 is for the forward differences of ``grad_energy``).

Speed: work is done in row bands that fit the CPU cache, with re-used buffers, spread over threads
(numpy releases the GIL); memory beyond the output is a few tens of MiB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from agent.locate.errors import ImageInputError, SettingsError
from agent.locate.parallel import run_parallel, thread_count

logger = logging.getLogger(__name__)

#: Names of the feature columns, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "mean",
    "std",
    "rel_std",
    "skewness",
    "kurtosis",
    "mode",
    "range",
    "grad_energy",
    "lag1_corr",
)

#: Relative variance below which higher moments are not trusted (see module docstring).
_UNRELIABLE_VARIANCE = 1e-7

_BAND_ROWS = 32


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate a grayscale image: a 2-D numpy array of integers or floats, finite, not empty.

    Returns the array unchanged (no copy, no dtype change). Raises `ImageInputError` otherwise.
    """
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise ImageInputError(
            f"image must be 2-D grayscale (rows, cols), got shape {image.shape}; convert colour images to gray"
        )
    if image.dtype == np.bool_ or image.dtype.kind not in "uif":
        raise ImageInputError(f"unsupported pixel type {image.dtype}; use an integer or floating-point image")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageInputError(f"image of shape {image.shape} is too small; it needs at least 2x2 pixels")
    if image.dtype.kind == "f":
        sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
        if not np.all(np.isfinite(sample)) or not np.all(np.isfinite(image)):
            raise ImageInputError("image contains NaN or infinite values; replace them (e.g. by the median) first")
    return image


def reference_level(image: np.ndarray) -> float:
    """The global centring reference: median of a regular sub-sample of about 64k pixels (image units)."""
    step_r = max(1, image.shape[0] // 256)
    step_c = max(1, image.shape[1] // 256)
    return float(np.median(image[::step_r, ::step_c]))


def _new_scratch(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Re-usable temporaries for `_moments_to_features` on arrays of `shape`."""
    scratch = {name: np.empty(shape, dtype=np.float64) for name in ("inv", "m1", "e2", "e3", "e4", "a", "b", "v")}
    scratch["ok"] = np.empty(shape, dtype=bool)
    scratch["flat"] = np.empty(shape, dtype=bool)
    scratch["feat"] = np.empty((len(FEATURE_NAMES), *shape), dtype=np.float64)
    return scratch


def _moments_to_features(
    n: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    s3: np.ndarray,
    s4: np.ndarray,
    sg: np.ndarray,
    vmin: np.ndarray,
    vmax: np.ndarray,
    ref: float,
    out: np.ndarray,
    scratch: dict[str, np.ndarray] | None = None,
) -> None:
    """Fill `out[..., F]` from power sums of centred values (s1..s4), gradient sums, min and max.

    All inputs share one shape; `scratch` (from `_new_scratch`, re-used between calls) avoids allocating
    temporaries: fresh large arrays cost page faults on every call. Everything is computed into a
    contiguous (F, ...) buffer and copied into `out` once (strided writes are slow).
    """
    shape = np.shape(s1)
    if scratch is None or scratch["m1"].shape != shape:
        scratch = _new_scratch(shape)
    _spread_features(n, s1, s2, s3, s4, sg, vmin, vmax, ref, scratch)
    _shape_features(vmin, vmax, scratch)
    np.copyto(out, np.moveaxis(scratch["feat"], 0, -1))


def _spread_features(
    n: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    s3: np.ndarray,
    s4: np.ndarray,
    sg: np.ndarray,
    vmin: np.ndarray,
    vmax: np.ndarray,
    ref: float,
    scratch: dict[str, np.ndarray],
) -> None:
    """First stage of `_moments_to_features`: raw moments and the features of location and spread.

    Fills the feature rows mean (image units), std, rel_std and grad_energy of `scratch["feat"]`, and
    leaves in `scratch` what `_shape_features` needs: the raw moments m1, e2, e3, e4 of the centred values
    (`m1`, `e2`, `e3`, `e4`), ``a = m1**2``, `ok` (higher moments reliable, see the module docstring) and
    `v`, the variance made a safe denominator (1 added where unreliable).
    """
    inv, m1, e2, e3, e4 = scratch["inv"], scratch["m1"], scratch["e2"], scratch["e3"], scratch["e4"]
    a, b, var, ok, flat = scratch["a"], scratch["b"], scratch["v"], scratch["ok"], scratch["flat"]
    f_mean, f_std, f_rel, _skew, _kurt, _mode, _range, f_grad, _lag = scratch["feat"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(1.0, n, out=inv)
        np.multiply(s1, inv, out=m1)
        np.multiply(s2, inv, out=e2)
        np.multiply(s3, inv, out=e3)
        np.multiply(s4, inv, out=e4)
        np.multiply(sg, inv, out=f_grad)  # mean gradient energy
        # variance, exactly 0 where min == max
        np.multiply(m1, m1, out=a)  # a = m1^2
        np.subtract(e2, a, out=var)
        np.maximum(var, 0.0, out=var)
        np.not_equal(vmax, vmin, out=flat)  # flat = "not flat" here
        np.multiply(var, flat, out=var)
        # reliable higher moments: var > 1e-7 * m1^2 and var > 0
        np.multiply(a, _UNRELIABLE_VARIANCE, out=b)
        np.greater(var, b, out=ok)
        np.greater(var, 0.0, out=flat)
        ok &= flat
        np.add(m1, ref, out=f_mean)
        np.sqrt(var, out=f_std)
        # rel_std = std / |mean| (0 where the mean is 0)
        np.abs(f_mean, out=b)
        np.equal(b, 0.0, out=flat)
        b += flat
        np.divide(f_std, b, out=f_rel)
        np.logical_not(flat, out=flat)
        f_rel *= flat
        np.logical_not(ok, out=flat)  # flat = unreliable
        var += flat  # a safe denominator; unreliable results are zeroed below


def _shape_features(vmin: np.ndarray, vmax: np.ndarray, scratch: dict[str, np.ndarray]) -> None:
    """Second stage of `_moments_to_features`: the features of the distribution's shape.

    From what `_spread_features` left in `scratch`, fills the feature rows skewness, kurtosis (excess) and
    lag1_corr (all dimensionless, 0 where the higher moments are unreliable), mode (image units) and
    range (image units, from `vmin` and `vmax`) of `scratch["feat"]`. Overwrites `a`, `b` and `inv`.
    """
    inv, m1, e2, e3, e4 = scratch["inv"], scratch["m1"], scratch["e2"], scratch["e3"], scratch["e4"]
    a, b, var, ok = scratch["a"], scratch["b"], scratch["v"], scratch["ok"]
    f_mean, f_std, _rel_std, f_skew, f_kurt, f_mode, f_range, f_grad, f_lag = scratch["feat"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # mu3 = e3 - m1 * (3 e2 - 2 m1^2); skewness = mu3 / var^1.5
        np.multiply(e2, 3.0, out=b)
        np.multiply(a, 2.0, out=inv)
        b -= inv
        b *= m1
        np.subtract(e3, b, out=b)
        np.sqrt(var, out=inv)
        inv *= var
        np.divide(b, inv, out=f_skew)
        # mu4 = e4 - m1 * (4 e3 - m1 * (6 e2 - 3 m1^2)); kurtosis = mu4 / var^2 - 3
        np.multiply(e2, 6.0, out=b)
        a *= 3.0
        b -= a
        b *= m1
        np.multiply(e3, 4.0, out=a)
        a -= b
        a *= m1
        np.subtract(e4, a, out=a)
        np.multiply(var, var, out=b)
        np.divide(a, b, out=f_kurt)
        f_kurt -= 3.0
        # lag-1 correlation = 1 - grad / (2 var)
        np.divide(f_grad, var, out=a)
        np.multiply(a, -0.5, out=f_lag)
        f_lag += 1.0
        f_skew *= ok
        f_kurt *= ok
        f_lag *= ok
        # mode stand-in and range
        np.multiply(f_skew, f_std, out=a)
        np.multiply(a, -0.5, out=a)
        a += f_mean
        np.clip(a, vmin, vmax, out=f_mode)
        np.subtract(vmax, vmin, out=f_range)


def _gradient_energy(block: np.ndarray, next_row: np.ndarray | None, out: np.ndarray, tmp: np.ndarray) -> None:
    """Per-pixel gradient energy of float64 `block` (rows, cols) into `out`; `next_row` is the image row
    below the block (None at the bottom of the image, where vertical differences count as 0)."""
    out[:, -1] = 0.0  # the other columns are written next
    np.subtract(block[:, 1:], block[:, :-1], out=tmp[:, :-1])
    np.multiply(tmp[:, :-1], tmp[:, :-1], out=out[:, :-1])
    if block.shape[0] > 1:
        np.subtract(block[1:], block[:-1], out=tmp[:-1])
        np.multiply(tmp[:-1], tmp[:-1], out=tmp[:-1])
        out[:-1] += tmp[:-1]
    if next_row is not None:
        np.subtract(next_row, block[-1], out=tmp[-1])
        np.multiply(tmp[-1], tmp[-1], out=tmp[-1])
        out[-1] += tmp[-1]
    out *= 0.5


def _sliding_extreme(
    raw: np.ndarray, window_px: int, op: np.ufunc, centres_c: np.ndarray, local_rows: np.ndarray
) -> np.ndarray:
    """Min or max (`op` = np.minimum / np.maximum) of the clipped window around each centre.

    `raw` holds the input rows of one chunk; the result has shape (len(local_rows), len(centres_c)).
    Rows first, and only at the centre rows, then columns, only at the centre columns (min and max are
    exact in any order, so this is the same as any other order): with a stride the second pass works on a
    fraction of the pixels, and nothing is transposed.
    """
    vertical = _window_extreme(raw, window_px, op, local_rows)
    return _window_extreme(vertical.T, window_px, op, centres_c).T


def _window_extreme(a: np.ndarray, window_px: int, op: np.ufunc, centres: np.ndarray) -> np.ndarray:
    """`op` over rows c - half .. c + half of `a` (clipped to its rows) for each c of the increasing
    `centres`: (len(centres), *a.shape[1:]).

    Edge rows are repeated where a window leaves `a` (the edge value is inside the window anyway); a sparse
    table of power-of-two windows over the rows the windows cover gives each window as the `op` of two
    overlapping power-of-two windows.
    """
    half, rows = window_px // 2, a.shape[0]
    power = 1 << (window_px.bit_length() - 1)  # largest power of two <= window_px
    first, stop = int(centres[0]) - half, int(centres[-1]) + half + 1
    table = a[max(first, 0) : min(stop, rows)]
    if first < 0 or stop > rows:
        edges = (np.repeat(table[:1], max(0, -first), axis=0), np.repeat(table[-1:], max(0, stop - rows), axis=0))
        table = np.concatenate([edges[0], table, edges[1]])
    width = 1
    while width < power:
        table = op(table[:-width], table[width:])
        width *= 2
    starts = np.asarray(centres) - half - first
    return op(table[starts], table[starts + (window_px - power)])


# --------------------------------------------------------------------------------------------------
# Grid patches
# --------------------------------------------------------------------------------------------------


def grid_edges_px(length_px: int, n_cells: int) -> np.ndarray:
    """Cell boundaries along one axis: ``n_cells + 1`` integers from 0 to `length_px`.

    ``round(linspace(0, length_px, n_cells + 1))``: cells differ in size by at most one pixel and every
    pixel belongs to exactly one cell (images need not be a multiple of the grid).
    """
    return np.round(np.linspace(0, length_px, n_cells + 1)).astype(np.int64)


def check_grid(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """Validate a `rows` x `cols` grid over a `height` x `width` image; returns the counts as ints.

    Raises `SettingsError` for non-integer or non-positive counts and for cells smaller than 2x2 px.
    """
    if isinstance(rows, bool) or isinstance(cols, bool) or int(rows) != rows or int(cols) != cols:
        raise SettingsError(f"grid rows and cols must be integers, got {rows!r} x {cols!r}")
    rows, cols = int(rows), int(cols)
    if rows < 1 or cols < 1:
        raise SettingsError(f"grid must have at least 1x1 cells, got {rows}x{cols}")
    if rows * 2 > height or cols * 2 > width:
        raise SettingsError(
            f"a {rows}x{cols} grid is too fine for a {height}x{width} image (cells must be at least 2x2 px);"
            " use fewer grid cells"
        )
    return rows, cols


def grid_features(image: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Statistics of every cell of a `rows` x `cols` grid laid over `image`.

    Returns ``(features, FEATURE_NAMES)`` with `features` of shape ``(rows * cols, F)`` float64 in
    row-major cell order (cell ``(i, j)`` is row ``i * cols + j``). Cell boundaries are
    `grid_edges_px`. Raises `ImageInputError` for unusable images and `SettingsError` when a cell would be
    smaller than 2x2 pixels.
    """
    check_image(image)
    height, width = image.shape
    rows, cols = check_grid(rows, cols, height, width)
    ref = reference_level(image)
    edges_r = grid_edges_px(height, rows)
    edges_c = grid_edges_px(width, cols)
    sums = np.zeros((rows, 5, width), dtype=np.float64)  # s1..s4, gradient
    col_min = np.empty((rows, width), dtype=image.dtype)
    col_max = np.empty((rows, width), dtype=image.dtype)

    def work(cell_rows: list[int]) -> None:
        block = np.empty((_BAND_ROWS + 1, width), dtype=np.float64)
        power = np.empty((_BAND_ROWS, width), dtype=np.float64)
        ones = np.ones(_BAND_ROWS, dtype=np.float64)
        for i in cell_rows:
            r_start, r_stop = int(edges_r[i]), int(edges_r[i + 1])
            acc = sums[i]
            col_min[i] = image[r_start:r_stop].min(axis=0)
            col_max[i] = image[r_start:r_stop].max(axis=0)
            for r0 in range(r_start, r_stop, _BAND_ROWS):
                r1 = min(r0 + _BAND_ROWS, r_stop)
                n = r1 - r0
                with_next = r1 < height  # the row below the band, for vertical differences
                d_ext = block[: n + 1] if with_next else block[:n]
                np.subtract(image[r0 : r1 + 1] if with_next else image[r0:r1], ref, out=d_ext, casting="unsafe")
                d, p, o = block[:n], power[:n], ones[:n]
                np.multiply(d, d, out=p)
                s2 = o @ p
                acc[0] += o @ d
                acc[1] += s2
                acc[2] += np.einsum("ij,ij->j", p, d)
                acc[3] += np.einsum("ij,ij->j", p, p)
                # gradient energy from cross products (no difference arrays):
                # sum (x[c+1] - x[c])^2 = sum x[c+1]^2 + sum x[c]^2 - 2 sum x[c] x[c+1], per column c
                cross_h = np.einsum("ij,ij->j", d[:, :-1], d[:, 1:])
                acc[4, : width - 1] += 0.5 * (s2[1:] + s2[:-1] - 2.0 * cross_h)
                n_dy = d_ext.shape[0] - 1
                if n_dy > 0:
                    cross_v = np.einsum("ij,ij->j", d_ext[:-1], d_ext[1:])
                    first_sq = d_ext[0] * d_ext[0]
                    last_sq = d_ext[n_dy] * d_ext[n_dy]
                    # rows 0..n_dy-1 and rows 1..n_dy of d_ext, from the band's sum of squares
                    upper = s2 - (d[n - 1] * d[n - 1] if n_dy < n else 0.0)
                    lower = s2 - first_sq + (last_sq if n_dy == n else 0.0)
                    acc[4] += 0.5 * (upper + lower - 2.0 * cross_v)

    n_threads = thread_count()
    run_parallel([(lambda part=part: work(part)) for part in np.array_split(np.arange(rows), n_threads) if len(part)])
    cell_sums = np.add.reduceat(sums, edges_c[:-1], axis=2)  # (rows, 5, cols)
    vmin = np.minimum.reduceat(col_min, edges_c[:-1], axis=1).astype(np.float64)
    vmax = np.maximum.reduceat(col_max, edges_c[:-1], axis=1).astype(np.float64)
    counts = np.diff(edges_r)[:, None] * np.diff(edges_c)[None, :]
    out = np.empty((rows, cols, len(FEATURE_NAMES)), dtype=np.float64)
    _moments_to_features(
        counts.astype(np.float64),
        cell_sums[:, 0],
        cell_sums[:, 1],
        cell_sums[:, 2],
        cell_sums[:, 3],
        cell_sums[:, 4],
        vmin,
        vmax,
        ref,
        out,
    )
    return out.reshape(rows * cols, len(FEATURE_NAMES)), FEATURE_NAMES


# --------------------------------------------------------------------------------------------------
# Sliding windows
# --------------------------------------------------------------------------------------------------


def window_centres_px(length_px: int, stride_px: int) -> np.ndarray:
    """Centre pixels of the windows along one axis: ``0, stride, 2*stride, ... < length_px``."""
    return np.arange(0, length_px, stride_px, dtype=np.int64)


def window_output_shape(image_shape: tuple[int, ...], stride_px: int) -> tuple[int, int]:
    """(out_rows, out_cols) of `window_features` for an image of `image_shape` at `stride_px`."""
    return (-(-int(image_shape[0]) // stride_px), -(-int(image_shape[1]) // stride_px))


def check_window(image_shape: tuple[int, ...], window_px: int, stride_px: int) -> None:
    """Raise `SettingsError` unless `window_px` is odd, >= 3 and fits the image, and `stride_px` >= 1."""
    for name, value in (("window_px", window_px), ("stride_px", stride_px)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SettingsError(f"{name} must be an integer number of pixels, got {value!r}")
    if window_px < 3 or window_px % 2 == 0:
        raise SettingsError(
            f"window_px must be odd and >= 3 so that it is centred on a pixel, got {window_px}; "
            f"use {max(3, window_px + 1 - window_px % 2)}"
        )
    if stride_px < 1:
        raise SettingsError(f"stride_px must be >= 1, got {stride_px}")
    if window_px > min(int(image_shape[0]), int(image_shape[1])):
        raise SettingsError(
            f"window of {window_px} px is larger than the image ({image_shape[0]}x{image_shape[1]} px); "
            "use a smaller window"
        )


def window_features(
    image: np.ndarray,
    window_px: int,
    stride_px: int = 1,
    *,
    out: np.ndarray | None = None,
    row_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Statistics of a `window_px` x `window_px` window centred on every `stride_px`-th pixel.

    `out` (optional): a preallocated float64 array of the output shape to fill (saves allocating and
    first-touching a large array). `row_range=(i0, i1)` computes only output rows i0..i1-1 (the result
    then has i1 - i0 rows; used to stream a large image chunk by chunk, see `iter_window_features`).

    Output ``(out_rows, out_cols, F)`` float64 where out_rows = ceil(rows / stride) (`window_output_shape`);
    element ``[i, j]`` describes the window centred on pixel ``(row, col) = (i * stride, j * stride)``.
    Windows are clipped at the image border (see module docstring). Computed with running sums (cumulative
    sums per band of rows, separable) and separable min/max filters: no loop over windows.
    Raises `ImageInputError` / `SettingsError` for unusable inputs (even or too large window, bad stride).
    """
    check_image(image)
    check_window(image.shape, window_px, stride_px)
    height, width = image.shape
    half = window_px // 2
    centres_r = window_centres_px(height, stride_px)
    centres_c = window_centres_px(width, stride_px)
    if row_range is not None:
        i_start, i_stop = int(row_range[0]), int(row_range[1])
        if not 0 <= i_start < i_stop <= len(centres_r):
            raise SettingsError(f"row_range {row_range} outside the {len(centres_r)} output rows")
        centres_r = centres_r[i_start:i_stop]
    n_out_r, n_out_c = len(centres_r), len(centres_c)
    lo_c = np.clip(centres_c - half, 0, width)
    hi_c = np.clip(centres_c + half + 1, 0, width)
    count_c = (hi_c - lo_c).astype(np.float64)
    ref = reference_level(image)
    expected = (n_out_r, n_out_c, len(FEATURE_NAMES))
    if out is None:
        out = np.empty(expected, dtype=np.float64)
    elif out.shape != expected or out.dtype != np.float64:
        raise SettingsError(f"out must be float64 of shape {expected}, got {out.dtype} {out.shape}")

    # Output rows are processed in chunks; a chunk needs input rows [first centre - half, last + half].
    # Vertical window sums are running sums over rows (vector ops over whole rows), horizontal ones come
    # from cumulative sums along the row; min and max use a sparse table of power-of-two windows.
    chunk_out = max(1, 64 // stride_px)
    chunks = [(i, min(i + chunk_out, n_out_r)) for i in range(0, n_out_r, chunk_out)]
    plan = _WindowPlan(image, window_px, stride_px, centres_r, centres_c, count_c, ref, out, chunk_out)
    n_threads = thread_count()
    parts = [chunks[k::n_threads] for k in range(n_threads)]
    run_parallel([(lambda part=part: _window_chunks(plan, part)) for part in parts if part])
    return out, FEATURE_NAMES


#: Quantities summed over each window: d, d**2, d**3, d**4 (d = pixel - reference) and gradient energy.
_N_WINDOW_SUMS = 5


@dataclass(frozen=True)
class _WindowPlan:
    """What every chunk of one `window_features` call shares (lengths in pixels).

    `centres_r` / `centres_c`: the output's window centre rows / columns (px; rows already cut to
    `row_range`); `count_c`: pixels inside the image per window along a row, per output column (float64);
    `ref`: the centring reference (image units); `out`: the output array the chunks fill; `chunk_out`:
    output rows per chunk.
    """

    image: np.ndarray
    window_px: int
    stride_px: int
    centres_r: np.ndarray
    centres_c: np.ndarray
    count_c: np.ndarray
    ref: float
    out: np.ndarray
    chunk_out: int

    @property
    def half(self) -> int:
        """Pixels on each side of a window's centre."""
        return self.window_px // 2

    @property
    def max_in(self) -> int:
        """Most input rows a chunk needs."""
        return (self.chunk_out - 1) * self.stride_px + self.window_px

    @property
    def sub_rows(self) -> int:
        """Output rows per call of `_moments_to_features` (a block small enough for the CPU cache)."""
        return max(1, 16384 // len(self.centres_c))


@dataclass(frozen=True)
class _WindowBuffers:
    """One thread's re-used buffers for `_window_chunk` (float64 unless said; contents change per chunk).

    `block` (1, width): the centred image row below the chunk; `q` (max_in, 5, width): the summed
    quantities per pixel (`q[:, 0]` the centred rows); `tmp`: scratch for the gradient; `vert` (chunk_out,
    5, width): vertical window sums at the centre rows; `csum`: their cumulative sums along the row, padded
    by `half` on each side;
    `sums` (5, chunk_out, n_out_c): the window sums; `vmin` / `vmax` (chunk_out, n_out_c): window extremes;
    `scratches`: `_new_scratch` buffers per block shape.
    """

    block: np.ndarray
    q: np.ndarray
    tmp: np.ndarray
    vert: np.ndarray
    csum: np.ndarray
    sums: np.ndarray
    vmin: np.ndarray
    vmax: np.ndarray
    scratches: dict[tuple[int, int], dict[str, np.ndarray]]

    @classmethod
    def allocate(cls, plan: _WindowPlan) -> _WindowBuffers:
        """Buffers sized for the largest chunk of `plan`."""
        width, n_q, n_out_c = plan.image.shape[1], _N_WINDOW_SUMS, len(plan.centres_c)
        return cls(
            block=np.empty((1, width), dtype=np.float64),
            q=np.empty((plan.max_in, n_q, width), dtype=np.float64),
            tmp=np.empty((plan.max_in, width), dtype=np.float64),
            vert=np.empty((plan.chunk_out, n_q, width), dtype=np.float64),
            csum=np.zeros((plan.chunk_out, n_q, width + 1 + 2 * plan.half), dtype=np.float64),
            sums=np.empty((n_q, plan.chunk_out, n_out_c), dtype=np.float64),
            vmin=np.empty((plan.chunk_out, n_out_c), dtype=np.float64),
            vmax=np.empty((plan.chunk_out, n_out_c), dtype=np.float64),
            scratches={},
        )


def _window_chunks(plan: _WindowPlan, my_chunks: list[tuple[int, int]]) -> None:
    """Compute the output rows of `my_chunks` ((i0, i1) output row ranges) in one thread."""
    buffers = _WindowBuffers.allocate(plan)
    for i0, i1 in my_chunks:
        _window_chunk(plan, buffers, i0, i1)


def _window_chunk(plan: _WindowPlan, buffers: _WindowBuffers, i0: int, i1: int) -> None:
    """Fill output rows i0..i1-1 of `plan.out`: per-pixel quantities of the chunk's input rows, their
    vertical then horizontal window sums, the window extremes, then the features."""
    height = plan.image.shape[0]
    half = plan.half
    rows_c = plan.centres_r[i0:i1]
    n_rows = i1 - i0
    in0 = max(0, int(rows_c[0]) - half)
    in1 = min(height, int(rows_c[-1]) + half + 1)
    qq = _pixel_quantities(plan, buffers, in0, in1)
    # vertical running sums at the centre rows
    v = buffers.vert[:n_rows]
    local = rows_c - in0
    lo_r = np.clip(rows_c - half, 0, height) - in0
    hi_r = np.clip(rows_c + half + 1, 0, height) - in0
    _vertical_window_sums(qq, lo_r, hi_r, v, running=plan.stride_px < plan.window_px)
    window_sums = _horizontal_window_sums(plan, buffers, v)
    counts = (hi_r - lo_r).astype(np.float64)[:, None] * plan.count_c[None, :]
    raw = plan.image[in0:in1]
    vmin, vmax = buffers.vmin[:n_rows], buffers.vmax[:n_rows]
    vmin[...] = _sliding_extreme(raw, plan.window_px, np.minimum, plan.centres_c, local)
    vmax[...] = _sliding_extreme(raw, plan.window_px, np.maximum, plan.centres_c, local)
    # assemble in sub-blocks small enough for the CPU cache
    n_out_c = len(plan.centres_c)
    for j0 in range(0, n_rows, plan.sub_rows):
        j1 = min(j0 + plan.sub_rows, n_rows)
        shape = (j1 - j0, n_out_c)
        if shape not in buffers.scratches:
            buffers.scratches[shape] = _new_scratch(shape)
        _moments_to_features(
            counts[j0:j1],
            window_sums[0, j0:j1],
            window_sums[1, j0:j1],
            window_sums[2, j0:j1],
            window_sums[3, j0:j1],
            window_sums[4, j0:j1],
            vmin[j0:j1],
            vmax[j0:j1],
            plan.ref,
            plan.out[i0 + j0 : i0 + j1],
            buffers.scratches[shape],
        )


def _pixel_quantities(plan: _WindowPlan, buffers: _WindowBuffers, in0: int, in1: int) -> np.ndarray:
    """Per-pixel d, d**2, d**3, d**4 (d = pixel - `plan.ref`, image units) and gradient energy of input
    rows in0..in1-1, as a view (in1 - in0, 5, width) of `buffers.q`."""
    height = plan.image.shape[0]
    n_in = in1 - in0
    with_next = in1 < height
    qq = buffers.q[:n_in]
    d = qq[:, 0]  # the centred rows go straight into their place among the quantities
    np.subtract(plan.image[in0:in1], plan.ref, out=d, casting="unsafe")
    next_row = None
    if with_next:
        next_row = buffers.block[0]
        np.subtract(plan.image[in1], plan.ref, out=next_row, casting="unsafe")
    np.multiply(d, d, out=qq[:, 1])
    np.multiply(qq[:, 1], d, out=qq[:, 2])
    np.multiply(qq[:, 1], qq[:, 1], out=qq[:, 3])
    _gradient_energy(d, next_row, qq[:, 4], buffers.tmp[:n_in])
    return qq


def _vertical_window_sums(qq: np.ndarray, lo_r: np.ndarray, hi_r: np.ndarray, v: np.ndarray, *, running: bool) -> None:
    """Sums of `qq` over the input rows lo_r[k]..hi_r[k]-1 of each centre row k, into `v[k]`.

    `running` (windows overlap: stride < window): each sum is the previous one plus the rows entering and
    minus the rows leaving the window; otherwise every window is summed on its own.
    """
    n_rows = len(v)
    if not running:
        for k in range(n_rows):
            qq[lo_r[k] : hi_r[k]].sum(axis=0, out=v[k])
        return
    qq[lo_r[0] : hi_r[0]].sum(axis=0, out=v[0])
    tmp = np.empty(v.shape[1:], dtype=v.dtype)
    for k in range(1, n_rows):
        # v[k] = (v[k - 1] + entering) - leaving, the entering and leaving rows each summed first; the
        # first step writes v[k] directly instead of copying v[k - 1] and adding in place (same values)
        add0, add1 = hi_r[k - 1], hi_r[k]
        sub0, sub1 = lo_r[k - 1], lo_r[k]
        if add1 - add0 == 1:
            np.add(v[k - 1], qq[add0], out=v[k])
        elif add1 > add0:
            qq[add0:add1].sum(axis=0, out=tmp)
            np.add(v[k - 1], tmp, out=v[k])
        else:
            np.copyto(v[k], v[k - 1])
        if sub1 - sub0 == 1:
            v[k] -= qq[sub0]
        elif sub1 > sub0:
            qq[sub0:sub1].sum(axis=0, out=tmp)
            v[k] -= tmp


def _horizontal_window_sums(plan: _WindowPlan, buffers: _WindowBuffers, v: np.ndarray) -> np.ndarray:
    """Window sums (5, n_rows, n_out_c), a view of `buffers.sums`, from the vertical sums `v` (n_rows, 5,
    width): differences of cumulative sums (left pad of zeros, right pad repeating the total)."""
    half, width, stride_px = plan.half, plan.image.shape[1], plan.stride_px
    n_rows = len(v)
    cs = buffers.csum[:n_rows]
    np.cumsum(v, axis=2, out=cs[:, :, half + 1 : half + 1 + width])
    cs[:, :, half + 1 + width :] = cs[:, :, half + width : half + width + 1]
    window_sums = buffers.sums[:, :n_rows]
    np.subtract(
        cs[:, :, 2 * half + 1 : 2 * half + 1 + width : stride_px],
        cs[:, :, 0:width:stride_px],
        out=window_sums.transpose(1, 0, 2),
    )
    return window_sums


def iter_window_features(
    image: np.ndarray, window_px: int, stride_px: int = 1, chunk_rows: int = 256
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(i0, i1, features[i0:i1])`` of `window_features` in chunks of `chunk_rows` output rows.

    Memory stays bounded (one chunk plus buffers) for images of any height; the chunks equal the
    corresponding rows of the whole-image result. The yielded array is re-used by the next chunk: copy
    what you keep.
    """
    check_image(image)
    check_window(image.shape, window_px, stride_px)
    n_out_r, n_out_c = window_output_shape(image.shape, stride_px)
    buffer = np.empty((chunk_rows, n_out_c, len(FEATURE_NAMES)), dtype=np.float64)
    for i0 in range(0, n_out_r, chunk_rows):
        i1 = min(i0 + chunk_rows, n_out_r)
        window_features(image, window_px, stride_px, out=buffer[: i1 - i0], row_range=(i0, i1))
        yield i0, i1, buffer[: i1 - i0]
