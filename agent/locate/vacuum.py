"""Holes in the support film (vacuum), found before the image is flattened.

A torn or broken film leaves areas of vacuum inside a grid square. In bright field they are the brightest
thing on the grid: nothing scatters there, so they are a few to twenty percent brighter than the film
around them, level inside, and bounded by a sharp step (the torn edge). Left in, they spoil the
illumination flattening: the smooth background follows the bright hole a little way onto the film, and
the film along the hole's edge then reads as a dark band that the locator takes for crystals. No crystal
can lie on vacuum, so the locator treats holes like bars (`vacuum_mask`).

The test works on a block-averaged copy (about 256 blocks along the short side, readout stripes removed
at that scale), divided by a wide normalised-Gaussian background (a quarter of the short side: the beam's
fall-off goes, a hole as large as a grid square stays):

1. Polarity: holes are not looked for when the image's compact objects are brighter than the film
   (dark field; `objects.object_polarity` on the block ratios). In dark field vacuum is dark and the
   black-area filter already masks it, while the bright plateaus there are thick objects.
2. Per open area (a connected part of the unmasked blocks, i.e. a grid square), the block ratios are
   split in two levels by Otsu's threshold. A connected bright region is a hole when
   - the two levels differ by at least `min_step` (2 %: thinner films than that do not show) and by 8
     block-noise sigmas,
   - the brighter level is above the film level of the whole image by at least 30 % of the step (and
     1 %): vacuum is brighter than any film, while in a square with dark crystals or ice the bright level
     is the film itself, at the image's film level,
   - it covers at least `min_area_fraction` of the image and at most 85 % of its open area,
   - its edge (the outline of the region with anything inside it filled) is a step all round: on at
     least 75 % of its rim (where it meets film) the gradient is at least a fifth of the step per block
     and four times the median gradient 3-6 blocks either side of the rim.
     A film that thickens smoothly, or the beam's fall-off, is a ramp: as steep away from the
     split as on it, and a split through a ramp wanders with the noise,
   - the sharp part of its rim does not run along one row or column, or a row and a column meeting at a
     corner: that is a montage seam between tiles of different gain.
3. Accepted regions are returned at full resolution, grown by one block (block resolution: the edge found is
   within one block of the true one, and no vacuum may stay unmasked along the rim).

The test is conservative: it misses holes (a whole square without film has no edge inside it to find,
and a hole whose edge is soft somewhere is left alone), but on the simulator's atlases and the synthetic
test images it marks no film as vacuum.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from agent.locate.objects import object_polarity
from agent.locate.preprocess import block_sum, remove_stripes

#: Blocks along the short side of the block-averaged copy.
BLOCKS_PER_SIDE = 256
#: Width of the Gaussian background, as a fraction of the short side: wide, so that a hole as large as a
#: grid square is not absorbed into it (the beam's fall-off is smoother still).
BACKGROUND_SIGMA_FRACTION = 0.25
#: Smallest brightness step between film and vacuum (fraction of the film level).
MIN_STEP = 0.02
#: The step must also exceed this many block-noise sigmas.
MIN_STEP_SIGMAS = 8.0
#: Smallest hole, as a fraction of the image area.
MIN_AREA_FRACTION = 0.002
#: Vacuum is brighter than the image's film level by at least this fraction of the step.
MIN_ABOVE_FILM = 0.3
#: Mean gradient on a hole's rim, per block, as a fraction of the step.
MIN_RIM_SHARPNESS = 0.2
#: ... and as a multiple of the median gradient 3-6 blocks either side of the rim.
RIM_CONTRAST = 4.0
#: A bright region filling more than this share of its open area is not a hole (nothing to tear from).
MAX_AREA_SHARE = 0.85
#: Share of a hole's rim (where it meets film) that must be that sharp: a hole's edge is a step all round.
MIN_SHARP_RIM_FRACTION = 0.75


def _otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of 1-D `values` (the split that maximises the between-class variance)."""
    histogram, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(histogram * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def _along_tile_edges(rim: np.ndarray, fraction: float = 0.5, corner_fraction: float = 0.6) -> bool:
    """True when at least `fraction` of the `rim` blocks lie within one block of one row or one column, or
    `corner_fraction` of them within a row and a column together (two tile edges meeting at a corner; an
    arc has a flat top and a flat side too, but not most of its length on them)."""
    rows, cols = np.nonzero(rim)
    if rows.size == 0:
        return False

    def band(coordinate: np.ndarray) -> np.ndarray:
        counts = np.convolve(np.bincount(coordinate), np.ones(3, dtype=np.int64), mode="same")
        return np.abs(coordinate - int(np.argmax(counts))) <= 1

    on_row, on_col = band(rows), band(cols)
    if max(on_row.sum(), on_col.sum()) >= fraction * rows.size:
        return True
    return bool((on_row | on_col).sum() >= corner_fraction * rows.size)


def _block_ratio(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Block means divided by their coarse background minus 1 (NaN where masked), usable blocks, factor."""
    factor = max(1, min(image.shape) // BLOCKS_PER_SIDE)
    rows, cols = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    keep = ~mask[:rows, :cols]
    count = block_sum(keep, factor).astype(np.float64)
    # the mean of the unmasked pixels only: a film block that touches a bar must not look darker
    crop = image[:rows, :cols]
    # np.where(keep, crop, 0); for whole numbers a product (the same values, several times faster)
    masked = np.multiply(crop, keep) if crop.dtype.kind in "ui" else np.where(keep, crop, 0)
    small = block_sum(masked, factor) / np.maximum(count, 1.0)
    weight = count / factor**2
    usable = weight > 0.9
    remove_stripes(small, ~usable)  # a bright readout column is a sharp step too
    sigma = max(1.0, min(small.shape) * BACKGROUND_SIGMA_FRACTION)
    numerator = ndimage.gaussian_filter(small * usable, sigma, mode="nearest")
    denominator = ndimage.gaussian_filter(usable.astype(np.float64), sigma, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        background = numerator / denominator
        ratio = np.where(usable & (background > 0), small / background - 1.0, np.nan)
    return ratio, usable & np.isfinite(ratio), factor


def vacuum_mask(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    min_step: float = MIN_STEP,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> np.ndarray:
    """Bool mask (image shape) of film holes in a bright-field image (module docstring); `mask` marks bars
    and black areas already found (left out). All False when there is no hole or the image is dark field."""
    result = np.zeros(image.shape, dtype=bool)
    ratio, usable, factor = _block_ratio(image, mask)
    if usable.sum() < 64:
        return result
    film_level = float(np.median(ratio[usable]))
    filled = np.where(usable, ratio, film_level)
    residual = filled - ndimage.median_filter(filled, size=3)
    noise = 1.4826 * float(np.median(np.abs(residual[usable])))
    deviation = filled - film_level
    if object_polarity(deviation < -5 * noise, deviation > 5 * noise, deviation, min_area_px=2) == "bright":
        return result  # dark field (objects brighter than the film): vacuum is dark there
    gy, gx = np.gradient(filled)
    gradient = np.hypot(gy, gx)
    min_blocks = max(16, int(min_area_fraction * usable.size))
    holes = np.zeros(usable.shape, dtype=bool)
    areas, n_areas = ndimage.label(usable)
    for area_id in range(1, n_areas + 1):
        area = areas == area_id
        if area.sum() < 2 * min_blocks:
            continue
        values = ratio[area]
        low, high = np.percentile(values, [1.0, 99.5])
        threshold = _otsu_threshold(np.clip(values, low, high))
        bright = area & (ratio > threshold)
        dark = area & (ratio <= threshold)
        if not bright.any() or not dark.any():
            continue
        bright_level, dark_level = float(np.median(ratio[bright])), float(np.median(ratio[dark]))
        step = bright_level - dark_level
        if step < max(min_step, MIN_STEP_SIGMAS * noise):
            continue
        if bright_level - film_level < max(MIN_ABOVE_FILM * step, min_step / 2):
            continue  # the bright level is the film (around dark objects), not vacuum
        regions, _ = ndimage.label(bright)
        sizes = np.bincount(regions.ravel())
        for region_id in np.flatnonzero(sizes >= min_blocks):
            if region_id == 0:
                continue
            region = regions == region_id
            # the hole's own outline: crystals inside a bright region are not its edge
            outline = ndimage.binary_fill_holes(region)
            if outline.sum() > MAX_AREA_SHARE * area.sum():
                continue  # a whole square brighter than the rest is film or illumination, not a tear in it
            rim = ndimage.binary_dilation(outline) & ~outline & area
            near = ndimage.binary_dilation(outline, iterations=6) & ~ndimage.binary_dilation(outline, iterations=3)
            near |= ndimage.binary_erosion(outline, iterations=3) & ~ndimage.binary_erosion(outline, iterations=6)
            near &= area
            if rim.sum() < 4 or near.sum() < 4:
                continue
            sharp = rim & (gradient >= max(MIN_RIM_SHARPNESS * step, RIM_CONTRAST * float(np.median(gradient[near]))))
            if sharp.sum() < MIN_SHARP_RIM_FRACTION * rim.sum():
                continue  # no step all round: a ramp (film thickness, the beam's fall-off) is soft somewhere
            if _along_tile_edges(sharp):
                continue  # a montage seam (tiles of different gain) is a sharp step too, along a tile edge
            holes |= region
    if not holes.any():
        return result
    # grown by one block: the edge found at block resolution can lie a block inside the hole, and a sliver of
    # unmasked vacuum along the rim made a row of false objects there
    holes = ndimage.binary_dilation(holes)
    full = np.repeat(np.repeat(holes, factor, axis=0), factor, axis=1)
    result[: full.shape[0], : full.shape[1]] = full
    return result & ~mask
