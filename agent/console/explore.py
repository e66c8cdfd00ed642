"""The explore view's engine: near-instant re-clustering of an image's patches as a person changes k.

The 2018 study's first item of future work. Work is split so that only what changed is recomputed:

1. `ExploreImage`: the image (its dtype kept; isolated hot pixels replaced by their neighbours, see
   `suppress_hot_pixels`) and an 8-bit display copy (robust percentile stretch, longest side at most
   `DISPLAY_MAX_PX`). On first use, the locator's own preparation (`agent.locate.analysis.
   bar_and_black_mask` and `agent.locate.preprocess.prepare_image`: bars, black areas and burned-in
   annotation bands masked; hot pixels and stripes removed; illumination flattened), once per image.
2. `FeatureSet`, cached per (image, patch settings): grid or sliding-window statistics
   (`agent.locate.features`) of the prepared image; patches on the bar mask (grid: >= half their
   pixels; window: the centre pixel) are left out (label `MASKED_LABEL`). The rest are standardised
   (median / robust scale per feature) and reduced by PCA (SVD of a seeded sample) to at most
   `PCA_COMPONENTS` dimensions (float32).
3. `Clustering`, cached per (features, k, seed): k-means (`kmeans_centres`) fitted on a seeded sample of
   at most `KMEANS_SAMPLE` patches, then every patch assigned to its nearest centre, so a change of k
   costs tens of milliseconds even for a quarter of a million windows. Cluster ids are ordered by mean
   grey value (0 = darkest), so colours stay put when k changes. Each cluster's normalised centroid and
   texture contrast are those of `agent.locate.analysis` (same formula), so a cluster marked here is
   stored in label memory exactly as the screening loop would store it.
4. Per request: the crystal cluster (chosen, else suggested), candidates (connected regions of that
   cluster) and an optional similarity map (cosine similarity of every patch to a clicked one).

The page draws the heat map itself from the label grid (one byte per patch) over the display image, so
no large PNG is encoded per change. Suggested crystal cluster: the locator's default rule narrowed to
one cluster (`suggest_crystal_cluster`); polarity-invariant.
"""

from __future__ import annotations

import base64
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from agent.locate.errors import ImageInputError, SettingsError
from agent.locate.features import check_image, grid_edges_px, grid_features, window_features, window_output_shape

logger = logging.getLogger(__name__)

#: Longest side of the display image sent to the page, pixels.
DISPLAY_MAX_PX = 2048
#: PCA dimensions kept for clustering.
PCA_COMPONENTS = 6
#: Patches k-means is fitted on (a seeded random sample of them); all are then assigned.
KMEANS_SAMPLE = 6000
#: Most patches a setting may produce (sliding windows at stride 1 on 4k images are for the batch locator).
MAX_PATCHES = 1_100_000
#: Images kept open, and feature sets / clusterings cached (least recently used dropped).
MAX_IMAGES = 2
MAX_FEATURE_SETS = 6
MAX_CLUSTERINGS = 32
MAX_CANDIDATES = 50
#: A bar / black-area mask covering more than this fraction of the image is not trusted (ignored).
MAX_BAR_FRACTION = 0.75
#: Label of patches on grid bars / black areas (not clustered).
MASKED_LABEL = 255
#: A grid cell with at least this fraction of its pixels on the bar mask is masked (as `analyse` does).
MASKED_FRACTION = 0.5
#: As `agent.locate.analysis`: features whose sign flips with contrast polarity, and texture features.
POLARITY_FEATURES = ("mean", "mode", "skewness")
TEXTURE_FEATURES = ("std", "range", "grad_energy")
#: As `agent.locate.analysis.MIN_TEXTURE_CONTRAST`: below this (background sigmas) a cluster is film.
MIN_TEXTURE_CONTRAST = 8.0
#: Background patches sampled for the per-k suggestion (the label record uses all of them).
BACKGROUND_SAMPLE = 20000


class ExploreError(ValueError):
    """An explore request cannot be served (unknown image, settings that do not fit); says what to change."""


class ExploreSettings(BaseModel):
    """What the page asks for. Grid: `grid_rows` x `grid_cols` cells; window: `window_px` (odd) every
    `stride_px` pixels. `crystal_cluster` None: use the suggestion. `reference_cell`: (row, col) of a
    patch in the label grid to rank every patch by similarity to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["grid", "window"] = "grid"
    grid_rows: int = Field(default=24, ge=2, le=512)
    grid_cols: int = Field(default=24, ge=2, le=512)
    window_px: int = Field(default=31, ge=3, le=1025)
    stride_px: int = Field(default=16, ge=1, le=1024)
    k: int = Field(default=3, ge=2, le=12)
    crystal_cluster: int | None = Field(default=None, ge=0, le=11)
    reference_cell: tuple[int, int] | None = None
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _odd_window(self) -> ExploreSettings:
        if self.mode == "window" and self.window_px % 2 == 0:
            raise ValueError(f"window_px must be odd (centred on a pixel), got {self.window_px}")
        return self

    def feature_key(self) -> tuple[Any, ...]:
        """What the features depend on."""
        if self.mode == "grid":
            return ("grid", self.grid_rows, self.grid_cols)
        return ("window", self.window_px, self.stride_px)


@dataclass
class ExploreImage:
    """An opened image: the data as read, and an 8-bit display copy with its scale (display px / image px)."""

    image_id: str
    name: str
    array: np.ndarray
    display: np.ndarray
    display_scale: float
    pixel_size_um: float | None = None
    prepared: np.ndarray | None = None
    bar_mask: np.ndarray | None = None
    prepare_s: float = 0.0


@dataclass
class FeatureSet:
    """Standardised, PCA-reduced patch features of one image at one patch setting."""

    grid_shape: tuple[int, int]
    valid: np.ndarray
    raw: np.ndarray
    scaled: np.ndarray
    reduced: np.ndarray
    reduced_t: np.ndarray
    centres_px: np.ndarray
    feature_names: tuple[str, ...]
    compute_s: float
    feature_std: np.ndarray | None = None
    valid_raw: np.ndarray | None = None
    texture_raw: np.ndarray | None = None
    clusterings: collections.OrderedDict[tuple[int, int], Clustering] = field(default_factory=collections.OrderedDict)


@dataclass
class Clustering:
    """k-means result: per-patch labels (ordered by mean grey value), centres in reduced space, and what
    the page needs about them (computed once per k: summaries, suggestion, encoded labels, candidates)."""

    labels: np.ndarray
    centres: np.ndarray
    compute_s: float
    normalised: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # texture features only
    summaries: list[dict[str, Any]] = field(default_factory=list)
    suggested: int | None = None
    labels_b64: str = ""
    candidates: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


def display_uint8(image: np.ndarray, max_px: int = DISPLAY_MAX_PX) -> tuple[np.ndarray, float]:
    """8-bit display copy (0.5-99.5 percentile stretch of a block-mean downscale) and its scale factor."""
    factor = max(1, int(np.ceil(max(image.shape) / max_px)))
    data = np.asarray(image)
    if factor > 1:
        rows, cols = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
        data = data[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
    data = data.astype(np.float32)
    sample = data[:: max(1, data.shape[0] // 512), :: max(1, data.shape[1] // 512)]
    low, high = np.percentile(sample, (0.5, 99.5))
    scaled = (data - low) * (255.0 / max(float(high - low), 1e-6))
    return np.clip(scaled, 0, 255).astype(np.uint8), 1.0 / factor


def suppress_hot_pixels(image: np.ndarray, threshold_sigma: float = 8.0) -> tuple[np.ndarray, int]:
    """Replace isolated hot pixels (brighter than all 8 neighbours by > `threshold_sigma` x the pixel noise)
    by their neighbours' maximum; returns the cleaned image (same dtype; the input when none) and the count.

    The noise is estimated robustly from differences of horizontally adjacent pixels. Single-pixel
    readout spikes otherwise dominate the range / kurtosis of their patch and form a "cluster" of their own.
    """
    data = np.asarray(image)
    if min(data.shape) < 3:
        return image, 0
    values = data.astype(np.float32)
    padded = np.pad(values, 1, mode="edge")
    row_max = np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    ring = np.maximum(np.maximum(row_max[:-2], row_max[2:]), np.maximum(padded[1:-1, :-2], padded[1:-1, 2:]))
    sample = values[:: max(1, values.shape[0] // 256)]
    noise = 1.4826 * float(np.median(np.abs(np.diff(sample, axis=1)))) / np.sqrt(2.0)
    hot = values - ring > threshold_sigma * max(noise, 1e-6)
    count = int(hot.sum())
    if not count:
        return image, 0
    cleaned = data.copy()
    cleaned[hot] = ring[hot].astype(data.dtype)
    return cleaned, count


def _robust_standardise(features: np.ndarray) -> np.ndarray:
    centre = np.median(features, axis=0)
    spread = 1.4826 * np.median(np.abs(features - centre), axis=0)
    fallback = features.std(axis=0)
    spread = np.where(spread > 1e-12, spread, np.where(fallback > 1e-12, fallback, 1.0))
    return np.clip((features - centre) / spread, -50.0, 50.0)


def kmeans_centres(points: np.ndarray, k: int, seed: int, n_init: int = 2, max_iter: int = 40) -> np.ndarray:
    """k-means centres of `points` (n, d): k-means++ seeding, then Lloyd iterations; the best of `n_init`
    seeded runs (lowest inertia). float32 (k, d).

    Plain numpy on purpose: on the few thousand points sampled here scikit-learn's `KMeans` spends most
    of its time in per-call overhead (10x slower), and importing scikit-learn costs seconds, which the
    first change in an interactive view should not pay.
    """
    data = np.asarray(points, dtype=np.float64)
    squared = np.einsum("ij,ij->i", data, data)
    tolerance = 1e-4 * float(np.mean(np.var(data, axis=0))) + 1e-12
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(n_init):
        centres = _kmeans_plusplus(data, squared, k, rng)
        for _ in range(max_iter):
            distance = squared[:, None] - 2.0 * data @ centres.T + np.einsum("ij,ij->i", centres, centres)[None, :]
            labels = np.argmin(distance, axis=1)
            counts = np.bincount(labels, minlength=k).astype(np.float64)
            sums = np.stack([np.bincount(labels, weights=data[:, j], minlength=k) for j in range(data.shape[1])], 1)
            moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], centres)
            shift = float(np.max(np.sum((moved - centres) ** 2, axis=1)))
            centres = moved
            if shift <= tolerance:
                break
        distance = squared[:, None] - 2.0 * data @ centres.T + np.einsum("ij,ij->i", centres, centres)[None, :]
        inertia = float(np.min(distance, axis=1).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres)
    assert best is not None
    return best[1].astype(np.float32)


def _kmeans_plusplus(data: np.ndarray, squared: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    centres = np.empty((k, data.shape[1]), dtype=np.float64)
    centres[0] = data[rng.integers(data.shape[0])]
    closest = np.maximum(squared - 2.0 * data @ centres[0] + centres[0] @ centres[0], 0.0)
    for i in range(1, k):
        total = float(closest.sum())
        index = int(rng.choice(data.shape[0], p=closest / total)) if total > 0 else int(rng.integers(data.shape[0]))
        centres[i] = data[index]
        closest = np.minimum(closest, np.maximum(squared - 2.0 * data @ centres[i] + centres[i] @ centres[i], 0.0))
    return centres


def _pca_basis(sample: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the first `n_components` principal axes (rows) of `sample`, by SVD (numpy)."""
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    return mean, vt[:n_components]


def _nearest_centre(points_t: np.ndarray, centres: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Index of the nearest centre for every point; `points_t` is (d, n) (points as columns, contiguous),
    so the distance matrix is (k, n) and the arg-min runs along contiguous memory."""
    labels = np.empty(points_t.shape[1], dtype=np.int32)
    centres = np.asarray(centres, dtype=np.float32)
    centre_sq = np.einsum("ij,ij->i", centres, centres)[:, None]
    for start in range(0, points_t.shape[1], chunk):
        distance = centres @ points_t[:, start : start + chunk]
        distance *= -2.0
        distance += centre_sq
        labels[start : start + chunk] = np.argmin(distance, axis=0)
    return labels


class ExploreEngine:
    """Opens images and answers explore requests with caching (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._images: collections.OrderedDict[str, ExploreImage] = collections.OrderedDict()
        self._features: collections.OrderedDict[tuple[Any, ...], FeatureSet] = collections.OrderedDict()
        self._computing: dict[tuple[Any, ...], threading.Lock] = {}

    # -- images -------------------------------------------------------------------------------------

    def open(self, array: np.ndarray, name: str, pixel_size_um: float | None = None) -> ExploreImage:
        """Open an image (any 2-D grayscale array); returns it with its id. ExploreError for bad images."""
        try:
            check_image(array)
        except ImageInputError as exc:
            raise ExploreError(str(exc)) from exc
        if min(array.shape) < 16:
            raise ExploreError(f"image of {array.shape[0]}x{array.shape[1]} px is too small to explore (>= 16 px)")
        array, hot = suppress_hot_pixels(array)
        if hot:
            logger.info("explore: %s: %d hot pixels replaced by their neighbours", name, hot)
        display, scale = display_uint8(array)
        image = ExploreImage(uuid.uuid4().hex[:12], name[:200], array, display, scale, pixel_size_um)
        with self._lock:
            self._images[image.image_id] = image
            while len(self._images) > MAX_IMAGES:
                old_id, _ = self._images.popitem(last=False)
                for key in [k for k in self._features if k[0] == old_id]:
                    del self._features[key]
        return image

    def image(self, image_id: str) -> ExploreImage:
        """An opened image; ExploreError if unknown (or dropped from the cache)."""
        with self._lock:
            image = self._images.get(image_id)
            if image is None:
                raise ExploreError(f"no open image {image_id!r}; open it again")
            self._images.move_to_end(image_id)
            return image

    # -- features and clusters ----------------------------------------------------------------------

    def features(self, image_id: str, settings: ExploreSettings) -> tuple[FeatureSet, bool]:
        """The feature set of an image at a patch setting, and whether it came from the cache."""
        image = self.image(image_id)
        key = (image_id, *settings.feature_key())
        with self._lock:
            cached = self._features.get(key)
            if cached is not None:
                self._features.move_to_end(key)
                return cached, True
            guard = self._computing.setdefault(key, threading.Lock())
        with guard:  # one computation per key even if the page sends several requests
            with self._lock:
                cached = self._features.get(key)
                if cached is not None:
                    return cached, True
            try:
                feature_set = self._compute_features(image, settings)
            finally:
                with self._lock:
                    self._computing.pop(key, None)
            with self._lock:
                self._features[key] = feature_set
                while len(self._features) > MAX_FEATURE_SETS:
                    self._features.popitem(last=False)
        return feature_set, False

    def _prepare(self, image: ExploreImage) -> None:
        """The locator's own preparation, once per image: bar / black-area / annotation mask
        (`bar_and_black_mask`, filter "auto") and the cleaned, illumination-flattened float64 copy
        (`prepare_image`), so that features and normalised centroids are those `analyse` computes."""
        from agent.locate.analysis import LocateSettings, bar_and_black_mask
        from agent.locate.preprocess import prepare_image

        with self._lock:
            guard = self._computing.setdefault(("prepare", image.image_id), threading.Lock())
        with guard:
            if image.prepared is not None:
                return
            start = time.perf_counter()
            mask, _ = bar_and_black_mask(image.array, LocateSettings())
            if mask.mean() > MAX_BAR_FRACTION:
                # grid bars never cover most of an image worth exploring: a film darker than a few bright
                # objects can be taken for a "black area"; explore it unmasked rather than not at all
                logger.warning("explore: %s: the bar / black-area filter masked %.0f %% of the image; ignoring it",
                               image.name, 100.0 * float(mask.mean()))
                mask = np.zeros_like(mask)
            image.prepared = prepare_image(image.array, mask, flatten=True, clean=True)
            image.bar_mask = mask
            image.prepare_s = time.perf_counter() - start
            logger.info("explore: %s prepared in %.2f s (%.1f %% masked as bars / black areas)", image.name,
                        image.prepare_s, 100.0 * float(mask.mean()))

    def _compute_features(self, image: ExploreImage, settings: ExploreSettings) -> FeatureSet:
        start = time.perf_counter()
        self._prepare(image)
        assert image.prepared is not None and image.bar_mask is not None
        data, mask = image.prepared, image.bar_mask
        rows_px, cols_px = data.shape
        try:
            if settings.mode == "grid":
                grid = (settings.grid_rows, settings.grid_cols)
                raw, names = grid_features(data, *grid)
                edges_r, edges_c = grid_edges_px(rows_px, grid[0]), grid_edges_px(cols_px, grid[1])
                centre_r = (edges_r[:-1] + edges_r[1:] - 1) / 2.0
                centre_c = (edges_c[:-1] + edges_c[1:] - 1) / 2.0
                sums = np.add.reduceat(np.add.reduceat(mask.astype(np.int64), edges_r[:-1], axis=0), edges_c[:-1],
                                       axis=1)
                masked_fraction = (sums / np.outer(np.diff(edges_r), np.diff(edges_c))).ravel()
            else:
                grid = window_output_shape(data.shape, settings.stride_px)
                if grid[0] * grid[1] > MAX_PATCHES:
                    raise ExploreError(
                        f"{grid[0] * grid[1]} windows is too many for the explore view (max {MAX_PATCHES}); "
                        f"use a stride of at least {int(np.ceil(np.sqrt(rows_px * cols_px / MAX_PATCHES)))} px"
                    )
                cube, names = window_features(data, settings.window_px, settings.stride_px)
                raw = cube.reshape(-1, cube.shape[-1])
                centre_r = np.arange(grid[0], dtype=np.float64) * settings.stride_px
                centre_c = np.arange(grid[1], dtype=np.float64) * settings.stride_px
                masked_fraction = mask[:: settings.stride_px, :: settings.stride_px].astype(np.float64).ravel()
        except SettingsError as exc:
            raise ExploreError(str(exc)) from exc
        valid = masked_fraction < MASKED_FRACTION
        if not valid.any():
            raise ExploreError("every patch lies on grid bars or black areas; open another image or area")
        valid_raw = raw[valid]
        scaled = _robust_standardise(valid_raw)
        n_components = min(PCA_COMPONENTS, scaled.shape[1], max(1, scaled.shape[0] - 1))
        rng = np.random.default_rng(settings.seed)
        sample = scaled if scaled.shape[0] <= KMEANS_SAMPLE else scaled[rng.choice(scaled.shape[0], KMEANS_SAMPLE,
                                                                                    replace=False)]
        mean, axes = _pca_basis(sample, n_components)
        reduced = ((scaled - mean) @ axes.T).astype(np.float32)
        cc, rr = np.meshgrid(centre_c, centre_r)
        centres = np.stack([cc.ravel(), rr.ravel()], axis=1)
        elapsed = time.perf_counter() - start
        logger.info("explore: features %s of %s in %.2f s", settings.feature_key(), image.name, elapsed)
        return FeatureSet((int(grid[0]), int(grid[1])), valid, raw, scaled.astype(np.float32), reduced,
                          np.ascontiguousarray(reduced.T), centres, tuple(names), elapsed,
                          feature_std=np.std(valid_raw, axis=0), valid_raw=valid_raw,
                          texture_raw=np.asfortranarray(valid_raw[:, [names.index(n) for n in TEXTURE_FEATURES]]))

    def clustering(self, feature_set: FeatureSet, k: int, seed: int) -> tuple[Clustering, bool]:
        """k-means of a feature set's unmasked patches (cached per k and seed) and whether it was cached."""
        key = (k, seed)
        with self._lock:
            cached = feature_set.clusterings.get(key)
            if cached is not None:
                feature_set.clusterings.move_to_end(key)
                return cached, True
        start = time.perf_counter()
        points = feature_set.reduced
        if k > points.shape[0]:
            raise ExploreError(f"k={k} is more than the {points.shape[0]} unmasked patches; use fewer clusters "
                               "or more patches")
        rng = np.random.default_rng(seed)
        sample = points if points.shape[0] <= KMEANS_SAMPLE else points[rng.choice(points.shape[0], KMEANS_SAMPLE,
                                                                                   replace=False)]
        centres = kmeans_centres(sample, k, seed)
        labels = _nearest_centre(feature_set.reduced_t, centres)
        # order clusters by mean grey value so that colours are stable when k changes
        assert feature_set.valid_raw is not None and feature_set.texture_raw is not None
        valid_raw = feature_set.valid_raw
        mean_index = feature_set.feature_names.index("mean") if "mean" in feature_set.feature_names else 0
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=valid_raw[:, mean_index], minlength=k)
        order = np.argsort(sums / np.maximum(counts, 1))
        remap = np.empty(k, dtype=np.int32)
        remap[order] = np.arange(k, dtype=np.int32)
        ordered_valid = remap[labels].astype(np.uint8)
        full = np.full(feature_set.valid.size, MASKED_LABEL, dtype=np.uint8)
        full[feature_set.valid] = ordered_valid
        result = Clustering(full, centres[order], 0.0)
        members = np.argsort(ordered_valid, kind="stable")
        texture_std = None if feature_set.feature_std is None else feature_set.feature_std[
            [feature_set.feature_names.index(n) for n in TEXTURE_FEATURES]]
        result.normalised = normalised_centroids(feature_set.texture_raw, ordered_valid, k, TEXTURE_FEATURES, members,
                                                 sample_seed=seed, feature_std=texture_std)
        texture = texture_contrast(result.normalised, TEXTURE_FEATURES)
        valid_index = np.flatnonzero(feature_set.valid)
        result.summaries = _cluster_summaries(feature_set, ordered_valid, k, mean_index, valid_index[members], texture)
        result.suggested = suggest_crystal_cluster(np.bincount(ordered_valid, minlength=k), texture)
        result.labels_b64 = base64.b64encode(full.tobytes()).decode("ascii")
        result.compute_s = time.perf_counter() - start
        with self._lock:
            feature_set.clusterings[key] = result
            while len(feature_set.clusterings) > MAX_CLUSTERINGS:
                feature_set.clusterings.popitem(last=False)
        return result, False

    # -- one request --------------------------------------------------------------------------------

    def analyse(self, image_id: str, settings: ExploreSettings) -> dict[str, Any]:
        """Everything the page draws for `settings`, JSON-ready (labels as base64 bytes, row-major)."""
        start = time.perf_counter()
        feature_set, features_cached = self.features(image_id, settings)
        clustering, clusters_cached = self.clustering(feature_set, settings.k, settings.seed)
        rows, cols = feature_set.grid_shape
        suggested = clustering.suggested
        crystal = settings.crystal_cluster if settings.crystal_cluster is not None else suggested
        if crystal is not None and crystal >= settings.k:
            raise ExploreError(f"crystal_cluster {crystal} does not exist with k={settings.k} (0..{settings.k - 1})")
        image = self.image(image_id)
        similarity = None
        if settings.reference_cell is not None:
            similarity = self.similarity(feature_set, settings.reference_cell)
        candidates: list[dict[str, Any]] = []
        if crystal is not None:
            with self._lock:
                cached_candidates = clustering.candidates.get(crystal)
            if cached_candidates is None:
                cached_candidates = find_regions(clustering.labels.reshape(rows, cols), crystal, feature_set.centres_px)
                with self._lock:
                    clustering.candidates[crystal] = cached_candidates
            candidates = cached_candidates
        return {
            "image_id": image_id,
            "image_shape": [int(image.array.shape[0]), int(image.array.shape[1])],
            "grid": [rows, cols],
            "settings_mode": settings.mode,
            "window_px": settings.window_px,
            "stride_px": settings.stride_px,
            "k": settings.k,
            "masked_fraction": round(float(1.0 - feature_set.valid.mean()), 4),
            "labels_b64": clustering.labels_b64,
            "similarity_b64": None if similarity is None else base64.b64encode(similarity.tobytes()).decode("ascii"),
            "clusters": clustering.summaries,
            "suggested_cluster": suggested,
            "crystal_cluster": crystal,
            "candidates": candidates,
            "features_cached": features_cached,
            "clusters_cached": clusters_cached,
            "timing_ms": {
                "features": round(1000 * (0.0 if features_cached else feature_set.compute_s), 1),
                "clusters": round(1000 * (0.0 if clusters_cached else clustering.compute_s), 1),
                "total": round(1000 * (time.perf_counter() - start), 1),
            },
        }

    def similarity(self, feature_set: FeatureSet, cell: tuple[int, int]) -> np.ndarray:
        """Cosine similarity of every patch to the patch at `cell` (row, col), as uint8 (0..255 for 0..1;
        0 on masked patches)."""
        rows, cols = feature_set.grid_shape
        row, col = cell
        if not (0 <= row < rows and 0 <= col < cols):
            raise ExploreError(f"reference cell {cell} outside the {rows}x{cols} patch grid")
        index = row * cols + col
        if not feature_set.valid[index]:
            raise ExploreError(f"patch {cell} lies on a grid bar or black area; pick another one")
        vectors = feature_set.scaled
        reference = vectors[int(np.count_nonzero(feature_set.valid[:index]))]
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(reference)), 1e-9)
        cosine = (vectors @ reference) / np.maximum(norms, 1e-9)
        out = np.zeros(feature_set.valid.size, dtype=np.uint8)
        out[feature_set.valid] = np.clip(cosine * 255.0, 0, 255).astype(np.uint8)
        return out

    def cluster_vector(self, image_id: str, settings: ExploreSettings, cluster_id: int) -> tuple[
            tuple[float, ...], tuple[str, ...]]:
        """The cluster's normalised centroid, as `agent.locate.analysis` defines it (for label memory):
        per feature (cluster mean - background median) / background robust spread, the background being
        the largest cluster, polarity-dependent features as absolute values; all background patches used."""
        feature_set, _ = self.features(image_id, settings)
        clustering, _ = self.clustering(feature_set, settings.k, settings.seed)
        labels = clustering.labels[feature_set.valid]
        if not 0 <= cluster_id < settings.k or not np.any(labels == cluster_id):
            raise ExploreError(f"cluster {cluster_id} is empty or does not exist with k={settings.k}")
        vectors = normalised_centroids(feature_set.raw[feature_set.valid], labels, settings.k,
                                       feature_set.feature_names, np.argsort(labels, kind="stable"), sample_seed=None,
                                       feature_std=feature_set.feature_std)
        return tuple(float(v) for v in vectors[cluster_id]), feature_set.feature_names


def normalised_centroids(
    valid_raw: np.ndarray, labels: np.ndarray, k: int, feature_names: tuple[str, ...], order: np.ndarray,
    sample_seed: int | None = 0, columns: tuple[str, ...] | None = None, feature_std: np.ndarray | None = None,
) -> np.ndarray:
    """(k, F) normalised centroids exactly as `agent.locate.analysis.analyse` defines them (module docstring
    there): background = largest cluster; (cluster mean - background median) / max(1.4826 * background
    MAD, 1e-6 * scale); |.| for polarity features. `sample_seed`: estimate the background median / MAD
    on at most `BACKGROUND_SAMPLE` patches (None: all of them). `columns`: only these features (the
    result then has len(columns) columns). `feature_std`: per-feature std over all rows, if known."""
    if columns is not None:
        index = [feature_names.index(n) for n in columns]
        valid_raw = valid_raw[:, index]
        feature_std = None if feature_std is None else feature_std[index]
        feature_names = tuple(columns)
    counts = np.bincount(labels, minlength=k)
    background = int(np.argmax(counts))
    starts = np.concatenate([[0], np.cumsum(counts)])
    bg_members = order[starts[background] : starts[background + 1]]
    if sample_seed is not None and bg_members.size > BACKGROUND_SAMPLE:
        bg_members = np.random.default_rng(sample_seed).choice(bg_members, BACKGROUND_SAMPLE, replace=False)
    bg_rows = valid_raw[bg_members]
    bg_median = np.median(bg_rows, axis=0)
    bg_spread = 1.4826 * np.median(np.abs(bg_rows - bg_median), axis=0)
    scale = np.maximum(np.abs(bg_median), np.std(valid_raw, axis=0) if feature_std is None else feature_std)
    bg_spread = np.maximum(bg_spread, 1e-6 * np.where(scale > 0, scale, 1.0))
    present = counts > 0
    sums = np.stack([np.bincount(labels, weights=valid_raw[:, j], minlength=k) for j in range(valid_raw.shape[1])],
                    axis=1)
    means = sums / np.maximum(counts, 1)[:, None]
    normalised = (means - bg_median) / bg_spread
    normalised[~present] = 0.0
    polarity = [feature_names.index(n) for n in POLARITY_FEATURES if n in feature_names]
    normalised[:, polarity] = np.abs(normalised[:, polarity])
    return normalised


def texture_contrast(normalised: np.ndarray, feature_names: tuple[str, ...]) -> np.ndarray:
    """(k,) norm of the normalised texture features (std, range, grad_energy), as the locator's rule;
    `normalised` has the columns named by `feature_names`."""
    columns = [feature_names.index(n) for n in TEXTURE_FEATURES if n in feature_names]
    return np.linalg.norm(normalised[:, columns], axis=1)


def _cluster_summaries(feature_set: FeatureSet, labels: np.ndarray, k: int, mean_index: int,
                       members: np.ndarray, texture: np.ndarray) -> list[dict[str, Any]]:
    """Per cluster: size, fraction of unmasked patches, mean grey value, texture contrast and up to 6
    example cells (row, col). `labels` are the unmasked patches' labels; `members` the patch indices
    (in the full grid) sorted by label."""
    cols = feature_set.grid_shape[1]
    counts = np.bincount(labels, minlength=k)
    valid_raw_mean = feature_set.raw[feature_set.valid, mean_index] if feature_set.valid_raw is None \
        else feature_set.valid_raw[:, mean_index]
    mean_grey = np.bincount(labels, weights=valid_raw_mean, minlength=k) / np.maximum(counts, 1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    summaries = []
    for cluster_id in range(k):
        cells = members[starts[cluster_id] : starts[cluster_id + 1]]
        pick = cells[np.linspace(0, len(cells) - 1, min(6, len(cells))).astype(int)] if len(cells) else []
        summaries.append({
            "cluster_id": cluster_id,
            "n_cells": int(counts[cluster_id]),
            "fraction": round(float(counts[cluster_id]) / max(1, len(labels)), 4),
            "mean_grey": float(mean_grey[cluster_id]) if counts[cluster_id] else None,
            "texture_contrast": round(float(texture[cluster_id]), 2),
            "example_cells": [[int(i // cols), int(i % cols)] for i in pick],
        })
    return summaries


def suggest_crystal_cluster(counts: np.ndarray, texture: np.ndarray) -> int | None:
    """The locator's default rule (`agent.locate.analysis.SUGGESTION_RULE`), narrowed to one cluster:
    among clusters other than the background (largest) covering at most half of the unmasked patches,
    those with texture contrast >= `MIN_TEXTURE_CONTRAST`; the most textured of them, or None."""
    total = int(np.sum(counts))
    background = int(np.argmax(counts))
    choices = [c for c in range(len(counts)) if c != background and 0 < counts[c] <= 0.5 * total
               and texture[c] >= MIN_TEXTURE_CONTRAST]
    return max(choices, key=lambda c: float(texture[c])) if choices else None


def find_regions(label_grid: np.ndarray, cluster_id: int, centres_px: np.ndarray) -> list[dict[str, Any]]:
    """Connected regions of one cluster on the patch grid -> centroids in image pixels, largest first."""
    mask = label_grid == cluster_id
    regions, count = ndimage.label(mask)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = np.asarray(ndimage.sum_labels(mask, regions, index))
    keep = index[np.argsort(-sizes, kind="stable")[:MAX_CANDIDATES]]
    rows, cols = label_grid.shape
    grid_centres = centres_px.reshape(rows, cols, 2)
    row_centres, col_centres = grid_centres[:, 0, 1], grid_centres[0, :, 0]
    found = []
    for region, (row, col) in zip(keep, ndimage.center_of_mass(mask, regions, keep), strict=True):
        found.append({
            "col_px": round(float(np.interp(col, np.arange(cols), col_centres)), 1),
            "row_px": round(float(np.interp(row, np.arange(rows), row_centres)), 1),
            "cells": int(sizes[region - 1]),
            "cell": [round(float(row)), round(float(col))],
        })
    return found
