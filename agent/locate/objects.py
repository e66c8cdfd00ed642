"""Objects at pixel level inside candidate regions: one candidate per object, not per region.

Clustering says *where* crystal-like cells are (regions of the cell grid); this module says *which
objects* lie there, so that a target lands on an object and two crystals that share a region become two
targets. Steps (`find_objects`):

1. The image is prepared as for the features (artefacts removed, illumination flattened, bars set to
   the film level) and smoothed with a Gaussian of `SMOOTH_SIGMA_PX` (band by band; the smoothed image is
   kept at full resolution only around the candidate regions, and at every second pixel for the polarity
   vote). The film level and noise are the median and robust sigma (1.4826 MAD) of the pixels of the
   background cluster.
2. Pixels more than `min_contrast_sigma` noise sigmas from the film level are *deviant*; a 3x3 opening
   removes lone noisy pixels.
3. Object polarity is measured, not assumed (`object_polarity`): everything that scatters electrons
   (crystals, ice, debris) deviates from the film in the same direction -- darker in bright field,
   brighter in dark field -- while holes in the film and thin film deviate the other way. The compact
   deviant components of each sign are weighed by their integrated contrast over the whole film; when
   one sign has at least `POLARITY_RATIO` times the other's (and at least `MIN_POLARITY_OBJECTS`
   components), only that sign makes objects. Otherwise both do. The bright side of a torn-film hole's
   edge in bright field then makes no objects. (Its dark side -- the halo flattening leaves on the film
   next to a hole -- still can; dropping objects that border opposite-sign pixels was tried and cost
   recall, because defocus fringes border every real crystal the same way.)
4. Deviant pixels inside the candidate regions are labelled into connected objects. Objects that look
   like several crystals together (`is_compound`: not convex) are split along the necks between their
   parts (`split_compound`: watershed of the distance transform, one marker per local maximum at least
   `min_distance_px` apart; holes do not count as necks), and at most `MAX_PARTS_PER_OBJECT` parts (the
   largest) are kept: a cluster of crystals becomes several objects, one target each. A single convex
   crystal stays whole, and so does a solid elongated one (a needle, or needles side by side): cutting it
   along its length would send the microscope to the same crystal several times.
5. Objects are dropped before splitting when their outline is round (`is_round`: ice balls; single,
   convex objects only), when they lie mostly on a line in the film (`film_lines.film_line_mask`: folds,
   tears, carbon edges, thin lines spanning the film or curved), or, with `max_od`, when they are too thick
   for diffraction. Parts that do not stand out from the film's own noise
   (`object_features.MIN_SIGNIFICANCE`), or whose mean stands less than `MIN_LOCAL_CONTRAST_SIGMA` above the
   film right around them (`local_contrast_sigma`: noise crossing the threshold where the film is a little off),
   are no objects at all. A candidate region whose objects were all dropped for what they are (round, soft,
   a film line, too thick) gives no candidate (`ObjectTable.dropped_regions`); an outlined region in which no
   object stands out keeps its centroid (`agent.locate.targets`).

Returned per object: its region (0-based), centroid row/col (px), area (px), the connected object it is a
part of, and its features (`object_features.OBJECT_FEATURE_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from agent.locate.bitmask import PACKED_MIN_PX, packed_cross_steps
from agent.locate.film_lines import film_line_mask
from agent.locate.object_features import (
    CROSS_3X3,
    MIN_SIGNIFICANCE,
    OBJECT_FEATURE_NAMES,
    deviation_in_polarity,
    measure_object,
    percentile_90,
)
from agent.locate.parallel import run_pair
from agent.locate.smoothing import gaussian_rows

#: Gaussian smoothing (px) before pixels are compared with the film level.
SMOOTH_SIGMA_PX = 1.0
#: How many times the other's integrated contrast one polarity needs to be taken as the objects' polarity.
POLARITY_RATIO = 3.0
#: Fewest compact components of the winning polarity for the polarity to be decided at all.
MIN_POLARITY_OBJECTS = 5
#: Solidity (area / convex hull area) below which an object is taken for several touching crystals.
MIN_SINGLE_SOLIDITY = 0.9
#: Most parts one connected object is split into (the largest ones are kept): a safety bound for huge aggregates.
MAX_PARTS_PER_OBJECT = 12
#: Objects whose outline turns this evenly (share of turning in the sharpest quarter) are round (ice).
ROUND_MAX_TURNING_SHARE = 0.35
#: Objects smaller than a disc of this radius (px) are never called round.
ROUND_MIN_RADIUS_PX = 6.0
#: Components smaller than this (px) are not objects.
MIN_OBJECT_AREA_PX = 4.0

Polarity = Literal["dark", "bright", "both"]


@dataclass(frozen=True)
class ObjectTable:
    """Objects found in candidate regions (all arrays have one entry per object).

    `region` is the 0-based index of the candidate region holding the object; `row_px`, `col_px` its
    centroid and `area_px` its area in pixels; `component` the id of the connected object it is a part of;
    `features` its (n, len(OBJECT_FEATURE_NAMES)) features; `polarity` the objects' measured polarity;
    `dropped_regions` the regions (0-based) where an object was dropped for what it is (round contamination,
    soft contamination, a film line, too thick; not parts too faint or too flat to be objects at all);
    `dropped` how many objects were dropped for each reason ("round", "soft", "film-line", "too-thick",
    "faint", "flat").
    """

    region: np.ndarray
    row_px: np.ndarray
    col_px: np.ndarray
    area_px: np.ndarray
    polarity: Polarity
    dropped_regions: tuple[int, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)
    component: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, len(OBJECT_FEATURE_NAMES))))

    def __len__(self) -> int:
        return int(self.region.shape[0])


def film_statistics(data: np.ndarray, film: np.ndarray, max_samples: int = 200_000) -> tuple[float, float] | None:
    """(level, robust sigma) of `data` over the `film` mask; None when there are fewer than 64 film pixels."""
    count = int(np.count_nonzero(film))
    if count < 64:
        return None
    return _level_and_sigma(data[film][:: max(1, count // max_samples)])


def _level_and_sigma(sample: np.ndarray) -> tuple[float, float]:
    """(median, robust sigma: 1.4826 MAD, else the standard deviation) of the values `sample`."""
    level = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - level)))
    if not sigma > 0:
        sigma = float(np.std(sample)) or 1e-9
    return level, sigma


def object_polarity(
    dark: np.ndarray, bright: np.ndarray, deviation: np.ndarray, min_area_px: float = MIN_OBJECT_AREA_PX
) -> Polarity:
    """Which deviant sign makes objects (see module docstring).

    `dark` and `bright` are bool masks of deviant pixels of each sign, `deviation` the smoothed image
    minus the film level. Each sign is weighed by the integrated contrast (sum of |deviation|) of its
    compact components: at least `min_area_px` pixels and at most 1 % of the image (larger areas are
    holes, film steps or thickness changes, not objects). Weighing by contrast
    rather than counting keeps the faint bright fringes that defocus draws around dark objects from
    outvoting the objects themselves.
    """
    max_area = max(min_area_px, 0.01 * dark.size)
    magnitude = np.abs(deviation).ravel()  # once for both signs

    def weight(mask: np.ndarray) -> tuple[int, float]:
        labels, count = ndimage.label(mask)
        if count == 0:
            return 0, 0.0
        areas = np.bincount(labels.ravel())[1:]
        contrast = np.bincount(labels.ravel(), weights=magnitude)[1:]
        compact = (areas >= min_area_px) & (areas <= max_area)
        return int(np.count_nonzero(compact)), float(contrast[compact].sum())

    (n_dark, w_dark), (n_bright, w_bright) = weight(dark), weight(bright)
    if n_dark >= MIN_POLARITY_OBJECTS and w_dark >= POLARITY_RATIO * w_bright:
        return "dark"
    if n_bright >= MIN_POLARITY_OBJECTS and w_bright >= POLARITY_RATIO * w_dark:
        return "bright"
    return "both"


def is_compound(mask: np.ndarray, hull_px: float | None = None) -> bool:
    """True when the object `mask` (bool crop holding one object) looks like several crystals together.

    A single crystal is convex. Touching crystals make a non-convex union (solidity below
    `MIN_SINGLE_SOLIDITY`, the necks between them). A long convex object -- one needle, or needles lying
    side by side -- is one target, not several along its length. `hull_px` is `convex_area_px(mask)` when the
    caller has it already (None: measured here).
    """
    if np.count_nonzero(mask) < 2 * MIN_OBJECT_AREA_PX:
        return False
    # small holes are not necks: a plate with a few film-bright spots inside is still one plate (filling
    # inner holes leaves the convex hull as it is)
    hull = convex_area_px(mask) if hull_px is None else hull_px
    return bool(np.count_nonzero(fill_small_holes(mask)) / hull < MIN_SINGLE_SOLIDITY)


def convex_area_px(mask: np.ndarray) -> int:
    """Pixels (centres) inside the convex hull of the bool crop `mask` (a crop tight around the object): the
    count of `skimage.morphology.convex_hull_image(mask)`, as `regionprops`' `area_convex`. Holes inside do
    not change it.

    The same hull -- of the midpoints of the pixels' edges -- built without qhull: only the first and last
    pixel of each row can be its corners, so it is the convex chain of the least columns per half-pixel row
    step plus that of the largest (all coordinates are half-integers, the turn tests exact), and its pixels are
    counted by `skimage`'s `grid_points_in_poly` as `convex_hull_image` counts them."""
    from skimage.measure import grid_points_in_poly

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0
    rows = np.flatnonzero(mask.any(axis=1))
    first = 2 * np.argmax(mask[rows], axis=1)  # doubled coordinates: integers
    last = 2 * (mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1))
    big = 1 << 40
    least = np.full(2 * mask.shape[0] + 1, big, dtype=np.int64)  # at doubled row 2r + 1 + (-1, 0, 1)
    most = np.full(2 * mask.shape[0] + 1, -big, dtype=np.int64)
    x = 2 * rows + 1
    least[x - 1] = first
    least[x + 1] = np.minimum(least[x + 1], first)
    least[x] = first - 1
    most[x - 1] = last
    most[x + 1] = np.maximum(most[x + 1], last)
    most[x] = last + 1
    steps = np.flatnonzero(least < big)
    at = steps.tolist()
    left, right = _convex_chain(at, least[steps].tolist(), 1), _convex_chain(at, most[steps].tolist(), -1)
    hull = np.array(left + right[::-1], dtype=np.float64) * 0.5 - np.array([0.5, 0.0])
    return int(np.count_nonzero(grid_points_in_poly(mask.shape, hull, binarize=False)))


def _convex_chain(xs: list[int], ys: list[int], sign: int) -> list[tuple[int, int]]:
    """The convex chain (Andrew's monotone chain) through the points (xs, ys), xs increasing: turning
    counter-clockwise for `sign` 1 (the least ys), clockwise for -1 (the largest); collinear points dropped."""
    chain: list[tuple[int, int]] = []
    for px, py in zip(xs, ys, strict=True):
        while len(chain) >= 2:
            (ax, ay), (bx, by) = chain[-2], chain[-1]
            if sign * ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) > 0:
                break
            chain.pop()
        chain.append((px, py))
    return chain


#: Holes up to this share of an object's area are filled before its shape is judged (texture inside a plate);
#: larger ones are film enclosed by a ring of touching crystals and stay.
SMALL_HOLE_SHARE = 0.1


def fill_small_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes of at most `SMALL_HOLE_SHARE` of its area filled."""
    mask = np.asarray(mask, dtype=bool)
    # the background labelled once (as `object_features.fill_holes`): label 1 is the outside, the others holes
    padded = np.ones((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)
    np.logical_not(mask, out=padded[1:-1, 1:-1])
    background, count = ndimage.label(padded, structure=CROSS_3X3)  # the default structure, made once
    if count <= 1:
        return mask
    background = background[1:-1, 1:-1]
    small = np.bincount(background.ravel(), minlength=count + 1) <= SMALL_HOLE_SHARE * np.count_nonzero(mask)
    small[:2] = False  # the object itself (0) and the outside (1)
    return mask | small[background]


def split_compound(mask: np.ndarray, min_distance_px: int, compound: bool | None = None) -> np.ndarray:
    """Labels (int32, 0 outside, 1..n) of the parts of one object (`mask`, a bool crop).

    A compound object (`is_compound`) is split along the necks between its parts: watershed of the
    negated distance transform with one marker per local maximum at least `min_distance_px` apart. A
    single object comes back whole as label 1, so a lone crystal is never cut in two and nothing is lost.
    `compound` is `is_compound(mask)` when the caller has it already (None: measured here).
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    mask = np.asarray(mask, dtype=bool)
    if not (is_compound(mask) if compound is None else compound):
        return mask.astype(np.int32)
    padded = np.pad(fill_small_holes(mask), 1)  # the distance to the outline, not to small inner holes
    distance = ndimage.distance_transform_edt(padded)
    peaks = peak_local_max(distance, min_distance=max(1, int(min_distance_px)), labels=padded.astype(np.int32))
    if len(peaks) < 2:
        return mask.astype(np.int32)
    markers = np.zeros(padded.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-distance, markers, mask=padded)[1:-1, 1:-1].astype(np.int32)


def outline_turning_concentration(outline_rc: np.ndarray, chord_px: float = 2.0, top_fraction: float = 0.25) -> float:
    """Share of an outline's total turning that happens in its most sharply turning `top_fraction` of length.

    `outline_rc` is a closed sub-pixel contour (n, 2). It is resampled every 0.5 px and the turning angle
    between chords of `chord_px` before and after each point is taken. A circle turns evenly, so the
    share equals `top_fraction` (0.25); a polygon turns at its corners only, so the share approaches 1;
    smooth irregular blobs lie between. NaN for outlines shorter than 20 px.
    """
    # (numpy's linspace, roll and column_stack written out: the same values, ~0.1 ms less a call)
    outline_rc = np.asarray(outline_rc, dtype=np.float64)
    step_rc = outline_rc[1:] - outline_rc[:-1]
    arc = np.empty(len(outline_rc))
    arc[0] = 0.0
    np.cumsum(np.hypot(step_rc[:, 0], step_rc[:, 1]), out=arc[1:])
    length = float(arc[-1])
    if length < 20.0:
        return float("nan")
    n = int(length / 0.5)
    t = np.arange(n, dtype=np.float64) * (length / n)  # np.linspace(0.0, length, n, endpoint=False)
    points = np.empty((n, 2))
    points[:, 0] = np.interp(t, arc, outline_rc[:, 0])
    points[:, 1] = np.interp(t, arc, outline_rc[:, 1])
    k = max(1, round(chord_px / 0.5))
    ahead = np.concatenate([points[k:], points[:k]]) - points  # np.roll(points, -k, axis=0) - points
    behind = points - np.concatenate([points[-k:], points[:-k]])  # points - np.roll(points, k, axis=0)
    turn = np.arctan2(ahead[:, 0], ahead[:, 1]) - np.arctan2(behind[:, 0], behind[:, 1])
    turn = np.abs((turn + np.pi) % (2.0 * np.pi) - np.pi)
    total = float(turn.sum())
    if total <= 0:
        return float("nan")
    return float(np.sort(turn)[::-1][: max(1, int(n * top_fraction))].sum() / total)


def grown_box(
    box: tuple[slice, slice], mask: np.ndarray, shape: tuple[int, ...], pad_px: int
) -> tuple[tuple[slice, slice], np.ndarray]:
    """`box` grown by `pad_px` within an array of `shape`, and the object `mask` (bool, `box`'s shape) placed in
    a bool array of the grown box's shape."""
    rows = slice(max(box[0].start - pad_px, 0), min(box[0].stop + pad_px, shape[0]))
    cols = slice(max(box[1].start - pad_px, 0), min(box[1].stop + pad_px, shape[1]))
    inside = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
    r0, c0 = box[0].start - rows.start, box[1].start - cols.start
    inside[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]] = mask
    return (rows, cols), inside


def is_round(
    data: np.ndarray, box: tuple[slice, slice], mask: np.ndarray, level: float, compound: bool | None = None
) -> bool:
    """True when the object (`mask` in bounding box `box` of the smoothed image `data`) has a round outline.

    Ice balls are frozen droplets: spheres, round in projection. Crystals are faceted and turn at their
    corners; debris is irregular. The outline is the sub-pixel contour of the object's deviation from the
    film `level` at half its contrast (90th percentile); it is round when its turning concentration
    (`outline_turning_concentration`) is below `ROUND_MAX_TURNING_SHARE` (0.35: a circle's 0.25 plus
    room for noise on the outline; a square measures about 0.9, a hexagon over 0.6). Objects smaller than
    a disc of radius `ROUND_MIN_RADIUS_PX` (6 px) are never called round: blurred by the optics and the
    smoothing, their corners are not resolved, so small ice and small crystals cannot be told apart.
    `data` must be smoothed lightly (about 1 px), or corners of crystals a few tens of pixels across are
    rounded off. Compound objects (`is_compound`: an ice ball touching a crystal, say) are never round,
    so a crystal is not thrown away with the ball it touches. The test is tuned to spheres, whose
    projection darkens towards the centre: a flat-topped, sharp-edged disc measures 0.36-0.40 and passes
    as not round. `compound` is `is_compound(mask)` when the caller has it already (None: measured here).
    """
    from skimage.measure import find_contours

    if np.count_nonzero(mask) < np.pi * ROUND_MIN_RADIUS_PX**2:
        return False
    if is_compound(mask) if compound is None else compound:
        return False
    (rows, cols), inside = grown_box(box, mask, data.shape, 3)
    radius_px = float(np.sqrt(np.count_nonzero(mask) / np.pi))
    deviation = np.abs(data[rows, cols] - level)
    if radius_px > 16.0:
        # a large outline is smoothed in proportion (a sixteenth of the radius), so shot noise along it
        # does not read as corners; a polygon's corners stay sharp at that scale
        deviation = ndimage.gaussian_filter(deviation, radius_px / 16.0)
    near = cross_steps(inside, 2, erode=False)  # this object only, not its neighbours
    half = 0.5 * percentile_90(deviation[inside])  # np.percentile(..., 90)
    contours = find_contours(np.where(near, deviation, 0.0), half)
    if not contours:
        return False
    outline = max(contours, key=len)
    if np.hypot(*(outline[0] - outline[-1])) > 1.0:  # not closed (cut by the frame)
        return False
    share = outline_turning_concentration(outline, chord_px=max(2.0, radius_px / 8.0))  # chords grow alike
    return bool(np.isfinite(share) and share < ROUND_MAX_TURNING_SHARE)


def find_objects(
    prepared: np.ndarray,
    film: np.ndarray,
    region_px: np.ndarray,
    bar_mask: np.ndarray,
    *,
    min_contrast_sigma: float = 4.0,
    min_distance_px: int = 5,
    min_area_px: float = MIN_OBJECT_AREA_PX,
    dark_fraction: float | None = None,
    max_od: float | None = None,
    drop_round: bool = True,
    drop_film_lines: bool = True,
    max_edge_px: float | None = None,
    filled: np.ndarray | None = None,
) -> ObjectTable | None:
    """Objects inside candidate regions (see module docstring).

    `prepared` is the cleaned, flattened float image; `film` a bool mask of film (background-cluster)
    pixels; `region_px` an int image of candidate region ids (1..n, 0 outside); `bar_mask` True on bars.
    Returns None when there is too little film to measure the film level against. Whole-image steps are
    the smoothing (in bands), the polarity vote (every second pixel) and labelling; the deviant pixels are
    found in the candidate regions' boxes, and everything per object works on the object's bounding box in
    its region's crop of the smoothed image.

    Too thick (`max_od`, optical density, ln units): in bright field, with `dark_fraction` (the camera's
    zero-transmission level -- bars -- as a fraction of the film level) known, an object whose darkest
    pixel transmits less than exp(-max_od) of the film's intensity is dropped: it is too thick for
    electron diffraction (see `LocateSettings.max_object_od`).

    Round (`drop_round`): objects with a round outline (`is_round`) are dropped as ice balls. Film lines
    (`drop_film_lines`): components lying mostly on a fold, tear or carbon edge (`film_lines.film_line_mask`,
    found whole on the smoothed image at every second pixel: a fold is a chain of short blobs in the
    candidate regions, a line only as a whole) are dropped.
    `dark_fraction` is also used for every object's `optical_density` feature.

    Soft (`max_edge_px`, None: not tested): an object whose edge is wider than this (`edges.object_edge_width_px`)
    is dropped as blurred contamination.

    `filled`: bool mask of the pixels the preparation set to the film level (`preprocess.filled_mask`; None:
    `bar_mask`). They are no film: left out of every object's surroundings (`local_contrast_sigma`).
    """
    filled = bar_mask if filled is None else np.asarray(filled, dtype=bool)
    smoothed = _smooth(np.asarray(prepared, dtype=np.float64), film & ~bar_mask, region_px)
    if smoothed is None:
        return None
    level, sigma = _level_and_sigma(smoothed.film_sample)
    threshold = min_contrast_sigma * sigma
    polarity = _polarity_vote(smoothed, level, threshold, bar_mask)

    def lines() -> np.ndarray | None:
        if not drop_film_lines:
            return None
        return film_line_mask(deviation_in_polarity(smoothed.half, level, polarity) / sigma, bar_mask[::2, ::2])

    def labelled() -> np.ndarray:
        return _label(_deviant_pixels(smoothed, level, threshold, polarity, bar_mask, region_px))

    # the film lines (half resolution) on a second thread while the deviant pixels are labelled
    lines_half, labels = run_pair(lines, labelled)
    if lines_half is not None and not lines_half.any():
        lines_half = None  # no line: no component lies on one
    return _measure_objects(
        smoothed,
        labels,
        region_px,
        _Film(level, sigma, polarity, dark_fraction, max_edge_px, min_contrast_sigma),
        min_distance_px=min_distance_px,
        smallest_px=max(MIN_OBJECT_AREA_PX, min_area_px),
        min_transmission=_min_transmission(polarity, dark_fraction, max_od),
        drop_round=drop_round,
        lines_half=lines_half,
        filled=filled,
    )


def _label(mask: np.ndarray) -> np.ndarray:
    """`ndimage.label(mask)[0]` (the same ids), as uint16 when there are fewer than 65 536 components: half
    the full-size array of int32 to write."""
    try:
        labels, _count = ndimage.label(mask, output=np.uint16)
    except RuntimeError:  # more components than uint16 holds
        labels, _count = ndimage.label(mask)
    return labels


@dataclass(frozen=True)
class _Film:
    """The film the objects are measured against: level and noise sigma (smoothed image units), the objects'
    polarity, the camera's dark level as a fraction of the film level (None: unknown), the widest edge (px)
    an object may have (None: not tested) and the deviation (sigmas) that makes a pixel deviant."""

    level: float
    sigma: float
    polarity: Polarity
    dark_fraction: float | None
    max_edge_px: float | None = None
    threshold_sigma: float = 4.0


#: Rows of the image smoothed at a time (`_smooth`): a few MB per band instead of a fresh full-size array.
SMOOTH_BAND_ROWS = 256
#: Pixels around the candidate regions' boxes where the smoothed image is kept (`is_round` reads 3 beyond an
#: object's box).
SMOOTH_MARGIN_PX = 8


@dataclass(frozen=True)
class _Smoothed:
    """The prepared image smoothed with a Gaussian of `SMOOTH_SIGMA_PX` (`ndimage.gaussian_filter`, the same
    values), kept where it is needed: `crops[i]` inside `boxes[i]`, the box of candidate region i + 1 grown
    by `SMOOTH_MARGIN_PX` (None for a region id without pixels); `half`, the whole smoothed image at every
    second pixel (`[::2, ::2]`); `film_sample`, its values at every `count // 200_000`-th film pixel in
    row-major order (as `film_statistics` samples them)."""

    crops: list[np.ndarray | None]
    boxes: list[tuple[slice, slice] | None]
    half: np.ndarray
    film_sample: np.ndarray


def _smooth(prepared: np.ndarray, film: np.ndarray, region_px: np.ndarray) -> _Smoothed | None:
    """Step 1's smoothing, band by band of `SMOOTH_BAND_ROWS` rows (`smoothing.gaussian_rows`: each band's
    values equal the whole image's; no full-size array is made); None when fewer than 64 `film` pixels."""
    count = int(np.count_nonzero(film))
    if count < 64:
        return None
    step = max(1, count // 200_000)
    rows, cols = prepared.shape
    boxes = _grown_boxes(region_px, SMOOTH_MARGIN_PX)
    crops = [None if box is None else np.empty((box[0].stop - box[0].start, box[1].stop - box[1].start))
             for box in boxes]
    half = np.empty(((rows + 1) // 2, (cols + 1) // 2))
    samples, seen = [], 0
    for top in range(0, rows, SMOOTH_BAND_ROWS):
        bottom = min(top + SMOOTH_BAND_ROWS, rows)
        band = gaussian_rows(prepared, top, bottom, SMOOTH_SIGMA_PX)
        half[(top + 1) // 2 : (bottom + 1) // 2] = band[top % 2 :: 2, ::2]
        on_film = band[film[top:bottom]]
        samples.append(on_film[(-seen) % step :: step])
        seen += len(on_film)
        for box, crop in zip(boxes, crops, strict=True):
            if box is not None and crop is not None and box[0].start < bottom and box[0].stop > top:
                r0, r1 = max(box[0].start, top), min(box[0].stop, bottom)
                crop[r0 - box[0].start : r1 - box[0].start] = band[r0 - top : r1 - top, box[1]]
    return _Smoothed(crops, boxes, half, np.concatenate(samples))


def _grown_boxes(region_px: np.ndarray, margin_px: int) -> list[tuple[slice, slice] | None]:
    """Bounding box of every candidate region id 1..max of `region_px` (None for an id without pixels), grown
    by `margin_px` within the image."""
    rows, cols = region_px.shape
    grown: list[tuple[slice, slice] | None] = []
    for box in ndimage.find_objects(np.asarray(region_px)):
        if box is None:
            grown.append(None)
            continue
        r, c = box
        grown.append(
            (
                slice(max(r.start - margin_px, 0), min(r.stop + margin_px, rows)),
                slice(max(c.start - margin_px, 0), min(c.stop + margin_px, cols)),
            )
        )
    return grown


def _polarity_vote(smoothed: _Smoothed, level: float, threshold: float, bar_mask: np.ndarray) -> Polarity:
    """Step 2: the objects' polarity, a whole-image vote (`object_polarity`) of the pixels deviating from the film
    `level` by more than `threshold` (image units) in `smoothed`."""
    # measured on every second pixel (a quarter of the work); there a component needs 2 pixels (about 8 at full
    # resolution), so lone noisy pixels cast no vote and MIN_POLARITY_OBJECTS keeps its meaning
    half, half_bar = smoothed.half, bar_mask[::2, ::2]
    return object_polarity(
        (half < level - threshold) & ~half_bar, (half > level + threshold) & ~half_bar, half - level, min_area_px=2.0
    )


def _deviant_pixels(
    smoothed: _Smoothed,
    level: float,
    threshold: float,
    polarity: Polarity,
    bar_mask: np.ndarray,
    region_px: np.ndarray,
) -> np.ndarray:
    """Step 3: the bool mask of deviant pixels inside candidate regions: `smoothed` deviates from the film `level`
    by more than `threshold` (image units) in `polarity` (both ways when undecided), opened (lone pixels go)."""
    deviant = np.zeros(bar_mask.shape, dtype=bool)
    for box, data in zip(smoothed.boxes, smoothed.crops, strict=True):  # every region pixel lies in a box
        if box is None or data is None:
            continue
        if polarity == "dark":
            inside = data < level - threshold
        elif polarity == "bright":
            inside = data > level + threshold
        else:
            inside = np.abs(data - level) > threshold
        deviant[box] |= inside & ~bar_mask[box] & (region_px[box] > 0)
    return cross_steps(cross_steps(deviant, 1, erode=True), 1, erode=False)  # opening: lone pixels go


def cross_steps(mask: np.ndarray, iterations: int, erode: bool) -> np.ndarray:
    """`mask` eroded (`erode`) or dilated `iterations` times by the 3x3 cross, outside the image counting as
    False: `ndimage.binary_erosion` / `binary_dilation(mask, iterations=...)` with the default structure (the
    same masks, by shifted ANDs / ORs, 2-5x faster; full-size masks on packed bits, `bitmask.packed_cross_steps`)."""
    current = np.asarray(mask, dtype=bool)
    if current.size >= PACKED_MIN_PX and current.ndim == 2:
        return packed_cross_steps(current, iterations, erode)
    combine = np.logical_and if erode else np.logical_or
    for _ in range(iterations):
        out = current.copy()
        combine(out[1:], current[:-1], out=out[1:])
        combine(out[:-1], current[1:], out=out[:-1])
        combine(out[:, 1:], current[:, :-1], out=out[:, 1:])
        combine(out[:, :-1], current[:, 1:], out=out[:, :-1])
        if erode:
            out[[0, -1], :] = False
            out[:, [0, -1]] = False
        current = out
    return current


def _min_transmission(polarity: Polarity, dark_fraction: float | None, max_od: float | None) -> float | None:
    """The least flattened intensity, as a fraction of the film level, of an object thin enough for
    diffraction (`max_od`, ln units); None when the thickness test does not apply (not bright field, or
    the dark level or `max_od` unknown)."""
    if polarity == "dark" and dark_fraction is not None and max_od is not None and 0 <= dark_fraction < 1:
        # flattened intensity / film level = T (1 - d) + d for transmission T and dark fraction d
        return float(np.exp(-max_od)) * (1.0 - dark_fraction) + dark_fraction
    return None


def _measure_objects(
    smoothed: _Smoothed,
    labels: np.ndarray,
    region_px: np.ndarray,
    film: _Film,
    *,
    min_distance_px: int,
    smallest_px: float,
    min_transmission: float | None,
    drop_round: bool,
    lines_half: np.ndarray | None,
    filled: np.ndarray,
) -> ObjectTable:
    """Steps 4 and 5: for every labelled component, drop it (too thick, round, a film line) or split it into
    its parts and keep the largest `MAX_PARTS_PER_OBJECT` parts of at least `smallest_px` pixels that stand
    out from the noise, each at its centroid (px) with its features. A component lies in one candidate
    region and is judged on that region's crop of the smoothed image (`smoothed`; the crop reaches at least
    `SMOOTH_MARGIN_PX` beyond it, or to the image's edge, so the tests see what they would on the whole
    image)."""
    region_of, rows, cols, areas, components, features = [], [], [], [], [], []
    dropped_regions: set[int] = set()
    dropped: dict[str, int] = {}

    def drop(region: int, reason: str) -> None:
        dropped_regions.add(region)
        dropped[reason] = dropped.get(reason, 0) + 1

    for label_id, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == label_id
        box_in_image = box
        region = int(region_px[box][mask].max()) - 1
        data, crop_box = smoothed.crops[region], smoothed.boxes[region]
        assert data is not None and crop_box is not None  # the component's region has pixels
        top, left = crop_box[0].start, crop_box[1].start
        box = (slice(box[0].start - top, box[0].stop - top), slice(box[1].start - left, box[1].stop - left))
        hull_px = convex_area_px(mask)  # once: the drop tests, the split and the features share it
        compound = is_compound(mask, hull_px=hull_px)
        reason = _drop_reason(data, box, mask, film, min_transmission, drop_round, compound)
        if reason is None and lines_half is not None and _on_lines(lines_half, labels, label_id, box_in_image):
            reason = "film-line"
        if reason is not None:
            drop(region, reason)
            continue
        for part_box, part, part_hull_px in _largest_parts(box, mask, min_distance_px, smallest_px, compound, hull_px):
            vector = measure_object(
                data, part_box, part, level=film.level, sigma=film.sigma, polarity=film.polarity,
                dark_fraction=film.dark_fraction, smooth_sigma_px=SMOOTH_SIGMA_PX, convex_area_px=part_hull_px,
            )
            # a part that does not stand out from the noise, or from the film right around it, is no object at
            # all, as if its pixels had not been deviant: its region is not marked as one whose objects were
            # dropped, so an outlined region (a faint crystal found by its straight edges, whose brightest
            # patches stand little above the crystal around them) keeps its centroid
            if vector[OBJECT_FEATURE_NAMES.index("significance")] < MIN_SIGNIFICANCE:
                dropped["faint"] = dropped.get("faint", 0) + 1
                continue
            if local_contrast_sigma(data, part_box, part, film, filled[crop_box]) < MIN_LOCAL_CONTRAST_SIGMA:
                dropped["flat"] = dropped.get("flat", 0) + 1
                continue
            part_rows, part_cols = np.nonzero(part)
            region_of.append(region)
            rows.append(top + part_box[0].start + part_rows.mean())
            cols.append(left + part_box[1].start + part_cols.mean())
            areas.append(float(len(part_rows)))
            components.append(label_id)
            features.append(vector)
    return ObjectTable(
        np.asarray(region_of, dtype=np.int64),
        np.asarray(rows, dtype=np.float64),
        np.asarray(cols, dtype=np.float64),
        np.asarray(areas, dtype=np.float64),
        film.polarity,
        tuple(sorted(dropped_regions)),
        dropped,
        np.asarray(components, dtype=np.int64),
        np.asarray(features, dtype=np.float64).reshape(-1, len(OBJECT_FEATURE_NAMES)),
    )


#: Least mean contrast (film noise sigmas) an object must have over the film right around it (`local_contrast_sigma`):
#: pixels are deviant at 4 sigmas from the image's film level, but where the flattening leaves the film a few
#: sigmas off, noise crosses that threshold in clusters whose mean stands only 1-2 sigmas above their own
#: surroundings. Measured: such clusters 1.1-2.1; the faintest crystals of the simulator and the synthetic test
#: images 3.8-3.9.
MIN_LOCAL_CONTRAST_SIGMA = 3.0
#: Gap (px) and widths (px, tried in turn) of the ring around an object where its surroundings are measured: the
#: next width where the ring holds too little film (a part of a larger deviant mass, or an object beside a bar or
#: a seam strip, whose ring was all filled or deviant and so was never judged).
LOCAL_RING_GAP_PX = 2
LOCAL_RING_WIDTHS_PX = (4, 8, 16)


def local_contrast_sigma(
    data: np.ndarray, box: tuple[slice, slice], mask: np.ndarray, film: _Film, filled: np.ndarray | None = None
) -> float:
    """Mean deviation (film sigmas, in the objects' polarity) of the object `mask` in bounding box `box` of the
    smoothed crop `data`, over the median of a ring from `LOCAL_RING_GAP_PX` px outside it, as wide as the first of
    `LOCAL_RING_WIDTHS_PX` that holds 8 film pixels: within the crop, without pixels that are themselves deviant
    (neighbours, or the object where a candidate region cut it) and without the crop's `filled` pixels, set to
    the film level over bars and seams (beside a data bar or a seam, film left a few sigmas off by the flattening
    stood out against that written level, not against the film around it). NaN when no ring holds 8."""
    for width_px in LOCAL_RING_WIDTHS_PX:
        (rows, cols), inside = grown_box(box, mask, data.shape, LOCAL_RING_GAP_PX + width_px)
        deviation = deviation_in_polarity(data[rows, cols], film.level, film.polarity) / film.sigma
        near = cross_steps(inside, LOCAL_RING_GAP_PX, erode=False)
        ring = cross_steps(near, width_px, erode=False) & ~near & (deviation < film.threshold_sigma)
        if filled is not None:
            ring &= ~filled[rows, cols]
        if np.count_nonzero(ring) >= 8:
            return float(deviation[inside].mean() - np.median(deviation[ring]))
    return float("nan")


def _drop_reason(
    data: np.ndarray,
    box: tuple[slice, slice],
    mask: np.ndarray,
    film: _Film,
    min_transmission: float | None,
    drop_round: bool,
    compound: bool,
) -> str | None:
    """Why a whole component is not a crystal by itself ("too-thick", "round", "soft"), or None. `compound` is
    `is_compound(mask)`."""
    if min_transmission is not None and float(data[box][mask].min()) < min_transmission * film.level:
        return "too-thick"
    if drop_round and is_round(data, box, mask, film.level, compound=compound):
        return "round"
    # a compound object may hold a crystal beside the soft stuff: only single, convex objects are judged whole
    if film.max_edge_px is not None and not compound and _edge_width_px(data, box, mask, film) > film.max_edge_px:
        return "soft"
    return None


def _edge_width_px(data: np.ndarray, box: tuple[slice, slice], mask: np.ndarray, film: _Film) -> float:
    """`edges.object_edge_width_px` of the object `mask` in bounding box `box` of the smoothed crop `data`, on the
    box grown by 3 px (within the crop)."""
    from agent.locate.edges import object_edge_width_px

    (rows, cols), inside = grown_box(box, mask, data.shape, 3)
    return object_edge_width_px(deviation_in_polarity(data[rows, cols], film.level, film.polarity), inside)


def _on_lines(lines_half: np.ndarray, labels: np.ndarray, label_id: int, box: tuple[slice, slice]) -> bool:
    """True when most of component `label_id` (in `box` of `labels`) lies on a film line (`lines_half`, the
    line mask at every second pixel)."""
    rows, cols = np.nonzero(labels[box] == label_id)
    rows = np.minimum((rows + box[0].start) // 2, lines_half.shape[0] - 1)
    cols = np.minimum((cols + box[1].start) // 2, lines_half.shape[1] - 1)
    return bool(lines_half[rows, cols].mean() >= 0.5)


def _largest_parts(
    box: tuple[slice, slice],
    mask: np.ndarray,
    min_distance_px: int,
    smallest_px: float,
    compound: bool,
    hull_px: int,
) -> list[tuple[tuple[slice, slice], np.ndarray, int | None]]:
    """The parts of one component (`split_compound`) of at least `smallest_px` pixels, largest first, at most
    `MAX_PARTS_PER_OBJECT`, each as (its bounding box in the image, its bool mask in that box, the pixels of
    its convex hull when known: `hull_px` = `convex_area_px(mask)` for a component that stays whole, else
    None). `compound` is `is_compound(mask)`."""
    parts = split_compound(mask, min_distance_px, compound=compound)
    if int(parts.max(initial=0)) == 1:  # whole (the part is `mask` itself)
        area_px = int(np.count_nonzero(mask))
        return [(box, mask, hull_px)] if area_px >= smallest_px else []
    found = []
    for part_id, part_box in enumerate(ndimage.find_objects(parts), start=1):
        if part_box is None:
            continue
        part = parts[part_box] == part_id
        area_px = int(np.count_nonzero(part))
        if area_px < smallest_px:
            continue
        image_box = (
            slice(box[0].start + part_box[0].start, box[0].start + part_box[0].stop),
            slice(box[1].start + part_box[1].start, box[1].start + part_box[1].stop),
        )
        found.append((area_px, part_id, image_box, part))
    found.sort(key=lambda entry: (-entry[0], entry[1]))
    return [(image_box, part, None) for _, _, image_box, part in found[:MAX_PARTS_PER_OBJECT]]
