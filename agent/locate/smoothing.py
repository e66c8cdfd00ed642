"""Gaussian smoothing of a band of rows, equal bit for bit to `ndimage.gaussian_filter` of the whole image.

`ndimage.gaussian_filter(image, sigma)` filters along the rows' axis (0) first, then along the columns'
axis (1). Along axis 0 scipy copies every column into a line buffer, which is slow on a large C-ordered
image (strided reads: at 4096^2 about 2.5 times the time of axis 1). Here the axis-0 pass is done with
whole rows in numpy, in the order of scipy's C loop for a symmetric kernel (`NI_Correlate1D`:
``out = x[i] * w[0]``, then for k = r..1: ``out += (x[i - k] + x[i + k]) * w[-k]``; every step is one
IEEE operation, so the values are the same), with the image's edges reflected as mode "reflect" does. The
axis-1 pass is scipy's own `correlate1d`. Tests compare both on random images.

Speed: the band is done in sub-bands of `_SUB_BAND_ROWS` rows, each through both passes (every row of the
axis-1 pass is filtered on its own, so a sub-band's rows equal the whole band's); sub-bands run on up to
`parallel.MAX_THREADS` threads once the band has `PARALLEL_MIN_PX` pixels (numpy and scipy release the GIL).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from agent.locate.parallel import run_parallel

#: Rows of the axis-0 pass done at a time (their temporaries stay in the cache).
_SUB_BAND_ROWS = 64

#: Pixels of a band from which its sub-bands are spread over threads (below, a pool costs more than it saves).
PARALLEL_MIN_PX = 1 << 20


def gaussian_weights(sigma_px: float, truncate: float = 4.0) -> np.ndarray:
    """The 1-D kernel (float64, 2 r + 1 taps, r = int(truncate * sigma + 0.5)) `ndimage.gaussian_filter1d`
    correlates with (order 0)."""
    radius = int(truncate * float(sigma_px) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma_px * sigma_px) * x**2)
    return (phi / phi.sum())[::-1]


def _reflected_rows(image: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows `start`..`stop` - 1 of `image`, indices outside 0..rows - 1 reflected as ndimage's "reflect" mode
    (d c b a | a b c d | d c b a); a view when no row falls outside."""
    rows = image.shape[0]
    if start >= 0 and stop <= rows:
        return image[start:stop]
    index = np.arange(start, stop) % (2 * rows)
    return image[np.where(index >= rows, 2 * rows - 1 - index, index)]


def gaussian_rows(image: np.ndarray, top: int, bottom: int, sigma_px: float) -> np.ndarray:
    """Rows `top`..`bottom` - 1 of `ndimage.gaussian_filter(image, sigma_px)` (float64 2-D `image`, mode
    "reflect", truncate 4), the same values, computed from those rows and the kernel's reach around them."""
    weights = gaussian_weights(sigma_px)
    radius = len(weights) // 2
    if radius == 0:
        return ndimage.gaussian_filter(np.asarray(image[top:bottom], dtype=np.float64), sigma_px)
    cols = image.shape[1]
    out = np.empty((bottom - top, cols))
    tasks = [
        functools.partial(_smooth_sub_band, image, top, first, min(first + _SUB_BAND_ROWS, bottom), weights, out)
        for first in range(top, bottom, _SUB_BAND_ROWS)
    ]
    if out.size < PARALLEL_MIN_PX:
        for task in tasks:
            task()
    else:
        run_parallel(tasks)
    return out


def _smooth_sub_band(image: np.ndarray, top: int, first: int, last: int, weights: np.ndarray, out: np.ndarray) -> None:
    """Image rows `first`..`last` - 1 smoothed along both axes into their rows of `out` (whose row 0 is image
    row `top`): the axis-0 pass in scipy's order (module docstring), then `correlate1d` along each row."""
    radius = len(weights) // 2
    source = _reflected_rows(image, first - radius, last + radius)
    columns_done, tmp = np.empty((last - first, image.shape[1])), np.empty((last - first, image.shape[1]))
    n = source.shape[0]
    np.multiply(source[radius : n - radius], weights[radius], out=columns_done)
    for k in range(radius, 0, -1):
        np.add(source[radius - k : n - radius - k], source[radius + k : n - radius + k], out=tmp)
        tmp *= weights[radius - k]
        columns_done += tmp
    ndimage.correlate1d(columns_done, weights, axis=1, mode="reflect", output=out[first - top : last - top])
