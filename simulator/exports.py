"""What users' exported images look like: 8-bit after a percentile stretch, with a data bar burned in.

`export_8bit(image, pixel_size_um=...)` turns a rendered uint16 frame into such an export: the counts
are stretched between two percentiles (default 0.5 and 99.5, as viewer exports and `simulate snapshot
--png` do) to 0..255 and clipped, and an annotation band covers the bottom rows (default 7 % of the
height, at least 12 px; dark with white marks, or bright with black marks): text-like blocks (glyphs of a
5 x 7 cell, in words) on the left and a scale bar with its label on the right. The band replaces image
rows, as a "burn in annotations" export does, so the image keeps its size and pixel geometry.
`Export8Bit` records where the band is (`data_bar_rows`) and the scale bar's length.

`write_export_montage(microscope, folder, ...)` acquires a grid of frames with a simulated microscope and
writes them as such exports: `Tile_RRR-CCC.tif` (uint8, JSON metadata with pixel size and stage) and a
`layout.json` (pixel size, overlap), which `crystal-locator screen --tiles FOLDER` serves, plus
`labels.csv` (image,row_px,col_px,radius_px,diffracts: the crystals in each tile, off the band, from the
ground truth at the true stage position and matrix), which `crystal-locator evaluate --images FOLDER
--truth FOLDER/labels.csv` reads. Tiles are laid on a regular grid along the stage axes; the camera's
rotation and scale errors, the stage's backlash and repeat error and the beam drift (if on) make them
stitch imperfectly, as real montages do.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Glyph cell (rows, cols) of the text-like blocks.
_GLYPH = (7, 5)


@dataclass(frozen=True)
class Export8Bit:
    """An 8-bit export: `image` (uint8), the band's rows [start, stop), the scale bar's length (px and um; 0 when
    no pixel size was given) and the counts that became 0 and 255 (`stretch`)."""

    image: np.ndarray
    data_bar_rows: tuple[int, int]
    scale_bar_px: int
    scale_bar_um: float
    stretch: tuple[float, float]


def stretch_8bit(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
                 ) -> tuple[np.ndarray, tuple[float, float]]:
    """(uint8 image, (low, high) counts): linear stretch of `image` between its `percentiles` to 0..255."""
    data = np.asarray(image, dtype=np.float32)
    low, high = (float(v) for v in np.percentile(data, percentiles))
    scaled = np.clip((data - low) / max(high - low, 1e-6), 0.0, 1.0)
    return (scaled * 255.0 + 0.5).astype(np.uint8), (low, high)


def nice_length_um(target_um: float) -> float:
    """The largest 1, 2 or 5 x 10^k um not above `target_um` (a scale bar's length)."""
    power = 10.0 ** math.floor(math.log10(max(target_um, 1e-9)))
    return max(step * power for step in (1.0, 2.0, 5.0) if step * power <= max(target_um, power))


def export_8bit(
    image: np.ndarray,
    *,
    pixel_size_um: float | None = None,
    band: str = "dark",
    band_fraction: float = 0.07,
    percentiles: tuple[float, float] = (0.5, 99.5),
    seed: int = 0,
) -> Export8Bit:
    """`image` as a user's 8-bit export with a burned-in data bar (see the module doc). `band` is "dark" or
    "bright"; `band_fraction` its height as a fraction of the image's (at least 12 px); `seed` picks the glyphs.
    The stretch is computed on the image before the band is drawn."""
    if band not in ("dark", "bright"):
        raise ValueError(f"band must be 'dark' or 'bright', got {band!r}")
    if not 0.0 < band_fraction < 0.5:
        raise ValueError(f"band_fraction must be in (0, 0.5), got {band_fraction}")
    out, stretch = stretch_8bit(image, percentiles)
    rows, cols = out.shape
    height = min(rows // 2, max(12, round(band_fraction * rows)))
    start = rows - height
    background, ink = (8, 250) if band == "dark" else (245, 5)
    out[start:] = background
    rng = np.random.default_rng([seed, 23])
    glyph_px = max(1, (height - 4) // (_GLYPH[0] + 2))
    top = start + (height - glyph_px * _GLYPH[0]) // 2
    col = glyph_px * 3
    for _ in range(3):  # words of text on the left half
        col = _draw_word(out, top, col, int(rng.integers(3, 9)), glyph_px, ink, rng, limit=cols // 2)
        col += glyph_px * 4
    scale_px, scale_um = 0, 0.0
    if pixel_size_um is not None and pixel_size_um > 0:
        scale_um = nice_length_um(0.2 * cols * pixel_size_um)
        scale_px = max(1, round(scale_um / pixel_size_um))
        right = cols - glyph_px * 3
        bar_rows = slice(start + height // 2 - max(1, height // 10), start + height // 2 + max(1, height // 10) + 1)
        out[bar_rows, right - scale_px:right] = ink
        _draw_word(out, top, max(cols // 2, right - scale_px - glyph_px * 30), 4, glyph_px, ink, rng,
                   limit=right - scale_px - glyph_px * 2)
    return Export8Bit(out, (start, rows), scale_px, scale_um, stretch)


def _draw_word(out: np.ndarray, top: int, col: int, letters: int, glyph_px: int, ink: int, rng: np.random.Generator,
               *, limit: int) -> int:
    """Draw `letters` random glyphs (5 x 7 cells of `glyph_px` px, about half filled) from `col`; return where
    the word ends. Glyphs that would pass `limit` (a column) are left out."""
    for _ in range(letters):
        width = _GLYPH[1] * glyph_px
        if col + width > limit:
            break
        cells = rng.uniform(size=_GLYPH) < 0.5
        cells[:, 0] |= rng.uniform() < 0.5  # a vertical stroke, as many letters have
        block = np.kron(cells, np.ones((glyph_px, glyph_px), dtype=bool))
        region = out[top:top + block.shape[0], col:col + width]
        region[block[:region.shape[0], :region.shape[1]]] = ink
        col += width + glyph_px
    return col


def write_export_montage(
    microscope: Any,
    folder: str | Path,
    *,
    centre_xy_um: tuple[float, float],
    grid: tuple[int, int] = (2, 2),
    overlap_fraction: float = 0.1,
    preset: str = "atlas",
    exposure_s: float = 0.5,
    band: str = "dark",
) -> list[dict[str, Any]]:
    """Acquire `grid` (rows, cols) frames around `centre_xy_um` with a `SimulatedMicroscope` at `preset`, write
    them as 8-bit exports with a data bar to `folder` (see the module doc) and return one dict per tile:
    file, row, col, stage_xy_um (where the stage really was), data_bar_rows, crystals (labels rows)."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    microscope.set_preset(preset)
    matrix = np.asarray(microscope.true_image_to_stage_matrix(preset), dtype=np.float64)
    shape = microscope.info().camera_shape_px
    nominal_um = microscope.sim_preset(preset).pixel_size_um
    step_um = (shape[1] * nominal_um * (1 - overlap_fraction), shape[0] * nominal_um * (1 - overlap_fraction))
    tiles = []
    for r in range(grid[0]):
        for c in range(grid[1]):
            x = centre_xy_um[0] + (c - (grid[1] - 1) / 2.0) * step_um[0]
            y = centre_xy_um[1] + (r - (grid[0] - 1) / 2.0) * step_um[1]
            microscope.move_stage(x_um=x, y_um=y)
            frame = microscope.acquire(exposure_s)
            exported = export_8bit(frame.image, pixel_size_um=nominal_um, band=band, seed=r * grid[1] + c)
            name = f"Tile_{r:03d}-{c:03d}.tif"
            meta = {"pixel_size_um": nominal_um, "stage": {"x_um": x, "y_um": y}, "export": "8-bit, data bar"}
            tifffile.imwrite(folder / name, exported.image, description=json.dumps(meta))
            true_xy = microscope.true_stage_xy_um()
            labels = _tile_labels(microscope.ground_truth, name, exported, true_xy, matrix)
            tiles.append({"file": name, "row": r, "col": c, "stage_xy_um": true_xy,
                          "data_bar_rows": exported.data_bar_rows, "crystals": labels})
    layout = {"pixel_size_um": nominal_um, "overlap_fraction": overlap_fraction,
              "description": "simulated 8-bit exports with a data bar",
              "tiles": [{"file": t["file"], "row": t["row"], "col": t["col"]} for t in tiles]}
    (folder / "layout.json").write_text(json.dumps(layout, indent=1))
    (folder / "labels.csv").write_text(_labels_csv(tiles))
    return tiles


def _tile_labels(truth: Any, name: str, exported: Export8Bit, stage_xy_um: tuple[float, float],
                 matrix: np.ndarray) -> list[dict[str, Any]]:
    """Labels rows of the crystals whose centre lies in the tile, off the data bar and off the bars."""
    if truth is None:
        return []
    rows, cols = exported.image.shape
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])
    inverse = np.linalg.inv(matrix)
    um_per_px = math.sqrt(abs(np.linalg.det(matrix)))
    half_diag_um = math.hypot(rows, cols) * um_per_px / 2.0
    labels = []
    for record in truth.crystals_in_box(stage_xy_um[0] - half_diag_um, stage_xy_um[0] + half_diag_um,
                                        stage_xy_um[1] - half_diag_um, stage_xy_um[1] + half_diag_um):
        col_px, row_px = inverse @ (np.array([record.x_um, record.y_um]) - np.asarray(stage_xy_um)) + centre
        on_bar = bool(truth.bar_mask_xy(np.float64(record.x_um), np.float64(record.y_um)))
        if 0 <= col_px < cols and 0 <= row_px < exported.data_bar_rows[0] and not on_bar:
            labels.append({"image": name, "row_px": round(float(row_px), 2), "col_px": round(float(col_px), 2),
                           "radius_px": round(record.length_um / 2.0 / um_per_px, 2),
                           "diffracts": int(record.diffracts)})
    return labels


def _labels_csv(tiles: list[dict[str, Any]]) -> str:
    """The labels CSV of `crystal-locator evaluate --images ... --truth` for the tiles."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "row_px", "col_px", "radius_px", "diffracts"])
    writer.writeheader()
    for tile in tiles:
        writer.writerows(tile["crystals"])
    return buffer.getvalue()
