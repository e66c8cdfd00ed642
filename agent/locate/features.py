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
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from agent.locate.errors import ImageInputError, SettingsError

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


def _n_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


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
) -> None:
    """Fill `out[..., F]` from power sums of centred values (s1..s4), gradient sums, min and max."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = s1 / n
        e2 = s2 / n
        e3 = s3 / n
        e4 = s4 / n
        m1sq = m1 * m1
        var = np.where(vmax > vmin, np.maximum(e2 - m1sq, 0.0), 0.0)  # flat windows: exactly 0
        mu3 = e3 - 3.0 * m1 * e2 + 2.0 * m1sq * m1
        mu4 = e4 - 4.0 * m1 * e3 + 6.0 * m1sq * e2 - 3.0 * m1sq * m1sq
        reliable = var > _UNRELIABLE_VARIANCE * m1sq
        reliable &= var > 0
        safe_var = np.where(reliable, var, 1.0)
        std = np.sqrt(var)
        mean = m1 + ref
        skew = np.where(reliable, mu3 / (safe_var * np.sqrt(safe_var)), 0.0)
        kurt = np.where(reliable, mu4 / (safe_var * safe_var) - 3.0, 0.0)
        abs_mean = np.abs(mean)
        rel_std = np.where(abs_mean > 0, std / np.where(abs_mean > 0, abs_mean, 1.0), 0.0)
        grad = sg / n
        lag1 = np.where(reliable, 1.0 - grad / (2.0 * safe_var), 0.0)
        mode = np.clip(mean - 0.5 * skew * std, vmin, vmax)
    out[..., 0] = mean
    out[..., 1] = std
    out[..., 2] = rel_std
    out[..., 3] = skew
    out[..., 4] = kurt
    out[..., 5] = mode
    out[..., 6] = vmax - vmin
    out[..., 7] = grad
    out[..., 8] = lag1


def _gradient_energy(block: np.ndarray, next_row: np.ndarray | None, out: np.ndarray, tmp: np.ndarray) -> None:
    """Per-pixel gradient energy of float64 `block` (rows, cols) into `out`; `next_row` is the image row
    below the block (None at the bottom of the image, where vertical differences count as 0)."""
    out.fill(0.0)
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


def _run_parallel(tasks: list[Callable[[], None]]) -> None:
    n_threads = _n_threads()
    if n_threads == 1 or len(tasks) == 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


# --------------------------------------------------------------------------------------------------
# Grid patches
# --------------------------------------------------------------------------------------------------


def grid_edges_px(length_px: int, n_cells: int) -> np.ndarray:
    """Cell boundaries along one axis: ``n_cells + 1`` integers from 0 to `length_px`.

    ``round(linspace(0, length_px, n_cells + 1))``: cells differ in size by at most one pixel and every
    pixel belongs to exactly one cell (images need not be a multiple of the grid).
    """
    return np.round(np.linspace(0, length_px, n_cells + 1)).astype(np.int64)


def grid_features(image: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Statistics of every cell of a `rows` x `cols` grid laid over `image`.

    Returns ``(features, FEATURE_NAMES)`` with `features` of shape ``(rows * cols, F)`` float64 in
    row-major cell order (cell ``(i, j)`` is row ``i * cols + j``). Cell boundaries are
    `grid_edges_px`. Raises `ImageInputError` for unusable images and `SettingsError` when a cell would be
    smaller than 2x2 pixels.
    """
    check_image(image)
    height, width = image.shape
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
    ref = reference_level(image)
    edges_r = grid_edges_px(height, rows)
    edges_c = grid_edges_px(width, cols)
    sums = np.zeros((rows, 5, width), dtype=np.float64)  # s1..s4, gradient
    col_min = np.empty((rows, width), dtype=image.dtype)
    col_max = np.empty((rows, width), dtype=image.dtype)

    def work(cell_rows: list[int]) -> None:
        block = np.empty((_BAND_ROWS, width), dtype=np.float64)
        power = np.empty_like(block)
        grad = np.empty_like(block)
        tmp = np.empty_like(block)
        next_buf = np.empty(width, dtype=np.float64)
        for i in cell_rows:
            r_start, r_stop = int(edges_r[i]), int(edges_r[i + 1])
            acc = sums[i]
            col_min[i] = image[r_start:r_stop].min(axis=0)
            col_max[i] = image[r_start:r_stop].max(axis=0)
            for r0 in range(r_start, r_stop, _BAND_ROWS):
                r1 = min(r0 + _BAND_ROWS, r_stop)
                n = r1 - r0
                d, p, g, t = block[:n], power[:n], grad[:n], tmp[:n]
                np.subtract(image[r0:r1], ref, out=d, casting="unsafe")
                acc[0] += d.sum(axis=0)
                np.multiply(d, d, out=p)
                acc[1] += p.sum(axis=0)
                np.multiply(p, d, out=p)
                acc[2] += p.sum(axis=0)
                np.multiply(p, d, out=p)
                acc[3] += p.sum(axis=0)
                next_row = None
                if r1 < height:
                    np.subtract(image[r1], ref, out=next_buf, casting="unsafe")
                    next_row = next_buf
                _gradient_energy(d, next_row, g, t)
                acc[4] += g.sum(axis=0)

    n_threads = _n_threads()
    _run_parallel([(lambda part=part: work(part)) for part in np.array_split(np.arange(rows), n_threads) if len(part)])
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


def window_features(image: np.ndarray, window_px: int, stride_px: int = 1) -> tuple[np.ndarray, tuple[str, ...]]:
    """Statistics of a `window_px` x `window_px` window centred on every `stride_px`-th pixel.

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
    n_out_r, n_out_c = len(centres_r), len(centres_c)
    lo_c = np.clip(centres_c - half, 0, width)
    hi_c = np.clip(centres_c + half + 1, 0, width)
    count_c = (hi_c - lo_c).astype(np.float64)
    ref = reference_level(image)
    out = np.empty((n_out_r, n_out_c, len(FEATURE_NAMES)), dtype=np.float64)

    # output rows are processed in chunks; each chunk needs input rows [first centre - half, last + half]
    chunk_out = max(1, 64 // stride_px)
    chunks = [(i, min(i + chunk_out, n_out_r)) for i in range(0, n_out_r, chunk_out)]
    max_in = (chunk_out - 1) * stride_px + window_px

    def work(my_chunks: list[tuple[int, int]]) -> None:
        block = np.empty((max_in, width), dtype=np.float64)
        power = np.empty_like(block)
        grad = np.empty_like(block)
        tmp = np.empty_like(block)
        next_buf = np.empty(width, dtype=np.float64)
        csum = np.empty((max_in, width + 1), dtype=np.float64)
        col_sums = np.empty((5, max_in + 1, n_out_c), dtype=np.float64)
        for i0, i1 in my_chunks:
            rows_c = centres_r[i0:i1]
            in0 = max(0, int(rows_c[0]) - half)
            in1 = min(height, int(rows_c[-1]) + half + 1)
            n_in = in1 - in0
            d, p, g, t, cs = block[:n_in], power[:n_in], grad[:n_in], tmp[:n_in], csum[:n_in]
            np.subtract(image[in0:in1], ref, out=d, casting="unsafe")
            next_row = None
            if in1 < height:
                np.subtract(image[in1], ref, out=next_buf, casting="unsafe")
                next_row = next_buf
            _gradient_energy(d, next_row, g, t)
            cs[:, 0] = 0.0
            sources = (d, None, None, None, g)
            for k in range(5):
                if k == 0:
                    src = d
                elif k == 1:
                    np.multiply(d, d, out=p)
                    src = p
                elif k in (2, 3):
                    np.multiply(p, d, out=p)
                    src = p
                else:
                    src = sources[4]
                np.cumsum(src, axis=1, out=cs[:, 1:])
                target = col_sums[k, : n_in + 1]
                target[0] = 0.0
                np.subtract(cs[:, hi_c], cs[:, lo_c], out=target[1:])
                np.cumsum(target[1:], axis=0, out=target[1:])
            lo_r = np.clip(rows_c - half, 0, height) - in0
            hi_r = np.clip(rows_c + half + 1, 0, height) - in0
            window_sums = col_sums[:, hi_r, :] - col_sums[:, lo_r, :]  # (5, n_rows, n_out_c)
            counts = (hi_r - lo_r).astype(np.float64)[:, None] * count_c[None, :]
            raw = image[in0:in1]
            vmin = ndimage.minimum_filter1d(raw, window_px, axis=1, mode="nearest")[:, centres_c]
            vmin = ndimage.minimum_filter1d(vmin, window_px, axis=0, mode="nearest")[rows_c - in0]
            vmax = ndimage.maximum_filter1d(raw, window_px, axis=1, mode="nearest")[:, centres_c]
            vmax = ndimage.maximum_filter1d(vmax, window_px, axis=0, mode="nearest")[rows_c - in0]
            _moments_to_features(
                counts,
                window_sums[0],
                window_sums[1],
                window_sums[2],
                window_sums[3],
                window_sums[4],
                vmin.astype(np.float64),
                vmax.astype(np.float64),
                ref,
                out[i0:i1],
            )

    n_threads = _n_threads()
    parts = [chunks[k::n_threads] for k in range(n_threads)]
    _run_parallel([(lambda part=part: work(part)) for part in parts if part])
    return out, FEATURE_NAMES
