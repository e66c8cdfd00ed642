"""Pictures for people: heat maps, similarity maps, cluster galleries, 8-bit display of any image.

Everything is vectorised: the cell grid is expanded to pixels by index arrays and coloured through a
lookup table, blended with integer arithmetic on uint8/uint16; only the legend text and candidate
markers are drawn with Pillow (a few dozen calls, not one per patch, each on a small crop around the
mark). `heatmap_png` builds a palette image band by band and writes the PNG itself (see there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.locate.analysis import ClusterAnalysis
from agent.locate.errors import ImageInputError
from agent.locate.features import check_image
from agent.locate.targets import Candidate

#: Cluster colours (RGB); crystal clusters are drawn with `CRYSTAL_RGB` shades, masked cells in grey.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (127, 127, 127),
    (174, 199, 232),
)
CRYSTAL_RGB: tuple[int, int, int] = (214, 39, 40)
MASK_RGB: tuple[int, int, int] = (40, 40, 40)


#: Rows per band in the banded loops: a band of a 4k image stays in cache, the index temporaries small.
_BAND_ROWS = 128


def display_uint8(image: np.ndarray, low_percent: float = 0.5, high_percent: float = 99.5) -> np.ndarray:
    """Robust percentile stretch of any 2-D grayscale image to uint8 (percentiles from a sub-sample).

    uint8 and uint16 inputs go through a 256/65536-entry lookup table (fast); floats are scaled.
    """
    check_image(image)
    low, high = _stretch_limits(image, low_percent, high_percent)
    lut = _display_lut(image.dtype, low, high)
    if lut is not None:
        out = np.empty(image.shape, dtype=np.uint8)
        for r0 in range(0, image.shape[0], _BAND_ROWS):
            np.take(lut, image[r0 : r0 + _BAND_ROWS], out=out[r0 : r0 + _BAND_ROWS], mode="clip")
        return out
    return _scale_uint8(image, low, high)


def _stretch_limits(image: np.ndarray, low_percent: float, high_percent: float) -> tuple[float, float]:
    """(low, high) image values of the display stretch, percentiles of a ~250k-pixel regular sub-sample."""
    step = max(1, int(np.sqrt(image.size / 250_000)))
    low, high = np.percentile(image[::step, ::step], [low_percent, high_percent])
    if high <= low:
        high = low + 1
    return float(low), float(high)


def _display_lut(dtype: np.dtype, low: float, high: float) -> np.ndarray | None:
    """The 256/65536-entry uint8 lookup table of the stretch for uint8/uint16 images; None for other dtypes."""
    if dtype not in (np.uint8, np.uint16):
        return None
    levels = np.arange(np.iinfo(dtype).max + 1, dtype=np.float64)
    return np.clip((levels - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


def _scale_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """The stretch of any numeric image to uint8 by float32 arithmetic (the path for dtypes without a table)."""
    scaled = (image.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _cluster_lut(n_clusters: int, crystal_clusters: Sequence[int]) -> np.ndarray:
    """(n_clusters + 1, 3) uint8 colours; row 0 is the mask colour (label -1 shifted by one)."""
    lut = np.zeros((n_clusters + 1, 3), dtype=np.uint8)
    lut[0] = MASK_RGB
    crystal = list(crystal_clusters)
    for cid in range(n_clusters):
        if cid in crystal:
            shade = 1.0 - 0.25 * crystal.index(cid) / max(1, len(crystal))
            lut[cid + 1] = [int(v * shade) for v in CRYSTAL_RGB]
        else:
            lut[cid + 1] = PALETTE[cid % len(PALETTE)]
    return lut


def _blend(gray: np.ndarray, colour_index: np.ndarray, lut: np.ndarray, alpha_lut: np.ndarray) -> np.ndarray:
    """RGB = gray * (1 - a) + lut * a per pixel, with per-entry alpha (0..256 integer weights)."""
    weight = alpha_lut[colour_index]  # uint16 0..256
    inverse = (256 - weight).astype(np.uint16)
    out = np.empty((*gray.shape, 3), dtype=np.uint8)
    g = gray.astype(np.uint16) * inverse
    for channel in range(3):
        tinted = (lut[:, channel].astype(np.uint16) * alpha_lut)[colour_index]
        out[..., channel] = ((g + tinted) >> 8).astype(np.uint8)
    return out


def _cluster_alpha_weights(n_clusters: int, crystal_clusters: Sequence[int], alpha: float) -> np.ndarray:
    """(n_clusters + 1,) uint16 blend weights 0..256 per colour of `_cluster_lut`: `alpha` for clusters, 0.25
    more for crystal clusters, 0.2 more for the mask (row 0)."""
    weights = np.full(n_clusters + 1, round(alpha * 256), dtype=np.uint16)
    for cid in crystal_clusters:
        if 0 <= cid < n_clusters:
            weights[cid + 1] = round(min(1.0, alpha + 0.25) * 256)
    weights[0] = round(min(1.0, alpha + 0.2) * 256)
    return weights


#: A drawing step for `_draw_ops`: an `ImageDraw.ImageDraw` method name, its xy coordinates, its keywords.
DrawOp = tuple[str, tuple[float, ...], dict[str, Any]]


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _draw_ops(target: np.ndarray, ops: Sequence[DrawOp]) -> None:
    """Run Pillow drawing steps on `target` in place: (rows, cols) palette indices (inks are indices, text
    not anti-aliased) or (rows, cols, 3) RGB. Only the crop around the steps' bounding box is handed to
    Pillow, so a mark costs the same on a 4k image as on a small one; the pixels are those of drawing on
    the whole picture (coordinates move by whole pixels)."""
    from PIL import Image, ImageDraw

    boxes = []
    for method, xy, kwargs in ops:
        if method == "text":
            left, top, right, bottom = kwargs["font"].getbbox(kwargs["text"])
            boxes.append((xy[0] + left, xy[1] + top, xy[0] + right, xy[1] + bottom))
        else:
            boxes.append(xy)
    rows, cols = target.shape[:2]
    x0 = max(0, int(np.floor(min(b[0] for b in boxes))) - 2)
    y0 = max(0, int(np.floor(min(b[1] for b in boxes))) - 2)
    x1 = min(cols, int(np.ceil(max(b[2] for b in boxes))) + 3)
    y1 = min(rows, int(np.ceil(max(b[3] for b in boxes))) + 3)
    if x1 <= x0 or y1 <= y0:
        return
    region = target[y0:y1, x0:x1]
    mode = "P" if target.ndim == 2 else "RGB"
    picture = Image.frombytes(mode, (x1 - x0, y1 - y0), np.ascontiguousarray(region).tobytes())
    draw = ImageDraw.Draw(picture)
    for method, xy, kwargs in ops:
        shifted = tuple(v - (x0 if n % 2 == 0 else y0) for n, v in enumerate(xy))
        getattr(draw, method)(shifted, **kwargs)
    region[...] = np.asarray(picture)


def _draw_overlay(
    target: np.ndarray,
    legend: Sequence[tuple[str, Any]],
    candidates: Sequence[Candidate],
    mark: Any = (255, 255, 0),
    text: Any = (255, 255, 255),
    box: Any = (0, 0, 0),
) -> None:
    """Candidate circles (ranks on the first 50) and the legend box (top left) drawn into `target` in place.

    Text and marks scale with the picture (one step per 512 px of the shorter side). Inks (`mark`, `text`,
    `box`, the legend swatches) are RGB tuples for an RGB target and palette indices for an index target.
    """
    scale = max(1, min(target.shape[:2]) // 512)
    font = _font(10 * scale)
    radius = 6 * scale
    for rank, cand in enumerate(candidates, start=1):
        r, c = cand.row_px, cand.col_px
        ops: list[DrawOp] = [
            ("ellipse", (c - radius, r - radius, c + radius, r + radius), {"outline": mark, "width": max(1, scale)})
        ]
        if rank <= 50:
            ops.append(("text", (c + radius + 1, r - radius), {"text": str(rank), "fill": mark, "font": font}))
        _draw_ops(target, ops)
    line = 13 * scale
    box_w = 12 * scale + max((len(label) for label, _ in legend), default=0) * 7 * scale
    ops = [("rectangle", (0, 0, box_w, line * len(legend) + 4 * scale), {"fill": box})]
    for i, (label, swatch) in enumerate(legend):
        y = 2 * scale + i * line
        ops.append(("rectangle", (2 * scale, y + 2, 10 * scale, y + 10 * scale), {"fill": swatch}))
        ops.append(("text", (12 * scale, y), {"text": label, "fill": text, "font": font}))
    _draw_ops(target, ops)


def _legend_labels(
    analysis: ClusterAnalysis, crystal_clusters: Sequence[int], mixed_clusters: Sequence[int] = ()
) -> list[str]:
    """Legend lines: the mask, then one per cluster with its share of the image and a crystal (or mixed:
    label memory's answered-both-ways clusters, whose targets come last) tag; the outlined cluster
    (`agent.locate.outlines`) says so."""
    labels = ["bar / black"]
    for summary in analysis.clusters:
        tag = " crystal" if summary.cluster_id in crystal_clusters else ""
        tag = " mixed" if summary.cluster_id in mixed_clusters else tag
        tag += " (outlined)" if summary.cluster_id == analysis.outline_cluster else ""
        labels.append(f"{summary.cluster_id}: {100 * summary.fraction:.1f}%{tag}")
    return labels


def heatmap_rgb(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    candidates: Sequence[Candidate] = (),
    crystal_clusters: Sequence[int] = (),
    alpha: float = 0.45,
    mixed_clusters: Sequence[int] = (),
) -> np.ndarray:
    """The cluster map blended over the image: uint8 (rows, cols, 3), with a legend and candidates.

    Crystal clusters are red and more opaque; other clusters take palette colours at `alpha`; masked
    cells (bars, black areas) are dark grey. `mixed_clusters` are only tagged in the legend.
    """
    rgb, legend = _heatmap_rgb_unmarked(image, analysis, crystal_clusters, alpha, mixed_clusters)
    _draw_overlay(rgb, legend, candidates)
    return rgb


def _heatmap_rgb_unmarked(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    crystal_clusters: Sequence[int],
    alpha: float,
    mixed_clusters: Sequence[int] = (),
) -> tuple[np.ndarray, list[tuple[str, Any]]]:
    """`heatmap_rgb` before the overlay: the blended picture (uint8 (rows, cols, 3)) and the legend's
    (label, RGB swatch) pairs."""
    if tuple(image.shape[:2]) != analysis.image_shape:
        raise ImageInputError(f"image shape {image.shape} does not match the analysis ({analysis.image_shape})")
    gray = display_uint8(image)
    k = len(analysis.clusters)
    lut = _cluster_lut(k, crystal_clusters)
    alpha_lut = _cluster_alpha_weights(k, crystal_clusters, alpha)
    colour_cells = (analysis.label_grid + 1).astype(np.intp)
    colour_index = colour_cells[analysis.row_index_px][:, analysis.col_index_px]
    # the bar mask is pixel-exact, finer than the cells
    colour_index = np.where(analysis.bar_mask, 0, colour_index)
    rgb = _blend(gray, colour_index, lut, alpha_lut)
    swatches = [MASK_RGB] + [tuple(int(v) for v in lut[s.cluster_id + 1]) for s in analysis.clusters]
    legend = _legend_labels(analysis, crystal_clusters, mixed_clusters)
    return rgb, list(zip(legend, swatches, strict=True))


def similarity_rgb(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    similarity: np.ndarray,
    candidates: Sequence[Candidate] = (),
    alpha: float = 0.5,
) -> np.ndarray:
    """A similarity map (cell grid, values in [-1, 1], NaN = masked) blended over the image in a
    blue (-1) -> white (0) -> red (+1) ramp; uint8 (rows, cols, 3) with legend and candidates."""
    if tuple(image.shape[:2]) != analysis.image_shape:
        raise ImageInputError(f"image shape {image.shape} does not match the analysis ({analysis.image_shape})")
    gray = display_uint8(image)
    levels = 64
    finite = np.isfinite(similarity)
    bins = np.clip(((np.where(finite, similarity, -1.0) + 1.0) / 2.0 * (levels - 1)).round(), 0, levels - 1)
    cells = np.where(finite, bins.astype(np.intp) + 1, 0)
    t = np.linspace(-1, 1, levels)
    ramp = np.zeros((levels + 1, 3), dtype=np.uint8)
    ramp[0] = MASK_RGB
    ramp[1:, 0] = np.clip(255 * np.minimum(1, 1 + t), 0, 255).astype(np.uint8)
    ramp[1:, 1] = np.clip(255 * (1 - np.abs(t)), 0, 255).astype(np.uint8)
    ramp[1:, 2] = np.clip(255 * np.minimum(1, 1 - t), 0, 255).astype(np.uint8)
    alpha_lut = np.full(levels + 1, round(alpha * 256), dtype=np.uint16)
    colour_index = cells[analysis.row_index_px][:, analysis.col_index_px]
    colour_index = np.where(analysis.bar_mask, 0, colour_index)
    rgb = _blend(gray, colour_index, ramp, alpha_lut)
    legend = [
        ("similarity +1", tuple(int(v) for v in ramp[-1])),
        ("similarity 0", tuple(int(v) for v in ramp[levels // 2 + 1])),
        ("-1", tuple(int(v) for v in ramp[1])),
    ]
    _draw_overlay(rgb, legend, candidates)
    return rgb


def cluster_gallery_rgb(
    image: np.ndarray, analysis: ClusterAnalysis, per_cluster: int = 8, patch_px: int = 64
) -> np.ndarray:
    """A gallery: one row per cluster of up to `per_cluster` typical patches (the cells nearest the
    cluster centre), each `patch_px` square, with a colour tab and the cluster id; uint8 RGB.

    Only the sampled pixels of the patches are stretched for display (as `display_uint8` stretches the whole
    image: the same limits, the same values), each patch sampled from the image with its edge repeated."""
    check_image(image)
    stretch = _stretch_limits(image, 0.5, 99.5)
    display = _display_lut(image.dtype, *stretch)
    k = len(analysis.clusters)
    lut = _cluster_lut(k, analysis.suggested_crystal_clusters)
    tab = 18
    pad = 2
    height = max(1, k) * (patch_px + pad) + pad
    width = tab + per_cluster * (patch_px + pad) + pad
    canvas = np.full((height, width, 3), 24, dtype=np.uint8)
    if analysis.settings.mode == "grid":
        crop_px = int(max(image.shape[0] / analysis.grid_shape[0], image.shape[1] / analysis.grid_shape[1]))
    else:
        crop_px = analysis.settings.window_px
    crop_px = max(crop_px, 8)
    half = crop_px // 2
    # rows and columns of the image padded by `half` (edge mode), as indices into the image
    padded_rows = np.clip(np.arange(image.shape[0] + 2 * half) - half, 0, image.shape[0] - 1)
    padded_cols = np.clip(np.arange(image.shape[1] + 2 * half) - half, 0, image.shape[1] - 1)
    sample_idx = np.linspace(0, crop_px - 1, patch_px).round().astype(np.intp)
    for row, summary in enumerate(analysis.clusters):
        y0 = pad + row * (patch_px + pad)
        canvas[y0 : y0 + patch_px, pad : tab - pad] = lut[summary.cluster_id + 1]
        for j, (r, c) in enumerate(summary.example_cells_px[:per_cluster]):
            rows, cols = padded_rows[r : r + crop_px], padded_cols[c : c + crop_px]  # the crop of the padded image
            if (len(rows), len(cols)) != (crop_px, crop_px):
                continue
            values = image[np.ix_(rows[sample_idx], cols[sample_idx])]
            patch = np.take(display, values, mode="clip") if display is not None else _scale_uint8(values, *stretch)
            x0 = tab + pad + j * (patch_px + pad)
            canvas[y0 : y0 + patch_px, x0 : x0 + patch_px] = patch[..., None]
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for row, summary in enumerate(analysis.clusters):
        draw.text((3, pad + row * (patch_px + pad) + 2), str(summary.cluster_id), fill=(255, 255, 255))
    return np.asarray(picture)


def mask_uint8(mask: np.ndarray) -> np.ndarray:
    """A bool mask as a uint8 image: 255 where True, 0 elsewhere."""
    return (np.asarray(mask, dtype=bool).astype(np.uint8)) * np.uint8(255)


def mask_png(mask: np.ndarray, workers: int | None = None) -> bytes:
    """PNG bytes (8-bit grey) of a bool mask: 255 where True, 0 elsewhere (`mask_uint8`), deflated in
    bands on `workers` threads (default: up to 4) like the heat map."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.zeros((mask.shape[0], 1 + mask.shape[1]), dtype=np.uint8)  # column 0: PNG filter byte 0
    np.multiply(mask, np.uint8(255), out=rows[:, 1:], dtype=np.uint8)
    return _encode_png_rows(rows, mask.shape[1], 0, None, 1, workers or _default_workers())


#: Largest error (grey levels) that the palette path's grey quantisation may add to a heat-map pixel;
#: beyond it (many clusters, low alpha) `heatmap_png` encodes the RGB picture instead.
PALETTE_MAX_ERROR = 2.0


def heatmap_png(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    candidates: Sequence[Candidate] = (),
    crystal_clusters: Sequence[int] = (),
    alpha: float = 0.45,
    compress_level: int = 1,
    workers: int | None = None,
) -> bytes:
    """The heat map of `heatmap_rgb` as full-resolution PNG bytes, fast: a palette image (one byte a pixel).

    Each palette entry is one (cluster colour, grey level) pair blended once, so the picture is a table
    lookup from the raw pixel value plus the cell's colour offset, built band by band. The grey image is
    quantised to 253 // (k + 1) levels (63 for k = 3), which moves a blended pixel by about one grey
    level against an exact blend (two against `heatmap_rgb`, which truncates); when the quantisation could
    cost more than `PALETTE_MAX_ERROR` grey levels (k > 6 at the default alpha), the RGB picture is encoded
    instead (slower, exact). Marks and legend are drawn as in `heatmap_rgb` (text not anti-aliased).

    The PNG is written here, not by Pillow: rows unfiltered, deflated with zlib's run-length strategy
    (about twice as fast as Pillow's level 1 on noisy micrographs, and a smaller file), in bands on
    `workers` threads (default: the usable cores, at most 4). `compress_level` 0 stores the rows
    uncompressed (fastest, ~3x larger).

    The same as `HeatmapDraft.make(...).png(candidates, ...)`: the picture without marks can be made before
    the candidates are known (e.g. on another thread while they are searched).
    """
    draft = HeatmapDraft.make(image, analysis, crystal_clusters, alpha, workers)
    return draft.png(candidates, compress_level, workers)


@dataclass(frozen=True)
class HeatmapDraft:
    """The heat map of `heatmap_png` before its candidate marks: everything that does not depend on them.

    `rows` (rows, 1 + cols) uint8: each row's PNG filter byte (0) then the pixels, palette indices when
    `palette` (256, 3) uint8 is set, else the RGB bytes of `heatmap_rgb` without marks; `legend`: the
    legend's (label, ink) pairs; `inks`: the (mark, text, box) inks of the overlay (palette indices or RGB).
    `png` draws the marks and legend into a copy of the rows and encodes it.
    """

    rows: np.ndarray
    width: int
    palette: np.ndarray | None
    legend: tuple[tuple[str, Any], ...]
    inks: tuple[Any, Any, Any]

    @classmethod
    def make(
        cls,
        image: np.ndarray,
        analysis: ClusterAnalysis,
        crystal_clusters: Sequence[int] = (),
        alpha: float = 0.45,
        workers: int | None = None,
    ) -> HeatmapDraft:
        """The draft of `heatmap_png(image, analysis, ..., crystal_clusters, alpha)`; bands on `workers`
        threads (default: the usable cores, at most 4)."""
        check_image(image)
        if tuple(image.shape[:2]) != analysis.image_shape:
            raise ImageInputError(f"image shape {image.shape} does not match the analysis ({analysis.image_shape})")
        k = len(analysis.clusters)
        weights = _cluster_alpha_weights(k, crystal_clusters, alpha)
        n_gray = (256 - 3) // (k + 1)  # three entries left for the overlay inks
        gray_to_level = (np.arange(256) * max(n_gray, 1) // 256).astype(np.uint8)
        bin_sizes = np.bincount(gray_to_level, minlength=max(n_gray, 1))
        error = float((256 - weights.min()) / 256) * (int(bin_sizes.max()) - 1) / 2
        if n_gray < 2 or error > PALETTE_MAX_ERROR:
            rgb, legend = _heatmap_rgb_unmarked(image, analysis, crystal_clusters, alpha)
            rows = np.empty((rgb.shape[0], 1 + rgb.shape[1] * 3), dtype=np.uint8)
            rows[:, 0] = 0
            rows[:, 1:] = rgb.reshape(rgb.shape[0], -1)
            return cls(rows, rgb.shape[1], None, tuple(legend), ((255, 255, 0), (255, 255, 255), (0, 0, 0)))
        palette = _heatmap_palette(k, crystal_clusters, weights, gray_to_level, n_gray, bin_sizes)
        workers = workers if workers is not None else _default_workers()
        rows = _heatmap_palette_rows(image, analysis, gray_to_level, n_gray, workers)
        swatches = [(c + 1) * n_gray - 1 for c in [0] + [s.cluster_id + 1 for s in analysis.clusters]]
        legend = tuple(zip(_legend_labels(analysis, crystal_clusters), swatches, strict=True))
        return cls(rows, image.shape[1], palette, legend, (_YELLOW, _WHITE, _BLACK))

    def png(self, candidates: Sequence[Candidate] = (), compress_level: int = 1, workers: int | None = None) -> bytes:
        """PNG bytes of the heat map with `candidates` marked (see `heatmap_png`); the draft is not changed."""
        rows = self.rows.copy()
        pixels = rows[:, 1:] if self.palette is not None else rows[:, 1:].reshape(rows.shape[0], self.width, 3)
        mark, text, box = self.inks
        _draw_overlay(pixels, self.legend, candidates, mark=mark, text=text, box=box)
        colour_type = 3 if self.palette is not None else 2
        workers = workers if workers is not None else _default_workers()
        return _encode_png_rows(rows, self.width, colour_type, self.palette, compress_level, workers)


#: Palette indices of the overlay inks of the palette heat map (yellow marks, white text, black legend box).
_YELLOW, _WHITE, _BLACK = 253, 254, 255


def _heatmap_palette(
    k: int,
    crystal_clusters: Sequence[int],
    weights: np.ndarray,
    gray_to_level: np.ndarray,
    n_gray: int,
    bin_sizes: np.ndarray,
) -> np.ndarray:
    """(256, 3) uint8 palette of the heat map: entry colour * n_gray + level is the grey bin's mean blended
    with the colour (colour 0 the mask, colour c + 1 cluster c), then the three overlay inks."""
    colours = _cluster_lut(k, crystal_clusters).astype(np.float64)
    levels = np.bincount(gray_to_level, weights=np.arange(256.0)) / bin_sizes
    w = weights.astype(np.float64)[:, None, None] / 256
    blended = levels[None, :, None] * (1 - w) + colours[:, None, :] * w
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: (k + 1) * n_gray] = np.clip(np.rint(blended), 0, 255).reshape(-1, 3).astype(np.uint8)
    palette[_YELLOW], palette[_WHITE], palette[_BLACK] = (255, 255, 0), (255, 255, 255), (0, 0, 0)
    return palette


def _heatmap_palette_rows(
    image: np.ndarray, analysis: ClusterAnalysis, gray_to_level: np.ndarray, n_gray: int, workers: int
) -> np.ndarray:
    """(rows, 1 + cols) uint8: per row the PNG filter byte 0 then the palette index of every pixel (its
    cell's colour times `n_gray` plus its grey level; colour 0 on the pixel-exact bar mask), band by band."""
    low, high = _stretch_limits(image, 0.5, 99.5)
    display = _display_lut(image.dtype, low, high)
    level_lut = gray_to_level[display] if display is not None else None
    cell_base = ((analysis.label_grid + 1) * n_gray).astype(np.uint8)  # label -1 (masked) -> 0
    base_cols = cell_base[:, analysis.col_index_px]  # (cell rows, cols)
    bar_mask = np.asarray(analysis.bar_mask, dtype=bool)
    rows_px, cols_px = image.shape
    rows = np.empty((rows_px, 1 + cols_px), dtype=np.uint8)  # column 0: PNG filter byte 0 (None)
    rows[:, 0] = 0
    indices = rows[:, 1:]

    def fill(r0: int) -> None:
        r1 = min(r0 + _BAND_ROWS, rows_px)
        band = image[r0:r1]
        if level_lut is not None:
            level = np.take(level_lut, band, mode="clip")
        else:
            level = np.take(gray_to_level, _scale_uint8(band, low, high), mode="clip")
        base = base_cols[analysis.row_index_px[r0:r1]]
        keep = np.subtract(bar_mask[r0:r1].view(np.uint8), 1, dtype=np.uint8)  # 0 on the mask, 255 elsewhere
        np.bitwise_and(base, keep, out=base)  # the pixel-exact bar mask takes colour 0
        np.add(level, base, out=indices[r0:r1])

    with _band_pool(workers, rows_px * cols_px) as pool:
        _run(pool, fill, range(0, rows_px, _BAND_ROWS))
    return rows


def _default_workers() -> int:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, usable))


@contextlib.contextmanager
def _band_pool(workers: int, pixels: int) -> Iterator[ThreadPoolExecutor | None]:
    """A thread pool for band work, or None for one worker or a picture under a megapixel."""
    if workers < 2 or pixels < 1 << 20:
        yield None
        return
    with ThreadPoolExecutor(workers) as pool:
        yield pool


def _run(pool: ThreadPoolExecutor | None, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`function` over `items` in order, on the pool's threads when there is one."""
    if pool is None:
        return [function(item) for item in items]
    return list(pool.map(function, items))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _encode_png_rows(
    rows: np.ndarray,
    width: int,
    colour_type: int,
    palette: np.ndarray | None = None,
    compress_level: int = 1,
    workers: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> bytes:
    """PNG bytes of 8-bit rows: `rows` is C-contiguous (height, 1 + width * channels) uint8 whose column 0
    holds each row's filter type (0 = None, the bytes as they are). `colour_type` 0 grey, 2 RGB, 3 palette
    (`palette` (n, 3) uint8, n <= 256).

    Deflate runs in bands of about 1 MiB, each band its own raw deflate stream closed by a sync flush (the
    last by a finish), as pigz does; the streams join into one zlib stream whose adler32 is taken over
    all rows. Bands run on `pool` (or a pool of `workers` threads) since zlib releases the GIL.
    """
    height = rows.shape[0]
    rows = np.ascontiguousarray(rows)
    level = int(np.clip(compress_level, 0, 9))
    band = max(1, (1 << 20) // rows.shape[1])
    starts = range(0, height, band)

    def deflate(r0: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
        data = compressor.compress(rows[r0 : r0 + band])
        data += compressor.flush(zlib.Z_FINISH if r0 + band >= height else zlib.Z_SYNC_FLUSH)
        return _png_chunk(b"IDAT", data)

    if pool is None and workers > 1 and rows.size >= 1 << 20:
        with ThreadPoolExecutor(workers) as own:
            return _encode_png_rows(rows, width, colour_type, palette, compress_level, workers, own)
    if pool is not None:
        futures = [pool.submit(deflate, r0) for r0 in starts]
        adler = 1
        for r0 in starts:  # in this thread while the bands deflate
            adler = zlib.adler32(rows[r0 : r0 + band], adler)
        bands = [future.result() for future in futures]
    else:
        bands = [deflate(r0) for r0 in starts]
        adler = zlib.adler32(rows)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header)]
    if palette is not None:
        parts.append(_png_chunk(b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes()))
    # zlib header: deflate, 32 KiB window, "fastest" level flag (0x7801 is a multiple of 31)
    parts += [_png_chunk(b"IDAT", b"\x78\x01"), *bands, _png_chunk(b"IDAT", struct.pack(">I", adler))]
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)
