"""Grid and sliding-window features over images larger than memory, tile by tile.

The source is a numpy array (a `np.memmap` works too) or any montage-like object with `shape_px`
(rows, cols), `dtype` and `read_region(row0, col0, rows, cols)` (e.g.
`drivers.formats.montage.TileMontage`). Results equal the whole-image computations of
`agent.locate.features` (`window_features`, `grid_features`) up to floating-point rounding: each
tile is centred on its own reference grey level (the whole image on one) and sums shorter rows.
Mean, std, range and grad_energy agree to ~1e-12 relative; skewness, kurtosis, mode and lag1_corr
to ~1e-5 of their range where the whole-image value is well conditioned, and may differ more in
windows whose mean lies far (> ~20 std) from the image median, e.g. on near-black grid bars, where
the whole-image higher moments are themselves inexact (the tile's are closer to exact). Should
`window_features`/`grid_features` accept a `reference=` keyword, the global reference
(`global_reference_level`) is passed to every tile and the difference shrinks to the row sums.

How (see `agent.locate.features` for the border rules):

- Sliding windows: the output is cut into tiles of `tile_px` input pixels (a multiple of the
  stride). Each tile is computed from its input region plus a halo of `window_px // 2 + 1` pixels
  (the +1 feeds the forward differences of `grad_energy`), rounded up to the stride and clipped at
  the mosaic border, so border windows are clipped exactly as in the whole image. Memory: one input
  tile with halo plus its features, independent of the mosaic size (plus the output array, which
  `iter_window_tiles` lets a caller avoid by consuming tiles as they come).
- Grid cells: each row of cells is read as a full-width band (plus the image row below it, whose
  vertical differences belong to the cells' `grad_energy`); two bands are computed at a time, so
  memory is two bands of cells (mosaic width x cell height), independent of the mosaic height.
- `dask_window_features` builds the same computation as a lazy `dask.array` (extra
  `crystal-locator[dask]`), for a Dask cluster or many grids at once.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent.locate.errors import ImageInputError, SettingsError
from agent.locate.features import (
    FEATURE_NAMES,
    check_grid,
    check_window,
    grid_edges_px,
    grid_features,
    window_features,
    window_output_shape,
)

logger = logging.getLogger(__name__)

#: Default tile size (input pixels per side) for the sliding-window path: 256 output elements a side,
#: within [1024, 2048] input pixels (fewer, larger tiles at coarse strides; each tile's features
#: stay below ~75 MiB at stride 1).
DEFAULT_TILE_PX: int | None = None


def default_tile_px(stride_px: int) -> int:
    """The tile side used when none is given: `256 * stride_px` clipped to [1024, 2048] pixels."""
    return int(min(2048, max(1024, 256 * int(stride_px))))
#: Bands of grid cells computed at the same time by `tiled_grid_features`.
_BAND_WORKERS = 2
_GRAD = FEATURE_NAMES.index("grad_energy")
_LAG1 = FEATURE_NAMES.index("lag1_corr")
_STD = FEATURE_NAMES.index("std")
_SKEW = FEATURE_NAMES.index("skewness")
_KURT = FEATURE_NAMES.index("kurtosis")


@runtime_checkable
class RegionSource(Protocol):
    """Anything that reads rectangular regions of a large 2-D image (e.g. a `TileMontage`)."""

    shape_px: tuple[int, int]
    dtype: Any

    def read_region(self, row0: int, col0: int, rows: int, cols: int, fill: float = 0) -> np.ndarray:
        """Pixels `[row0:row0+rows, col0:col0+cols]`; outside the image = fill."""
        ...


class _ArraySource:
    """A numpy array seen as a `RegionSource` (regions are views; callers copy when they need to)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape_px = (int(array.shape[0]), int(array.shape[1]))
        self.dtype = array.dtype

    def read_region(self, row0: int, col0: int, rows: int, cols: int, fill: float = 0) -> np.ndarray:
        if row0 >= 0 and col0 >= 0 and row0 + rows <= self.shape_px[0] and col0 + cols <= self.shape_px[1]:
            return self.array[row0 : row0 + rows, col0 : col0 + cols]
        out = np.full((rows, cols), fill, dtype=self.dtype)
        r_a, c_a = max(row0, 0), max(col0, 0)
        r_b, c_b = min(row0 + rows, self.shape_px[0]), min(col0 + cols, self.shape_px[1])
        if r_b > r_a and c_b > c_a:
            out[r_a - row0 : r_b - row0, c_a - col0 : c_b - col0] = self.array[r_a:r_b, c_a:c_b]
        return out


def as_region_source(source: np.ndarray | RegionSource) -> RegionSource:
    """`source` as a `RegionSource`; raises `ImageInputError` for anything else (e.g. a 3-D array)."""
    if isinstance(source, np.ndarray):
        if source.ndim != 2:
            raise ImageInputError(f"image must be 2-D (rows, cols), got shape {source.shape}")
        return _ArraySource(source)
    if hasattr(source, "read_region") and hasattr(source, "shape_px"):
        return source
    raise ImageInputError(
        f"expected a 2-D numpy array or a montage with shape_px and read_region(), got {type(source).__name__}"
    )


@dataclass(frozen=True)
class WindowTile:
    """Sliding-window features of one output tile: `features[i, j]` is output element
    `(out_row0 + i, out_col0 + j)`, i.e. the window centred on pixel
    `((out_row0 + i) * stride, (out_col0 + j) * stride)`."""

    out_row0: int
    out_col0: int
    features: np.ndarray


def _input_span(start: int, stop: int, length: int, halo: int, window_px: int, stride_px: int) -> tuple[int, int]:
    """Input rows (or cols) needed for output centres in [start, stop): halo each side, >= one window,
    starting on a multiple of the stride so the tile's centres fall on the global centre grid."""
    lo = min(start - halo, stop - window_px)
    lo = max(0, (lo // stride_px) * stride_px)
    hi = min(length, max(stop + halo, lo + window_px))
    return lo, hi


def global_reference_level(source: np.ndarray | RegionSource) -> float:
    """The whole image's centring reference, sampled as `agent.locate.features.reference_level` does
    (median of every (rows // 256)-th row and (cols // 256)-th column), reading one sampled row at a time."""
    src = as_region_source(source)
    height, width = src.shape_px
    step_r = max(1, height // 256)
    step_c = max(1, width // 256)
    samples = [np.asarray(src.read_region(r, 0, 1, width))[0, ::step_c] for r in range(0, height, step_r)]
    return float(np.median(np.concatenate(samples)))


def _reference_kwargs(function: Any, source: RegionSource) -> dict[str, float]:
    """`{"reference": global level}` when the feature function accepts one (it makes tiles bit-closer
    to the whole image in nearly flat areas far from the tile's own grey level), else `{}`."""
    try:
        accepts = "reference" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # pragma: no cover
        accepts = False
    return {"reference": global_reference_level(source)} if accepts else {}


def iter_window_tiles(
    source: np.ndarray | RegionSource, window_px: int, stride_px: int = 1, tile_px: int | None = DEFAULT_TILE_PX
) -> Iterator[WindowTile]:
    """Yield `window_features(whole image, window_px, stride_px)` tile by tile, row-major.

    `tile_px` (input pixels per tile side; default `default_tile_px(stride_px)`) is rounded up to a
    multiple of `stride_px`. Only one tile (with halo) and its features are in memory at a time.
    Raises `SettingsError` for a bad window or stride, `ImageInputError` for an unusable source.
    """
    src = as_region_source(source)
    height, width = src.shape_px
    check_window((height, width), window_px, stride_px)
    if tile_px is None:
        tile_px = default_tile_px(stride_px)
    if isinstance(tile_px, bool) or not isinstance(tile_px, (int, np.integer)) or tile_px < 1:
        raise SettingsError(f"tile_px must be a positive integer, got {tile_px!r}")
    tile = -(-int(tile_px) // stride_px) * stride_px
    halo = -(-(window_px // 2 + 1) // stride_px) * stride_px
    extra = _reference_kwargs(window_features, src)
    for r0 in range(0, height, tile):
        r1 = min(r0 + tile, height)
        in_r0, in_r1 = _input_span(r0, r1, height, halo, window_px, stride_px)
        for c0 in range(0, width, tile):
            c1 = min(c0 + tile, width)
            in_c0, in_c1 = _input_span(c0, c1, width, halo, window_px, stride_px)
            region = np.ascontiguousarray(src.read_region(in_r0, in_c0, in_r1 - in_r0, in_c1 - in_c0))
            feats, _ = window_features(region, window_px, stride_px, **extra)
            out_r0, out_c0 = r0 // stride_px, c0 // stride_px
            n_r = -(-(r1 - r0) // stride_px)
            n_c = -(-(c1 - c0) // stride_px)
            skip_r = (r0 - in_r0) // stride_px
            skip_c = (c0 - in_c0) // stride_px
            yield WindowTile(out_r0, out_c0, feats[skip_r : skip_r + n_r, skip_c : skip_c + n_c].copy())
            del feats, region


def tiled_window_features(
    source: np.ndarray | RegionSource,
    window_px: int,
    stride_px: int = 1,
    tile_px: int | None = DEFAULT_TILE_PX,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Like `window_features(image, window_px, stride_px)` on the whole image, computed tile by tile.

    `out`, if given, receives the result (shape `(out_rows, out_cols, F)` float64, e.g. a `np.memmap`
    for outputs larger than memory); else a new array is made. Returns `(features, FEATURE_NAMES)`.
    """
    src = as_region_source(source)
    check_window(src.shape_px, window_px, stride_px)
    shape = (*window_output_shape(src.shape_px, stride_px), len(FEATURE_NAMES))
    if out is None:
        out = np.empty(shape, dtype=np.float64)
    elif out.shape != shape or out.dtype != np.float64:
        raise SettingsError(f"out must be float64 of shape {shape}, got {out.dtype} {out.shape}")
    for tile in iter_window_tiles(src, window_px, stride_px, tile_px):
        n_r, n_c = tile.features.shape[:2]
        out[tile.out_row0 : tile.out_row0 + n_r, tile.out_col0 : tile.out_col0 + n_c] = tile.features
    return out, FEATURE_NAMES


def tiled_grid_features(source: np.ndarray | RegionSource, rows: int, cols: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Like `grid_features(image, rows, cols)` on the whole image, one full-width row of cells at a time.

    Returns `((rows * cols, F) float64, FEATURE_NAMES)` in row-major cell order. Each band is
    computed with `grid_features(band, 1, cols)`; the vertical differences between a band's last row
    and the next image row (part of `grad_energy` in the whole-image computation) are added here,
    and `lag1_corr` follows from the corrected `grad_energy`.
    """
    src = as_region_source(source)
    height, width = src.shape_px
    rows, cols = check_grid(rows, cols, height, width)
    edges_r = grid_edges_px(height, rows)
    edges_c = grid_edges_px(width, cols)
    out = np.empty((rows, cols, len(FEATURE_NAMES)), dtype=np.float64)
    extra = _reference_kwargs(grid_features, src)

    def band_features(i: int) -> None:
        r_a, r_b = int(edges_r[i]), int(edges_r[i + 1])
        with_next = r_b < height
        band = np.ascontiguousarray(src.read_region(r_a, 0, r_b - r_a + (1 if with_next else 0), width))
        feats, _ = grid_features(band[: r_b - r_a], 1, cols, **extra)
        feats = feats.reshape(cols, len(FEATURE_NAMES))
        if with_next:
            last = band[r_b - r_a - 1].astype(np.float64)
            below = band[r_b - r_a].astype(np.float64)
            energy = 0.5 * (below - last) ** 2
            missing = np.add.reduceat(energy, edges_c[:-1])
            counts = (r_b - r_a) * np.diff(edges_c).astype(np.float64)
            _add_gradient_energy(feats, missing / counts)
        out[i] = feats

    # grid_features parallelises over cell rows, so one band of one row runs on one core: run two
    # bands at a time (numpy releases the GIL); memory is then two bands
    workers = max(1, min(_BAND_WORKERS, rows, os.cpu_count() or 1))
    if workers == 1:
        for i in range(rows):
            band_features(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(band_features, i) for i in range(rows)]:
                future.result()
    return out.reshape(rows * cols, len(FEATURE_NAMES)), FEATURE_NAMES


def _add_gradient_energy(feats: np.ndarray, extra: np.ndarray) -> None:
    """Add `extra` to `grad_energy` and update `lag1_corr = 1 - grad / (2 var)` where it was defined.

    `lag1_corr` is 0 where `agent.locate.features` judged the moments unreliable; those cells are
    recognised by skewness, kurtosis and lag1_corr all being exactly 0 and are left at 0.
    """
    reliable = (feats[:, _LAG1] != 0) | (feats[:, _SKEW] != 0) | (feats[:, _KURT] != 0)
    feats[:, _GRAD] += extra
    var = feats[:, _STD] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        feats[:, _LAG1] = np.where(reliable & (var > 0), 1.0 - feats[:, _GRAD] / (2.0 * var), 0.0)


# --------------------------------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------------------------------


class _DaskAdapter:
    """Array-like (shape, dtype, ndim, slicing) over a `RegionSource`, for `dask.array.from_array`."""

    def __init__(self, source: RegionSource) -> None:
        self._source = source
        self.shape = tuple(int(v) for v in source.shape_px)
        self.dtype = np.dtype(source.dtype)
        self.ndim = 2

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        return np.asarray(self._source.read_region(r0, c0, max(0, r1 - r0), max(0, c1 - c0)))


def _import_dask() -> Any:
    try:
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the dask path needs the optional 'dask' package; install it with: pip install 'crystal-locator[dask]'"
        ) from exc
    return da


def as_dask_array(source: np.ndarray | RegionSource, chunk_px: int = 2048) -> Any:
    """A lazy `dask.array` over `source` in chunks of `chunk_px` (needs the `dask` extra)."""
    da = _import_dask()
    src = as_region_source(source)
    if isinstance(source, np.ndarray):
        return da.from_array(source, chunks=(chunk_px, chunk_px))
    return da.from_array(_DaskAdapter(src), chunks=(chunk_px, chunk_px), meta=np.empty((0, 0), dtype=src.dtype))


def _chunk_sizes(length: int, chunk: int, window_px: int) -> tuple[int, ...]:
    """Chunk sizes along one axis: `chunk` each, a last chunk smaller than a window merged into the one before."""
    sizes = [chunk] * (length // chunk)
    remainder = length - chunk * len(sizes)
    if remainder:
        if sizes and remainder < window_px:
            sizes[-1] += remainder
        else:
            sizes.append(remainder)
    return tuple(sizes)


def dask_window_features(
    source: np.ndarray | RegionSource | Any, window_px: int, stride_px: int = 1, chunk_px: int = 2048
) -> Any:
    """Sliding-window features as a lazy `dask.array` of shape `(out_rows, out_cols, F)`, float64.

    `source` may be a numpy array, a montage (`RegionSource`) or a 2-D `dask.array` (rechunked to
    multiples of the stride). Same result as `window_features` on the whole image: each chunk is
    computed with a halo (`dask.array.overlap.overlap`, no padding at the image border) and trimmed.
    Call `.compute()` (or `dask.compute` on several grids together) to run it.
    """
    da = _import_dask()
    if isinstance(source, da.Array):
        if source.ndim != 2:
            raise ImageInputError(f"image must be 2-D (rows, cols), got shape {source.shape}")
        array = source
        shape = (int(source.shape[0]), int(source.shape[1]))
    else:
        src = as_region_source(source)
        shape = src.shape_px
        array = as_dask_array(source if isinstance(source, np.ndarray) else src, chunk_px)
    check_window(shape, window_px, stride_px)
    extra: dict[str, float] = {}
    if "reference" in inspect.signature(window_features).parameters:
        step_r, step_c = max(1, shape[0] // 256), max(1, shape[1] // 256)
        extra["reference"] = float(np.median(np.asarray(array[::step_r, ::step_c].compute())))
    halo = -(-(window_px // 2 + 1) // stride_px) * stride_px
    # chunks: multiples of the stride, at least a window and a halo (dask's overlap needs that)
    chunk = -(-max(int(chunk_px), window_px, halo) // stride_px) * stride_px
    array = array.rechunk((_chunk_sizes(shape[0], chunk, window_px), _chunk_sizes(shape[1], chunk, window_px)))
    grown = da.overlap.overlap(array, depth={0: halo, 1: halo}, boundary="none")
    chunks_r = array.chunks[0]
    chunks_c = array.chunks[1]
    out_chunks = (
        tuple(-(-c // stride_px) for c in chunks_r),
        tuple(-(-c // stride_px) for c in chunks_c),
        (len(FEATURE_NAMES),),
    )

    def compute_block(block: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
        info = block_info[0]  # type: ignore[index]
        i, j = info["chunk-location"]
        top = halo if i > 0 else 0
        left = halo if j > 0 else 0
        rows = chunks_r[i]
        cols = chunks_c[j]
        if min(block.shape) < window_px:
            raise SettingsError(
                f"chunk of {block.shape} px is smaller than the {window_px} px window; use a larger chunk_px"
            )
        feats, _ = window_features(np.ascontiguousarray(block), window_px, stride_px, **extra)
        skip_r, skip_c = top // stride_px, left // stride_px
        return feats[skip_r : skip_r + -(-rows // stride_px), skip_c : skip_c + -(-cols // stride_px)]

    return grown.map_blocks(compute_block, chunks=out_chunks, new_axis=2, dtype=np.float64)
