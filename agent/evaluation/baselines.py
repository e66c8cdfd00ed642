"""Two textbook detectors to compare the clustering locator with, on the same images.

Both share one preprocessing step (`normalise`), built for real images rather than the simulator:

1. hot pixels and readout speckle: 3x3 median filter;
2. grid bars / black areas: Otsu threshold of the logarithm of a heavily smoothed copy (the log keeps a
   bright burned-in data bar from pulling the threshold up) picks the dark class, the final threshold
   is half-way between the two class levels (where a blurred edge is), kept only when the dark class is much
   darker than the rest (< half its level above the floor) and only as large regions (>= 0.5 % of the
   image); so a frame without bars loses nothing;
3. burned-in annotations and clipped areas: noise-free regions (constant in 3x3) of >= 0.2 % of
   the image, and flat glyphs next to them, are left out of everything (a camera never gives
   noise-free film);
4. uneven illumination: a smooth background by normalised convolution (Gaussian, sigma 1/16 of the
   image size) that ignores bars and annotations, then the residual in robust noise units (median
   absolute deviation), so either contrast polarity (bright-field dark crystals, dark-field bright
   ones) shows.

Detectors:

- `threshold_components`: |residual| > 4 noise units after a 1-px Gaussian, 8-connected components of
  at least `min_area_px` pixels, centroids as detections (score: mean |residual|);
- `log_blobs`: scikit-image `blob_log` on each polarity of the residual (downsampled so the longest side
  is <= 512 px), threshold 3 noise units; blob centres as detections.

Nothing here is tuned to a specimen type: the constants are the usual textbook ones and are the same
for every image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.evaluation.scoring import Detection

#: Residual threshold (robust noise units) of `threshold_components`.
THRESHOLD_SIGMA = 4.0
#: Threshold (noise units of the downsampled residual) of `log_blobs`.
LOG_THRESHOLD_SIGMA = 3.0
#: Longest side (pixels) `log_blobs` works at.
LOG_MAX_SIDE_PX = 512


class DetectorInputError(ValueError):
    """An image a detector cannot work on (not 2-D, too small, not numeric, all NaN)."""


@dataclass(frozen=True)
class DetectorOutput:
    """Detections of one method on one image plus its grid-bar mask (None if the method has none)."""

    detections: tuple[Detection, ...]
    bar_mask: np.ndarray | None


@dataclass(frozen=True)
class Normalised:
    """The residual image in robust noise units (0 on and next to bars), the bar mask, and where the
    residual is valid (off the bars), all of the input's shape."""

    residual: np.ndarray
    bar_mask: np.ndarray
    valid: np.ndarray


def check_image(image: np.ndarray, min_side_px: int = 16) -> np.ndarray:
    """The image as float64; `DetectorInputError` if it is not a usable 2-D grayscale array."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise DetectorInputError(f"expected a 2-D grayscale image, got shape {array.shape}")
    if array.dtype.kind not in "uif":
        raise DetectorInputError(f"expected a numeric image, got dtype {array.dtype}")
    if min(array.shape) < min_side_px:
        raise DetectorInputError(f"image {array.shape} is smaller than {min_side_px} px on a side")
    data = array.astype(np.float64)
    if not np.isfinite(data).any():
        raise DetectorInputError("image has no finite pixel")
    if not np.isfinite(data).all():
        data = np.where(np.isfinite(data), data, np.nanmedian(data[np.isfinite(data)]))
    return data


def find_bars(data: np.ndarray) -> np.ndarray:
    """Grid bars / black areas of an image (float64): large regions far darker than the rest."""
    from skimage.filters import threshold_otsu

    rows, cols = data.shape
    sigma = max(2.0, min(rows, cols) / 128.0)
    smooth = ndimage.gaussian_filter(data, sigma)
    if float(smooth.max() - smooth.min()) <= 0:
        return np.zeros(data.shape, dtype=bool)
    floor = float(np.percentile(smooth, 0.1))
    log_level = np.log1p(np.maximum(smooth - floor, 0.0))
    dark = log_level < threshold_otsu(log_level)
    if not dark.any() or dark.all():
        return np.zeros(data.shape, dtype=bool)
    dark_level = float(np.median(smooth[dark])) - floor
    bright_level = float(np.median(smooth[~dark])) - floor
    if bright_level <= 0 or dark_level >= 0.5 * bright_level:
        return np.zeros(data.shape, dtype=bool)
    # the log only chose the classes; the edge of a blurred bar lies half-way between the two levels
    dark = smooth < floor + (dark_level + bright_level) / 2.0
    labels, n = ndimage.label(dark)
    if n == 0:
        return dark
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= 0.005 * data.size
    keep[0] = False
    return keep[labels]


def normalise(image: np.ndarray) -> Normalised:
    """Median-filtered, illumination-flattened residual in robust noise units, and the bar mask."""
    raw = check_image(image)
    data = ndimage.median_filter(raw, size=3)
    bars = find_bars(data)
    flat = flat_regions(raw)
    excluded = bars | flat
    residual = data - smooth_background(data, excluded)
    valid = ~ndimage.binary_dilation(excluded, iterations=3) if excluded.any() else np.ones(data.shape, dtype=bool)
    if not valid.any():
        return Normalised(residual=np.zeros_like(residual), bar_mask=bars, valid=valid)
    values = residual[valid]
    centre = float(np.median(values))
    mad = float(np.median(np.abs(values - centre))) * 1.4826
    noise = mad if mad > 0 else max(float(values.std()), 1e-9)
    z = (residual - centre) / noise
    z[~valid] = 0.0
    return Normalised(residual=z, bar_mask=bars, valid=valid)


def flat_regions(data: np.ndarray, min_fraction: float = 0.002) -> np.ndarray:
    """Noise-free regions (constant in a 3x3 window) of at least `min_fraction` of the image, plus
    smaller flat pieces next to them (glyphs): burned-in annotations, clipped or padded areas."""
    flat = ndimage.maximum_filter(data, 3) == ndimage.minimum_filter(data, 3)  # exact, unlike sum-of-squares
    if not flat.any():
        return flat
    labels, n = ndimage.label(flat)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_fraction * data.size
    keep[0] = False
    large = keep[labels]
    if not large.any():
        return large
    # annotation glyphs (labels, scale bars) are small flat pieces next to a large flat band: add them
    near = np.unique(labels[ndimage.binary_dilation(large, iterations=5) & flat])
    keep[near[near > 0]] = True
    return ndimage.binary_dilation(keep[labels], iterations=2)


def smooth_background(data: np.ndarray, bars: np.ndarray) -> np.ndarray:
    """Smooth background (Gaussian sigma 1/16 of the longest side) that ignores `bars` (a bool mask).

    Normalised convolution on a copy shrunk so that sigma is 8 px there, then bilinear upsampling:
    the background is smooth at that scale, so nothing is lost and it costs ~1/64 of the full filter.
    """
    rows, cols = data.shape
    sigma = max(rows, cols) / 16.0
    factor = max(1, int(sigma // 8))
    weight = (~bars).astype(np.float64)
    small_data = _block_mean(data * weight, factor)
    small_weight = _block_mean(weight, factor)
    numerator = ndimage.gaussian_filter(small_data, sigma / factor, mode="reflect")
    denominator = ndimage.gaussian_filter(small_weight, sigma / factor, mode="reflect")
    small_background = numerator / np.maximum(denominator, 1e-6)
    if factor == 1:
        return small_background
    # block centres sit at (i + 0.5) * factor - 0.5 in full-resolution pixels
    row_idx = (np.arange(rows) + 0.5) / factor - 0.5
    col_idx = (np.arange(cols) + 0.5) / factor - 0.5
    rr, cc = np.meshgrid(row_idx, col_idx, indexing="ij", sparse=True)
    return ndimage.map_coordinates(small_background, [np.broadcast_to(rr, (rows, cols)),
                                                       np.broadcast_to(cc, (rows, cols))], order=1, mode="nearest")


def threshold_components(image: np.ndarray, min_area_px: int = 4) -> DetectorOutput:
    """Robust-threshold + connected-components detector (see the module docstring)."""
    norm = normalise(image)
    smooth = ndimage.gaussian_filter(norm.residual, 1.0)
    # smoothing lowers the noise by ~1/(2 sqrt(pi) sigma); re-measure it so the threshold stays in noise units
    z = smooth / _robust_noise(smooth[norm.valid])
    objects = (np.abs(z) > THRESHOLD_SIGMA) & norm.valid
    labels, n = ndimage.label(objects, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return DetectorOutput(detections=(), bar_mask=norm.bar_mask)
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(z), labels, index)
    centroids = ndimage.center_of_mass(np.ones_like(z), labels, index)
    strength = ndimage.mean(np.abs(z), labels, index)
    detections = tuple(
        Detection(row_px=float(r), col_px=float(c), area_px=float(a), score=float(s))
        for (r, c), a, s in zip(centroids, areas, strength, strict=True)
        if a >= min_area_px
    )
    return DetectorOutput(detections=tuple(sorted(detections, key=lambda d: -d.score)), bar_mask=norm.bar_mask)


def log_blobs(image: np.ndarray, max_side_px: int = LOG_MAX_SIDE_PX) -> DetectorOutput:
    """scikit-image Laplacian-of-Gaussian blob detector on both polarities (see the module docstring)."""
    from skimage.feature import blob_log

    norm = normalise(image)
    rows, cols = norm.residual.shape
    factor = max(1, math.ceil(max(rows, cols) / max_side_px))
    small = _block_mean(norm.residual, factor)
    small_valid = _block_mean(norm.valid.astype(np.float64), factor) > 0.99
    small = small / _robust_noise(small[small_valid])
    detections: list[Detection] = []
    for polarity in (1.0, -1.0):
        signal = np.maximum(polarity * small, 0.0)
        blobs = blob_log(signal, min_sigma=1.0, max_sigma=16.0, num_sigma=8, threshold=LOG_THRESHOLD_SIGMA / 2.0,
                         overlap=0.5, exclude_border=False)
        for r, c, s in blobs:
            row = (r + 0.5) * factor - 0.5
            col = (c + 0.5) * factor - 0.5
            radius = s * math.sqrt(2.0) * factor
            value = float(signal[int(r), int(c)])
            detections.append(Detection(row_px=float(row), col_px=float(col), area_px=math.pi * radius**2, score=value))
    bars = norm.bar_mask
    kept = [d for d in detections if not bars[min(round(d.row_px), rows - 1), min(round(d.col_px), cols - 1)]]
    return DetectorOutput(detections=tuple(sorted(kept, key=lambda d: -d.score)), bar_mask=None)


def _robust_noise(values: np.ndarray) -> float:
    """Robust standard deviation (1.4826 x median absolute deviation); 1.0 for empty or constant input."""
    if values.size == 0:
        return 1.0
    mad = float(np.median(np.abs(values - np.median(values)))) * 1.4826
    return mad if mad > 0 else 1.0


def _block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    """Block mean by an integer factor (edges padded by reflection)."""
    if factor == 1:
        return data
    rows, cols = data.shape
    pad_r = (-rows) % factor
    pad_c = (-cols) % factor
    padded = np.pad(data, ((0, pad_r), (0, pad_c)), mode="reflect") if pad_r or pad_c else data
    r, c = padded.shape
    return padded.reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
