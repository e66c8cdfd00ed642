"""What one object looks like, as numbers a classifier can learn from (`measure_object`), how much it stands out
from the film's noise (`MIN_SIGNIFICANCE`), and the cold-start rule that ranks objects before anything is
learnt (`cold_start_score`). Lines in the film are found whole in `agent.locate.film_lines`.

Every feature is measured on the lightly smoothed, flattened image around the object (`data`, its bounding
box `box` and bool `mask`), against the film's level and noise sigma (same units as `data`). Contrast is
taken in the objects' polarity (`deviation`: darker than the film in bright field, brighter in dark field),
so the same crystal gives the same features in both. Units are in the names; `_sigma` means "film noise
sigmas" of the smoothed image, which makes contrast comparable between exposures and cameras.

`OBJECT_FEATURE_NAMES`, in order:
- `log_area_px`: ln of the area (px).
- `extent`: area / bounding-box area (0..1).
- `solidity`: area / convex-hull area (0..1): touching crystals and curved film lines are low.
- `log_elongation`: ln(major / minor axis): needles are high, plates and blocks low.
- `contrast_sigma`: mean deviation inside the object.
- `peak_contrast_sigma`: 90th percentile of the deviation inside the object.
- `significance`: `contrast_sigma` x sqrt(independent noise samples in the object): how far the object as a
  whole stands out from the film's own noise (a noise blob is about 2-4, see `MIN_SIGNIFICANCE`).
- `optical_density`: bright field with the camera's dark level known: -ln of the mean transmission inside
  (a thickness proxy: thick crystals give no usable diffraction); otherwise the mean deviation as a fraction
  of the film level.
- `edge_sigma`: mean gradient magnitude along the object's boundary (px^-1 x sigma): crystals have sharp
  edges, ice and contamination soft ones.
- `texture_sigma`: standard deviation of the deviation inside the object (internal contrast: bend contours,
  steps, overlapping plates).
- `corner_share`: share of the outline's turning in its sharpest quarter (`outline_turning_concentration`):
  0.25 for a circle, towards 1 for a polygon; 0.5 (no information) for outlines too short to measure.
- `hole_fraction`: area of holes inside the object / filled area.
Per candidate, `agent.locate.targets` adds `log_bar_distance_px` (ln(1 + distance to a grid bar, px)) and
`neighbours` (other objects within four equivalent radii).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: Features `measure_object` returns, in order (see module docstring).
OBJECT_FEATURE_NAMES: tuple[str, ...] = (
    "log_area_px",
    "extent",
    "solidity",
    "log_elongation",
    "contrast_sigma",
    "peak_contrast_sigma",
    "significance",
    "optical_density",
    "edge_sigma",
    "texture_sigma",
    "corner_share",
    "hole_fraction",
)
#: Features added per candidate from its surroundings (`agent.locate.targets`).
CONTEXT_FEATURE_NAMES: tuple[str, ...] = ("log_bar_distance_px", "neighbours")
#: Every feature of a candidate, in order.
CANDIDATE_FEATURE_NAMES: tuple[str, ...] = OBJECT_FEATURE_NAMES + CONTEXT_FEATURE_NAMES

#: Objects whose `significance` is below this do not stand out from the film's own noise. With pixels kept at
#: >= 4 sigma of the smoothed noise and lone pixels opened away, noise blobs measure 2-4 (mean deviation ~4.5
#: sigma over one or two independent samples); a real object measures more because it is larger or darker.
#: Chosen from that noise statistic, not from any specimen.
MIN_SIGNIFICANCE = 6.0


def deviation_in_polarity(data: np.ndarray, level: float, polarity: str) -> np.ndarray:
    """How far `data` lies from the film `level` in the objects' polarity ("dark", "bright" or "both")."""
    if polarity == "dark":
        return level - data
    if polarity == "bright":
        return data - level
    return np.abs(data - level)


def measure_object(
    data: np.ndarray,
    box: tuple[slice, slice],
    mask: np.ndarray,
    *,
    level: float,
    sigma: float,
    polarity: str,
    dark_fraction: float | None = None,
    smooth_sigma_px: float = 1.0,
    convex_area_px: float | None = None,
) -> np.ndarray:
    """The `OBJECT_FEATURE_NAMES` of one object (float64 vector; see module docstring).

    `data` is the whole smoothed image, `box` the object's bounding box in it and `mask` its bool pixels
    within the box (a tight box: the mask touches all four sides); `level` and `sigma` the film's level and
    noise sigma in `data`; `dark_fraction` the camera's zero-transmission level over the film level (None:
    unknown); `smooth_sigma_px` the Gaussian that smoothed `data` (it sets how many pixels make one
    independent noise sample); `convex_area_px` the pixels of the mask's convex hull when the caller has
    them (`objects.convex_area_px`; None: measured here).
    """
    from agent.locate.objects import convex_area_px as hull_area_px

    mask = np.asarray(mask, dtype=bool)
    area_px = float(np.count_nonzero(mask))
    sigma = max(float(sigma), 1e-12)
    crop = np.asarray(data[box], dtype=np.float64)
    deviation = deviation_in_polarity(crop, level, polarity)
    inside = deviation[mask]
    contrast = float(inside.mean()) / sigma
    samples = max(1.0, area_px / (4.0 * math.pi * smooth_sigma_px**2))
    major, minor = _axis_lengths_px(mask)
    hull_px = hull_area_px(mask) if convex_area_px is None else convex_area_px
    filled = fill_holes(mask)
    return np.array(
        [
            math.log(area_px),
            area_px / mask.size,
            area_px / hull_px,
            math.log(max(major, 1.0) / max(minor, 1.0)),
            contrast,
            percentile_90(inside) / sigma,
            contrast * math.sqrt(samples),
            _optical_density(float(crop[mask].mean()), level, polarity, dark_fraction),
            _edge_strength(crop, mask) / sigma,
            float(inside.std()) / sigma,
            _corner_share(mask),
            1.0 - area_px / max(float(np.count_nonzero(filled)), 1.0),
        ],
        dtype=np.float64,
    )


def percentile_90(values: np.ndarray) -> float:
    """`np.percentile(values, 90)` (the default linear method) of a non-empty 1-D float64 array without NaN:
    the same arithmetic on the two order statistics around index 0.9 (n - 1), without `percentile`'s
    overhead (tens of microseconds a call, a call or two per object)."""
    n = int(values.size)
    virtual = (n - 1) * 0.9
    below = math.floor(virtual)
    if virtual >= n - 1:
        return float(np.max(values))
    ordered = np.partition(values, (below, below + 1))
    low, high, gamma = float(ordered[below]), float(ordered[below + 1]), virtual - below
    diff = high - low
    return high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` (bool, 2-D) with its holes filled: `ndimage.binary_fill_holes(mask)`, the same mask -- background
    pixels not 4-connected to the outside of the crop become True -- by one labelling of the background
    (`binary_fill_holes` dilates step by step, slow for long winding holes)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.ones((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)
    np.logical_not(mask, out=padded[1:-1, 1:-1])
    # the padded ring (label 1) joins every background region it touches
    labels, _count = ndimage.label(padded, structure=CROSS_3X3)
    return labels[1:-1, 1:-1] != 1



#: `ndimage.generate_binary_structure(2, 1)`, the default structure of `ndimage.label` and of the binary
#: erosions and dilations, made once (each call without a structure makes it again: ~40 us, thousands of calls).
CROSS_3X3 = np.array([[False, True, False], [True, True, True], [False, True, False]])


def gradient_2d(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.gradient(values)` of a 2-D float array (unit spacing, first-order edges): central differences
    halved inside, one-sided differences at the edges -- the same arithmetic, without `np.gradient`'s set-up
    (~100 us a call, a few calls per object). Arrays with a side under 2 go to `np.gradient` (which refuses
    them)."""
    values = np.asarray(values)
    if values.ndim != 2 or min(values.shape) < 2 or values.dtype.kind != "f":
        rows_gradient, cols_gradient = np.gradient(values)
        return rows_gradient, cols_gradient
    gradients = []
    for axis in (0, 1):
        source = values if axis == 0 else values.T
        out = np.empty_like(values)
        target = out if axis == 0 else out.T
        np.subtract(source[2:], source[:-2], out=target[1:-1])
        target[1:-1] /= 2.0
        np.subtract(source[1], source[0], out=target[0])
        np.subtract(source[-1], source[-2], out=target[-1])
        gradients.append(out)
    return gradients[0], gradients[1]

def _axis_lengths_px(mask: np.ndarray) -> tuple[float, float]:
    """Major and minor axis lengths (px) of the ellipse with the same second moments as the bool `mask`:
    4 sqrt of the eigenvalues of its inertia tensor (as `skimage.measure.regionprops`' `axis_major_length` /
    `axis_minor_length`, equal up to rounding)."""
    rows, cols = np.nonzero(mask)
    n = float(len(rows))
    dr = rows - rows.mean()
    dc = cols - cols.mean()
    var_r, var_c, cov = float(dr @ dr) / n, float(dc @ dc) / n, float(dr @ dc) / n
    half_sum, root = 0.5 * (var_r + var_c), math.hypot(0.5 * (var_r - var_c), cov)
    return 4 * math.sqrt(max(half_sum + root, 0.0)), 4 * math.sqrt(max(half_sum - root, 0.0))


def _optical_density(mean_value: float, level: float, polarity: str, dark_fraction: float | None) -> float:
    """-ln(transmission) in bright field with the dark level known, else |mean - level| / level."""
    if level == 0:
        return 0.0
    if polarity == "dark" and dark_fraction is not None and 0 <= dark_fraction < 1:
        transmission = (mean_value / level - dark_fraction) / (1.0 - dark_fraction)
        return -math.log(min(max(transmission, 1e-3), 1.0))
    return abs(mean_value - level) / abs(level)


def _edge_strength(crop: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude (image units per px) on the object's boundary pixels."""
    if min(crop.shape) < 2:
        return 0.0
    from agent.locate.objects import cross_steps

    boundary = mask & ~cross_steps(mask, 1, erode=True)  # ndimage.binary_erosion(mask)
    if not boundary.any():
        return 0.0
    gradient_rows, gradient_cols = gradient_2d(crop)
    return float(np.hypot(gradient_rows[boundary], gradient_cols[boundary]).mean())


def _corner_share(mask: np.ndarray) -> float:
    """`outline_turning_concentration` of the mask's outline; 0.5 when it cannot be measured."""
    from skimage.measure import find_contours

    from agent.locate.objects import outline_turning_concentration

    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2))  # np.pad(mask, 1).astype(np.float64)
    padded[1:-1, 1:-1] = mask
    contours = find_contours(padded, 0.5)
    if not contours:
        return 0.5
    share = outline_turning_concentration(max(contours, key=len), chord_px=2.0)
    return share if math.isfinite(share) else 0.5


def cold_start_score(features: np.ndarray, names: tuple[str, ...] = CANDIDATE_FEATURE_NAMES) -> np.ndarray:
    """The rule that ranks objects before any answer or diffraction result exists (0..1, higher first).

    Half shape, half contrast: `corner_share` mapped from a circle's 0.25 to 0 and a polygon's 0.75 and
    above to 1 (crystals are faceted), and 1 - exp(-significance / 20) (how clearly the object stands out
    from the film's noise; saturates for anything obvious so that size does not take over). `features` is
    (n, len(names)) or one vector. A fixed rule, not fitted to any specimen: the classifier replaces it as
    soon as the label memory holds outcomes (`agent.prompts.crystal_classifier`).
    """
    table = np.atleast_2d(np.asarray(features, dtype=np.float64))
    shape = np.clip((table[:, names.index("corner_share")] - 0.25) / 0.5, 0.0, 1.0)
    standout = 1.0 - np.exp(-np.maximum(table[:, names.index("significance")], 0.0) / 20.0)
    return 0.5 * shape + 0.5 * standout
