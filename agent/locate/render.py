"""Pictures for people: heat maps, similarity maps, cluster galleries, 8-bit display of any image.

Everything is vectorised: the cell grid is expanded to pixels by index arrays and coloured through a
lookup table, blended with integer arithmetic on uint8/uint16; only the legend text and candidate
markers are drawn with Pillow (a few dozen calls, not one per patch). PNG bytes via
`drivers.formats.images.encode_png`.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def display_uint8(image: np.ndarray, low_percent: float = 0.5, high_percent: float = 99.5) -> np.ndarray:
    """Robust percentile stretch of any 2-D grayscale image to uint8 (percentiles from a sub-sample).

    uint8 and uint16 inputs go through a 256/65536-entry lookup table (fast); floats are scaled.
    """
    check_image(image)
    step = max(1, int(np.sqrt(image.size / 250_000)))
    sample = image[::step, ::step]
    low, high = np.percentile(sample, [low_percent, high_percent])
    if high <= low:
        high = low + 1
    if image.dtype in (np.uint8, np.uint16):
        levels = np.arange(np.iinfo(image.dtype).max + 1, dtype=np.float64)
        lut = np.clip((levels - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
        return lut[image]
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


def _draw_overlay(
    rgb: np.ndarray,
    legend: Sequence[tuple[str, tuple[int, int, int]]],
    candidates: Sequence[Candidate],
) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    scale = max(1, min(rgb.shape[:2]) // 512)
    try:
        font = ImageFont.load_default(size=10 * scale)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    radius = 6 * scale
    for rank, cand in enumerate(candidates, start=1):
        r, c = cand.row_px, cand.col_px
        draw.ellipse((c - radius, r - radius, c + radius, r + radius), outline=(255, 255, 0), width=max(1, scale))
        if rank <= 50:
            draw.text((c + radius + 1, r - radius), str(rank), fill=(255, 255, 0), font=font)
    line = 13 * scale
    box_w = 12 * scale + max((len(text) for text, _ in legend), default=0) * 7 * scale
    draw.rectangle((0, 0, box_w, line * len(legend) + 4 * scale), fill=(0, 0, 0))
    for i, (text, colour) in enumerate(legend):
        y = 2 * scale + i * line
        draw.rectangle((2 * scale, y + 2, 10 * scale, y + 10 * scale), fill=colour)
        draw.text((12 * scale, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def heatmap_rgb(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    candidates: Sequence[Candidate] = (),
    crystal_clusters: Sequence[int] = (),
    alpha: float = 0.45,
) -> np.ndarray:
    """The cluster map blended over the image: uint8 (rows, cols, 3), with a legend and candidates.

    Crystal clusters are red and more opaque; other clusters take palette colours at `alpha`; masked
    cells (bars, black areas) are dark grey.
    """
    if tuple(image.shape[:2]) != analysis.image_shape:
        raise ImageInputError(f"image shape {image.shape} does not match the analysis ({analysis.image_shape})")
    gray = display_uint8(image)
    k = len(analysis.clusters)
    lut = _cluster_lut(k, crystal_clusters)
    alpha_lut = np.full(k + 1, round(alpha * 256), dtype=np.uint16)
    for cid in crystal_clusters:
        if 0 <= cid < k:
            alpha_lut[cid + 1] = round(min(1.0, alpha + 0.25) * 256)
    alpha_lut[0] = round(min(1.0, alpha + 0.2) * 256)
    colour_cells = (analysis.label_grid + 1).astype(np.intp)
    colour_index = colour_cells[analysis.row_index_px][:, analysis.col_index_px]
    # the bar mask is pixel-exact, finer than the cells
    colour_index = np.where(analysis.bar_mask, 0, colour_index)
    rgb = _blend(gray, colour_index, lut, alpha_lut)
    legend = [("bar / black", MASK_RGB)]
    for summary in analysis.clusters:
        tag = " crystal" if summary.cluster_id in crystal_clusters else ""
        legend.append((f"{summary.cluster_id}: {100 * summary.fraction:.1f}%{tag}", tuple(lut[summary.cluster_id + 1])))
    return _draw_overlay(rgb, legend, candidates)


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
        ("similarity +1", tuple(ramp[-1])),
        ("similarity 0", tuple(ramp[levels // 2 + 1])),
        ("-1", tuple(ramp[1])),
    ]
    return _draw_overlay(rgb, legend, candidates)


def cluster_gallery_rgb(
    image: np.ndarray, analysis: ClusterAnalysis, per_cluster: int = 8, patch_px: int = 64
) -> np.ndarray:
    """A gallery: one row per cluster of up to `per_cluster` typical patches (the cells nearest the
    cluster centre), each `patch_px` square, with a colour tab and the cluster id; uint8 RGB."""
    gray = display_uint8(image)
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
    padded = np.pad(gray, half, mode="edge")
    sample_idx = np.linspace(0, crop_px - 1, patch_px).round().astype(np.intp)
    for row, summary in enumerate(analysis.clusters):
        y0 = pad + row * (patch_px + pad)
        canvas[y0 : y0 + patch_px, pad : tab - pad] = lut[summary.cluster_id + 1]
        for j, (r, c) in enumerate(summary.example_cells_px[:per_cluster]):
            crop = padded[r : r + crop_px, c : c + crop_px]
            if crop.shape != (crop_px, crop_px):
                continue
            patch = crop[sample_idx][:, sample_idx]
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


def heatmap_png(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    candidates: Sequence[Candidate] = (),
    crystal_clusters: Sequence[int] = (),
    alpha: float = 0.45,
    compress_level: int = 1,
) -> bytes:
    """The heat map of `heatmap_rgb` as PNG bytes, fast: a palette image (one byte per pixel).

    Each palette entry is (cluster colour, grey level) blended once, so the whole picture is one table
    lookup; the grey image is quantised to 256 // (k + 2) levels (51 for k = 3). Falls back to
    `heatmap_rgb` + `encode_png` when k > 30.
    """
    from PIL import Image, ImageDraw

    from drivers.formats.images import encode_png

    k = len(analysis.clusters)
    n_colours = k + 1  # cluster colours plus the mask colour
    if n_colours + 1 > 32:
        return encode_png(heatmap_rgb(image, analysis, candidates, crystal_clusters, alpha))
    if tuple(image.shape[:2]) != analysis.image_shape:
        raise ImageInputError(f"image shape {image.shape} does not match the analysis ({analysis.image_shape})")
    n_gray = (256 - 3) // n_colours
    lut = _cluster_lut(k, crystal_clusters).astype(np.float64)
    alphas = np.full(n_colours, alpha)
    for cid in crystal_clusters:
        if 0 <= cid < k:
            alphas[cid + 1] = min(1.0, alpha + 0.25)
    alphas[0] = min(1.0, alpha + 0.2)
    levels = (np.arange(n_gray) + 0.5) * (256.0 / n_gray)
    palette = np.zeros((256, 3), dtype=np.uint8)
    blended = levels[None, :, None] * (1 - alphas[:, None, None]) + lut[:, None, :] * alphas[:, None, None]
    palette[: n_colours * n_gray] = np.clip(blended, 0, 255).reshape(-1, 3).astype(np.uint8)
    yellow, white, black = 253, 254, 255
    palette[yellow], palette[white], palette[black] = (255, 255, 0), (255, 255, 255), (0, 0, 0)
    gray_to_level = (np.arange(256) * n_gray // 256).astype(np.uint8)
    cell_base = ((analysis.label_grid + 1) * n_gray).astype(np.uint8)
    base = cell_base[analysis.row_index_px][:, analysis.col_index_px]
    base[analysis.bar_mask] = 0
    indices = base + gray_to_level[display_uint8(image)]
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette(palette.ravel().tolist())
    draw = ImageDraw.Draw(picture)
    scale = max(1, min(indices.shape) // 512)
    radius = 6 * scale
    for rank, cand in enumerate(candidates, start=1):
        r, c = cand.row_px, cand.col_px
        draw.ellipse((c - radius, r - radius, c + radius, r + radius), outline=yellow, width=max(1, scale))
        if rank <= 50:
            draw.text((c + radius + 1, r - radius), str(rank), fill=yellow)
    legend = [("bar / black", 0)] + [
        (
            f"{s.cluster_id}: {100 * s.fraction:.1f}%{' crystal' if s.cluster_id in crystal_clusters else ''}",
            s.cluster_id + 1,
        )
        for s in analysis.clusters
    ]
    line = 13 * scale
    draw.rectangle((0, 0, 150 * scale, line * len(legend) + 4 * scale), fill=black)
    for i, (text, colour) in enumerate(legend):
        y = 2 * scale + i * line
        draw.rectangle((2 * scale, y + 2, 10 * scale, y + 10 * scale), fill=colour * n_gray + n_gray - 1)
        draw.text((12 * scale, y), text, fill=white)
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
