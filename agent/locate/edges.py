"""How wide an edge is, in pixels: the image's own sharpest edges (the grid bars') and an object's.

Crystals are faceted solids: their thickness steps at the edge, so their outline is as sharp as the optics draw
any edge. Contamination and debris blobs thin out gradually, and their edges are several times wider. The grid
bars are the reference for "as sharp as the optics draw": opaque metal with a cut edge, present in every grid
image, blurred by the same defocus, binning and smoothing as everything else. An object whose edge is more than
`SOFT_EDGE_FACTOR` times as wide as the bars' is taken for soft contamination (`objects.find_objects` drops it,
if it is a single convex object: a compound one may hold a crystal beside the contamination).

Edge width `W` is the edge's step over its steepest gradient: a step blurred by a Gaussian of sigma s measures
s * sqrt(2 pi) (2.5 px after the locator's 1-px smoothing), a Gaussian blob of sigma s about 1.65 s. For an
object the step is the 90th percentile of its deviation from the film and the gradient the 90th percentile in
a band two pixels either side of its outline; for the bars, the film level beside them minus their level, and
the gradient in a band four pixels either side of the bar mask's edge.

Measured, in the 1-px-smoothed image (`tests.synthetic_images`, the simulator's atlases of four specimen types):
bar edges 3.2-3.4 px at 1-2k (4.6 px on the synthetic 4k images); crystals 2.8-5.8 px in the synthetic images and
up to 6.2 px in the simulator (one fibre bundle cut by the frame 10.6 px, now measured without the frame's cut);
blurred debris of the synthetic images 3.1-33 px, half of it above 10 px. The factor 3.5 lies between the widest
crystal edges and the bulk of the blurred debris; it was not fitted to any one image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from agent.locate.object_features import gradient_2d, percentile_90

#: An object's edge more than this many times as wide as the bars' is soft (contamination, not a crystal).
SOFT_EDGE_FACTOR = 3.5
#: Bar edge width (px) assumed when the image has too little bar edge to measure, and the least taken from a
#: measurement (a burned-in data bar's edge is sharper than any the optics draw): a step after the 1-px smoothing
#: plus a little optics.
DEFAULT_BAR_EDGE_PX = 3.0
#: Fewest pixels of bar, of film and of edge band in a window for a measurement.
MIN_EDGE_PIXELS = 100
#: Windows along the bar edges where the bars' edge width is measured, and their side (px).
EDGE_WINDOWS = 16
EDGE_WINDOW_PX = 64


def bar_edge_width_px(image: np.ndarray, bar_mask: np.ndarray) -> float:
    """Edge width (px, see module docstring) of the grid bars in the raw `image`: the median over up to
    `EDGE_WINDOWS` full-resolution windows of `EDGE_WINDOW_PX` px spread along the bar mask's edge (the whole
    image is never smoothed for this). At least `DEFAULT_BAR_EDGE_PX`, and that value when the bar edges are too
    short to measure."""
    bars = np.asarray(bar_mask, dtype=bool)
    step = max(1, max(bars.shape) // 256)
    coarse = bars[::step, ::step]
    edge = coarse & ~ndimage.binary_erosion(coarse)
    rows, cols = np.nonzero(edge)
    if rows.size == 0:
        return DEFAULT_BAR_EDGE_PX
    picks = np.linspace(0, rows.size - 1, min(EDGE_WINDOWS, rows.size)).astype(int)
    half = EDGE_WINDOW_PX // 2
    widths = []
    for r, c in zip(rows[picks] * step, cols[picks] * step, strict=True):
        r0, c0 = max(0, r - half), max(0, c - half)
        window = (slice(r0, r0 + EDGE_WINDOW_PX), slice(c0, c0 + EDGE_WINDOW_PX))
        width = _edge_width(np.asarray(image[window], dtype=np.float64), bars[window])
        if width > 0:
            widths.append(width)
    if len(widths) < 3:
        return DEFAULT_BAR_EDGE_PX
    return max(DEFAULT_BAR_EDGE_PX, float(np.median(widths)))


def _edge_width(data: np.ndarray, bars: np.ndarray) -> float:
    """Bar edge width (px) in one window of the raw image `data` (0 when unmeasurable), after the locator's 1-px
    smoothing."""
    inner = ndimage.binary_erosion(bars, iterations=6)
    band = ndimage.binary_dilation(bars, iterations=4) & ~ndimage.binary_erosion(bars, iterations=4)
    film = ~ndimage.binary_dilation(bars, iterations=8)
    if min(np.count_nonzero(inner), np.count_nonzero(band), np.count_nonzero(film)) < MIN_EDGE_PIXELS:
        return 0.0
    smoothed = ndimage.gaussian_filter(data, 1.0)
    step = abs(float(np.median(smoothed[film])) - float(np.median(smoothed[inner])))
    steepest = percentile_90(np.hypot(*np.gradient(smoothed))[band])
    return step / steepest if steepest > 0 else 0.0


def object_edge_width_px(deviation: np.ndarray, inside: np.ndarray) -> float:
    """Edge width (px) of the object `inside` (bool, same shape as `deviation`, with at least two pixels of
    margin, except where the image's frame cuts it) in `deviation`, its smoothed deviation from the film in the
    objects' polarity; inf for an object without a measurable edge gradient."""
    # outside the array counts as object: where the frame cuts an object there is no edge to measure.
    # ndimage.binary_dilation(inside, iterations=2) & ~ndimage.binary_erosion(inside, iterations=2,
    # border_value=1), by shifted ANDs / ORs: the erosion on a copy with two rows and columns of object around
    # it (two cross erosions reach two pixels, so outside that frame nothing counts)
    from agent.locate.objects import cross_steps

    framed = np.ones((inside.shape[0] + 4, inside.shape[1] + 4), dtype=bool)
    framed[2:-2, 2:-2] = inside
    band = cross_steps(inside, 2, erode=False) & ~cross_steps(framed, 2, erode=True)[2:-2, 2:-2]
    gradient = np.hypot(*gradient_2d(deviation))
    steepest = percentile_90(gradient[band]) if band.any() else 0.0
    return percentile_90(deviation[inside]) / steepest if steepest > 0 else float("inf")
