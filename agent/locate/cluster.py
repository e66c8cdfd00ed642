"""Clustering of patch features and the grid-bar / black-area filters.

Clustering (`fit_clusters`, `ClusterModel.predict`): features -> outlier cap -> StandardScaler -> PCA (components
explaining 99 % of the variance, at least 2) -> k-means (default; seeded, fitted on a random sample of at
most `sample_size` points (20 000 by default), every point labelled) or agglomerative (Ward, on a sample of at most 4000
points, every point then assigned to the nearest cluster centroid). Cluster ids are renumbered by
decreasing size, so cluster 0 is the most common kind of patch. Scaler, PCA and k-means are numpy copies of
scikit-learn's arithmetic (`standard_scale`, `principal_components`, `kmeans`: the same clusters, without
the second it takes to import scikit-learn); the agglomerative method, `suggest_k` and
`two_step_black_cells` still import it.

Outlier cap (`outlier_cap_sigma`, default 10; None switches it off): before scaling, every feature is
clipped to its sample median +- `outlier_cap_sigma` robust sigmas (1.4826 x MAD). Without it, a few very
strong objects (ice balls, bar edges, thick debris) inflate each feature's standard deviation, k-means
spends its clusters on how strong they are, and faint crystals (a few % contrast) fall into the
background cluster. With it, a cell that is 10 sigmas out on a feature counts as "out" on that feature
and k-means separates cells by *which* features stand out. The cap is one `np.clip` per chunk.

Choosing k (`suggest_k`): silhouette score on a seeded sample for k = 2..6; the k with the highest score
is a *suggestion*. The 2018 study found silhouette unreliable for this data, so k=3 stays the default and a
k set by the user always wins.

Bars and black areas (grid bars block the beam in bright and in dark field, so they are dark in both):
- `two_step_black_cells`: the study's two-step method on cells. First pass: k-means with k=3 on the
  intensity features (mean, mode, min-like and range); the darkest cluster is "black" and a cluster
  whose cells reach down to the black level is "partly black", provided the darkest cluster is clearly
  separated from the brightest (see the function). The second pass (in `analysis`) clusters the rest.
- `large_dark_mask`: pixels in a dark class (Otsu threshold on a block-averaged image, accepted only
  when the two classes are well separated) that survive a morphological opening wider than crystals.
- `mesh_mask`: the geometric detector. Projection profiles of the dark-pixel map along every direction
  (0.5 degree steps, refined to 0.1) find straight dark bands (grid bars) as lines that are mostly dark
  along their whole length; bars of the perpendicular direction are found the same way. Returns a pixel
  mask of the bands and the detected angle; nothing when no band is found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from agent.locate.bitmask import block_any
from agent.locate.errors import SettingsError
from agent.locate.preprocess import block_mean, grow_mask

logger = logging.getLogger(__name__)

ClusterMethod = Literal["kmeans", "agglomerative"]

#: Robust sigmas beyond which a feature value is capped before clustering (see the module docstring).
OUTLIER_CAP_SIGMA = 10.0

#: Largest sample for agglomerative clustering (memory grows with the square of it).
AGGLOMERATIVE_SAMPLE = 4000


@dataclass(frozen=True)
class ClusterModel:
    """A fitted scaler + PCA + cluster centroids; labels any feature array of the same columns.

    `centroids_pca` are in PCA space (after scaling); cluster ids are 0..k-1 by decreasing size on the
    fitting sample.
    """

    scale_mean: np.ndarray
    scale_std: np.ndarray
    components: np.ndarray  # (n_components, F)
    centroids_pca: np.ndarray  # (k, n_components)
    method: str
    seed: int
    clip_low: np.ndarray | None = None  # (F,) features are clipped to [clip_low, clip_high] first
    clip_high: np.ndarray | None = None

    def capped(self, features: np.ndarray) -> np.ndarray:
        """`features` as float64 with the outlier cap applied (a copy only when capping)."""
        features = np.asarray(features, dtype=np.float64)
        if self.clip_low is None or self.clip_high is None:
            return features
        return np.clip(features, self.clip_low, self.clip_high)

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids_pca.shape[0])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Scaled, PCA-projected features (n, n_components) float64."""
        projection = (self.components / self.scale_std[None, :]).T  # (F, n_components)
        offset = (self.scale_mean / self.scale_std) @ self.components.T
        return self.capped(features) @ projection - offset

    def _blocks(
        self, features: np.ndarray, chunk: int, starts: Sequence[int] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 block of capped features) over `features` in chunks of `chunk` rows (only
        the chunks beginning at `starts`, when given).

        Labelling millions of windows is bandwidth-bound: one float32 buffer, reused, holds each chunk
        with the cap applied in place (float32 keeps ~7 significant digits, far more than the features'
        noise, and halves the memory traffic of the clip and the product).
        """
        shape = (min(chunk, features.shape[0]), features.shape[1])
        buffer = np.empty(shape, dtype=np.float32)
        low = high = None
        if self.clip_low is not None and self.clip_high is not None:
            # bounds tiled to the block's shape: element-wise min/max on equal shapes vectorise, while
            # np.clip with per-column bounds broadcast along 9-wide rows runs ~8x slower
            low = np.ascontiguousarray(np.broadcast_to(self.clip_low.astype(np.float32), shape))
            high = np.ascontiguousarray(np.broadcast_to(self.clip_high.astype(np.float32), shape))
        for start in range(0, features.shape[0], chunk) if starts is None else starts:
            rows = min(chunk, features.shape[0] - start)
            block = buffer[:rows]
            np.copyto(block, features[start : start + chunk], casting="unsafe")
            if low is not None and high is not None:
                np.minimum(block, high[:rows], out=block)
                np.maximum(block, low[:rows], out=block)
            yield start, block

    def _each_block(self, features: np.ndarray, chunk: int, work: Callable[[int, np.ndarray], None]) -> None:
        """`work(start, block)` for every block of `_blocks`; the chunks (the same ones, so the same
        arithmetic per row) are shared out over `parallel.thread_count()` threads, each with its own buffer."""
        from agent.locate.parallel import run_parallel, thread_count

        starts = range(0, features.shape[0], chunk)
        n_threads = min(len(starts), thread_count())

        def run(part: Sequence[int]) -> None:
            for start, block in self._blocks(features, chunk, part):
                work(start, block)

        run_parallel([lambda part=starts[i::n_threads]: run(part) for i in range(n_threads)])

    def predict(self, features: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """Nearest-centroid cluster id of every row of `features` (n, F), int32; chunked for large n."""
        from threadpoolctl import threadpool_limits

        features = np.asarray(features)
        labels = np.empty(features.shape[0], dtype=np.int32)
        # argmin ||z - c||^2 = argmin (||c||^2 - 2 z.c) with z = x @ P - o, folded into one product:
        # x @ (P @ C^T) - o @ C^T  (one thin matrix product per chunk, no z array)
        projection = (self.components / self.scale_std[None, :]).T  # (F, n_components)
        offset = (self.scale_mean / self.scale_std) @ self.components.T
        weights = (projection @ self.centroids_pca.T).astype(np.float32)  # (F, k)
        bias = (np.sum(self.centroids_pca**2, axis=1) + 2.0 * (offset @ self.centroids_pca.T)).astype(np.float32)

        def label(start: int, block: np.ndarray) -> None:
            labels[start : start + block.shape[0]] = np.argmin(bias[None, :] - 2.0 * (block @ weights), axis=1)

        # thin matrix products: one BLAS thread per chunk, the chunks on threads of their own
        with threadpool_limits(1, user_api="blas"):
            self._each_block(features, chunk, label)
        return labels

    def distance_to(self, features: np.ndarray, cluster_id: int, chunk: int = 1 << 16) -> np.ndarray:
        """Euclidean distance in scaled PCA space from each row of `features` to a cluster centroid
        (float64 out, float32 arithmetic, chunked for large inputs)."""
        from threadpoolctl import threadpool_limits

        features = np.asarray(features)
        out = np.empty(features.shape[0], dtype=np.float64)
        projection = ((self.components / self.scale_std[None, :]).T).astype(np.float32)
        offset = (self.scale_mean / self.scale_std) @ self.components.T + self.centroids_pca[cluster_id]
        offset32 = offset.astype(np.float32)[None, :]

        def distance(start: int, block: np.ndarray) -> None:
            z = block @ projection - offset32
            out[start : start + block.shape[0]] = np.sqrt(np.einsum("ij,ij->i", z, z))

        with threadpool_limits(1, user_api="blas"):
            self._each_block(features, chunk, distance)
        return out


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


def fit_clusters(
    features: np.ndarray,
    k: int,
    method: ClusterMethod = "kmeans",
    seed: int = 0,
    sample_size: int = 20_000,
    outlier_cap_sigma: float | None = OUTLIER_CAP_SIGMA,
) -> ClusterModel:
    """Fit outlier cap + scaler + PCA + `method` with `k` clusters on (a seeded sample of) `features` (n, F).

    Raises `SettingsError` if k < 1, k exceeds the number of distinct feature rows, or the method is
    unknown.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise SettingsError(f"features must be a non-empty (n, F) array, got shape {features.shape}")
    n = features.shape[0]
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise SettingsError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k > n:
        raise SettingsError(f"k={k} is larger than the number of patches ({n}); use a smaller k or a finer grid")
    if method not in ("kmeans", "agglomerative"):
        raise SettingsError(f"unknown clustering method {method!r}; use 'kmeans' or 'agglomerative'")
    limit = AGGLOMERATIVE_SAMPLE if method == "agglomerative" else sample_size
    sample = np.asarray(features[_sample_rows(n, limit, seed)], dtype=np.float64)
    n_distinct = len(np.unique(np.round(sample[:5000], 12), axis=0))
    if n_distinct < k and sample.shape[0] > 5000:
        n_distinct = len(np.unique(np.round(sample, 12), axis=0))
    if k > n_distinct:
        raise SettingsError(
            f"k={k} but the patches have only {n_distinct} distinct feature vectors; use k <= {n_distinct}"
        )
    clip_low = clip_high = None
    if outlier_cap_sigma is not None:
        clip_low, clip_high = outlier_bounds(sample, outlier_cap_sigma)
        sample = np.clip(sample, clip_low, clip_high)
    scaler_mean, scaler_scale = standard_scale(sample)
    std = np.where(scaler_scale > 0, scaler_scale, 1.0)
    scaled = (sample - scaler_mean) / std
    n_features = scaled.shape[1]
    pca_mean, pca_components, explained_ratio = principal_components(scaled)
    cumulative = np.cumsum(explained_ratio)
    n_comp = int(np.searchsorted(cumulative, 0.99) + 1) if np.all(np.isfinite(cumulative)) else n_features
    n_comp = max(min(2, pca_components.shape[0]), min(n_comp, pca_components.shape[0]))
    components = pca_components[:n_comp]
    z = (scaled - pca_mean) @ components.T
    # fold the PCA mean into the scaler mean so that transform() is one affine map
    scale_mean = scaler_mean + pca_mean * std
    if method == "kmeans":
        centroids, labels = kmeans(z, k, seed=seed, n_init=3, max_iter=100)
    else:
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
        centroids = np.stack([z[labels == c].mean(axis=0) for c in range(k)])
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    return ClusterModel(
        scale_mean=scale_mean,
        scale_std=std,
        components=components,
        centroids_pca=centroids[order],
        method=method,
        seed=seed,
        clip_low=clip_low,
        clip_high=clip_high,
    )


# --------------------------------------------------------------------------------------------------
# Scaler, PCA and k-means in numpy
# --------------------------------------------------------------------------------------------------
# The same arithmetic as scikit-learn's StandardScaler, PCA (solvers "covariance_eigh" / "full") and KMeans
# (k-means++, Lloyd, n_init restarts), so the clusters are the same up to float rounding; importing
# scikit-learn took 0.8-1 s, a tenth of a whole `locate` run on a 4096^2 image, for a fit of 0.05 s.


def standard_scale(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation of `sample` (n, F) (population, two-pass corrected), the
    deviation set to 1 for columns indistinguishable from a constant (as StandardScaler does)."""
    n = sample.shape[0]
    mean = sample.sum(axis=0) / n
    centred = sample - mean
    correction = centred.sum(axis=0)
    variance = ((centred**2).sum(axis=0) - correction**2 / n) / n
    eps = np.finfo(np.float64).eps
    constant = variance <= n * eps * variance + (n * mean * eps) ** 2
    scale = np.sqrt(variance)
    scale[constant] = 1.0
    return mean, scale


def principal_components(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of `data` (n, F) with all min(n, F) components: the column means, the components (rows, unit
    vectors, by decreasing variance; each row's largest entry positive) and the explained variance ratios."""
    n, n_features = data.shape
    mean = data.mean(axis=0)
    if n_features <= 1000 and n >= 10 * n_features:
        covariance = data.T @ data
        covariance -= n * mean[:, None] * mean[None, :]
        covariance /= n - 1
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        variance = np.flip(eigenvalues)
        variance[variance < 0.0] = 0.0
        rows = np.flip(eigenvectors, axis=1).T
    else:
        _, singular, rows = np.linalg.svd(data - mean, full_matrices=False)
        variance = singular**2 / (n - 1)
    largest = np.argmax(np.abs(rows), axis=1)
    rows = rows * np.sign(rows[np.arange(rows.shape[0]), largest])[:, None]
    return mean, rows, variance / variance.sum()


def kmeans(
    points: np.ndarray, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """k-means of `points` (n, D): k-means++ seeding and Lloyd iterations, `n_init` times from one seeded
    stream (numpy RandomState(seed)), the run of least inertia kept. Returns the centres (k, D) and the
    labels (n,) int32. `tol` is relative to the mean variance of the columns."""
    from threadpoolctl import threadpool_limits

    data = np.array(points, dtype=np.float64, order="C")
    tolerance = float(np.mean(np.var(data, axis=0)) * tol) if tol else 0.0
    rng = np.random.RandomState(seed)
    shift = data.mean(axis=0)
    data -= shift  # centred for accurate distances
    squared_norms = np.einsum("ij,ij->i", data, data)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    # thin matrix products: one BLAS thread is faster than two competing ones
    with threadpool_limits(1, user_api="blas"):
        for _ in range(n_init):
            seeds = _kmeans_plusplus(data, k, rng, squared_norms)
            labels, inertia, centres = _lloyd(data, seeds, max_iter, tolerance)
            if best is None or (inertia < best[2] and not _same_partition(labels, best[1])):
                best = (centres, labels, inertia)
    assert best is not None
    return best[0] + shift, best[1]


def _squared_distances(centres: np.ndarray, data: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """(m, n) squared Euclidean distances from `centres` (m, D) to `data` (n, D) whose squared row norms
    are `squared_norms`, as |c|^2 - 2 c.x + |x|^2 clipped at 0."""
    distances = -2 * (centres @ data.T)
    distances += np.einsum("ij,ij->i", centres, centres)[:, None]
    distances += squared_norms[None, :]
    return np.maximum(distances, 0, out=distances)


def _kmeans_plusplus(
    data: np.ndarray, k: int, rng: np.random.RandomState, squared_norms: np.ndarray
) -> np.ndarray:
    """k-means++ seeds (k, D): each next seed the best of 2 + log(k) draws proportional to the squared
    distance to the seeds so far."""
    n = data.shape[0]
    weights = np.ones(n)
    trials = 2 + int(np.log(k))
    centres = np.empty((k, data.shape[1]))
    centres[0] = data[rng.choice(n, p=weights / weights.sum())]
    closest = _squared_distances(centres[:1], data, squared_norms)
    potential = closest @ weights
    for c in range(1, k):
        draws = rng.uniform(size=trials) * potential
        candidates = np.searchsorted(np.cumsum(weights * closest), draws)
        np.clip(candidates, None, n - 1, out=candidates)
        to_candidates = _squared_distances(data[candidates], data, squared_norms)
        np.minimum(closest, to_candidates, out=to_candidates)
        candidate_potential = to_candidates @ weights.reshape(-1, 1)
        best = int(np.argmin(candidate_potential))
        potential = candidate_potential[best]
        closest = to_candidates[best]
        centres[c] = data[candidates[best]]
    return centres


def _lloyd(
    data: np.ndarray, centres: np.ndarray, max_iter: int, tolerance: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """Lloyd iterations from `centres` until the labels repeat, the squared centre shift is at most
    `tolerance` or `max_iter` runs; returns labels (int32), inertia and centres."""
    columns = np.ascontiguousarray(data.T)  # (D, n): whole rows for the products and the bincounts
    labels_old = np.full(data.shape[0], -1, dtype=np.int32)
    converged_strictly = False
    for _ in range(max_iter):
        labels = _nearest(columns, centres)
        new_centres = _updated_centres(data, columns, centres, labels)
        shift_sq = float((np.sqrt(((new_centres - centres) ** 2).sum(axis=1)) ** 2).sum())
        centres = new_centres
        if np.array_equal(labels, labels_old):
            converged_strictly = True
            break
        if shift_sq <= tolerance:
            break
        labels_old = labels
    if not converged_strictly:
        labels = _nearest(columns, centres)  # labels that match the final centres
    inertia = float(((data - centres[labels]) ** 2).sum())
    return labels, inertia, centres


def _nearest(columns: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index (int32) of the nearest centre (|c|^2 - 2 c.x; the first on ties) of every point, the points
    given as `columns` (D, n)."""
    distances = np.einsum("ij,ij->i", centres, centres)[:, None] - 2.0 * (centres @ columns)
    # one pass per centre over whole rows: argmin across the short axis of (n, k) is several times slower
    labels = np.zeros(columns.shape[1], dtype=np.int32)
    nearest = distances[0].copy()
    for j in range(1, centres.shape[0]):
        closer = distances[j] < nearest
        labels[closer] = j
        np.minimum(nearest, distances[j], out=nearest)
    return labels


def _updated_centres(data: np.ndarray, columns: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of each cluster's points (`data` (n, D), also as `columns` (D, n)); an empty cluster takes the
    point farthest from its centre (taken from that point's cluster), one still empty sits on the largest
    cluster's centre."""
    k = centres.shape[0]
    sums = np.stack([np.bincount(labels, weights=column, minlength=k) for column in columns], axis=1)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        distances = ((data - centres[labels]) ** 2).sum(axis=1)
        if np.max(distances) > 0:
            farthest = np.argpartition(distances, -len(empty))[: -len(empty) - 1 : -1]
            for cluster, row in zip(empty, farthest, strict=True):
                sums[labels[row]] -= data[row]
                sums[cluster] = data[row]
                counts[cluster] = 1.0
                counts[labels[row]] -= 1.0
    largest = int(np.argmax(counts))
    for j in range(k):
        sums[j] = sums[j] * (1.0 / counts[j]) if counts[j] > 0 else sums[largest]
    return sums


def _same_partition(labels: np.ndarray, other: np.ndarray) -> bool:
    """True when `labels` maps onto `other` (each label of the first always meets the same one of the
    second): the same clustering up to the names of the clusters."""
    pairs = np.unique(labels.astype(np.int64) * (int(other.max()) + 1) + other)
    return len(pairs) == len(np.unique(labels))


def outlier_bounds(sample: np.ndarray, cap_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (low, high) bounds: median -/+ `cap_sigma` robust sigmas (1.4826 MAD) of `sample` (n, F).

    A feature with no spread (MAD 0) falls back to its standard deviation; a constant feature is left as is.
    """
    if cap_sigma <= 0:
        raise SettingsError(f"outlier_cap_sigma must be positive, got {cap_sigma}")
    centre = np.median(sample, axis=0)
    spread = 1.4826 * np.median(np.abs(sample - centre), axis=0)
    spread = np.where(spread > 0, spread, np.std(sample, axis=0))
    spread = np.where(spread > 0, spread, np.inf)
    return centre - cap_sigma * spread, centre + cap_sigma * spread


def suggest_k(
    features: np.ndarray, k_values: Sequence[int] = (2, 3, 4, 5, 6), seed: int = 0, sample_size: int = 3000
) -> tuple[int, dict[int, float]]:
    """Suggest k by the silhouette score (higher is better) on a seeded sample; returns (best k, scores).

    Only a suggestion (see module docstring); k values above the number of samples are skipped.
    """
    from sklearn.metrics import silhouette_score

    features = np.asarray(features)
    sample = np.asarray(features[_sample_rows(features.shape[0], sample_size, seed)], dtype=np.float64)
    scores: dict[int, float] = {}
    for k in k_values:
        if k < 2 or k >= sample.shape[0]:
            continue
        try:
            model = fit_clusters(sample, k, seed=seed)
        except SettingsError:
            continue
        labels = model.predict(sample)
        if len(np.unique(labels)) < 2:
            continue
        scores[int(k)] = float(silhouette_score(model.transform(sample), labels, random_state=seed))
    if not scores:
        return 3, scores
    return max(scores, key=lambda key: scores[key]), scores


# --------------------------------------------------------------------------------------------------
# Bars and black areas
# --------------------------------------------------------------------------------------------------


def two_step_black_cells(features: np.ndarray, feature_names: Sequence[str], seed: int = 0) -> np.ndarray:
    """First step of the study's two-step filter: True for black and partly black cells.

    k-means (k=3) on scaled (mean, mode, mean - 2 std, range). The darkest cluster counts as black only
    if its mean lies below the brightest cluster's by more than half of the brightest cluster's mean
    above the image minimum (a black area removes most of the signal, in bright and dark field alike)
    and by more than 5 of the brightest cluster's within-cell std; then a cluster whose cells reach down
    to the black cluster's level (mean - 2 std below the midpoint between black and bright) counts as
    partly black. Returns an all-False mask when no cluster qualifies.
    """
    from sklearn.cluster import KMeans

    names = list(feature_names)
    mean = features[:, names.index("mean")]
    std = features[:, names.index("std")]
    n = features.shape[0]
    if n < 6:
        return np.zeros(n, dtype=bool)
    columns = np.stack([mean, features[:, names.index("mode")], mean - 2 * std, features[:, names.index("range")]], 1)
    spread = columns.std(axis=0)
    if not np.all(spread > 0):
        spread = np.where(spread > 0, spread, 1.0)
    scaled = (columns - columns.mean(axis=0)) / spread
    sample = _sample_rows(n, 50_000, seed)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1 if len(sample) < 50_000 else None):
        model = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(scaled[sample])
    labels = model.predict(scaled)
    cluster_mean = np.array([mean[labels == c].mean() if np.any(labels == c) else np.nan for c in range(3)])
    cluster_std = np.array([np.median(std[labels == c]) if np.any(labels == c) else np.nan for c in range(3)])
    dark, bright = int(np.nanargmin(cluster_mean)), int(np.nanargmax(cluster_mean))
    floor = float(mean.min())
    gap = cluster_mean[bright] - cluster_mean[dark]
    if not (gap > 0.5 * (cluster_mean[bright] - floor) and gap > 5 * cluster_std[bright]):
        return np.zeros(n, dtype=bool)
    black = labels == dark
    middle = 3 - dark - bright
    midpoint = 0.5 * (cluster_mean[dark] + cluster_mean[bright])
    in_middle = labels == middle
    if np.any(in_middle) and np.median((mean - 2 * std)[in_middle]) < midpoint:
        black |= in_middle
    return black


def _block_mean(image: np.ndarray, max_side_px: int) -> tuple[np.ndarray, int]:
    """Block-averaged float64 copy of `image` with sides <= max_side_px, and the block size."""
    factor = max(1, int(np.ceil(max(image.shape) / max_side_px)))
    rows, cols = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    if rows == 0 or cols == 0:
        return image.astype(np.float64), 1
    if factor > 1 and image.dtype in (np.uint8, np.uint16):
        return _small_integer_block_mean(image, factor), factor
    return block_mean(image, factor), factor


def _small_integer_block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """`preprocess.block_mean(image, factor)` of a uint8/uint16 image (factor <= 256), the same values faster:
    the block sums are whole numbers, exact in any order (uint32 for the rows of a block, then float64 for
    its columns, added as whole rows instead of `factor`-element runs), divided by factor**2 as there."""
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    row_sums = image[:rows, :cols].reshape(rows // factor, factor, cols).sum(axis=1, dtype=np.uint32)
    total = row_sums[:, 0::factor].astype(np.float64)
    for offset in range(1, factor):
        total += row_sums[:, offset::factor]
    return total / float(factor * factor)


def _upsample_mask(small: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """`small` (blocks of `factor` px) at `shape`: each pixel takes its block's value; pixels past the last
    whole block take the last block's."""
    rows = np.minimum(np.arange(shape[0]) // factor, small.shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // factor, small.shape[1] - 1)
    if small.shape[0] * factor > shape[0] or small.shape[1] * factor > shape[1]:
        return small[rows][:, cols]
    # repeats (and the edge rows/columns copied on) instead of fancy indexing: a few times faster at 4k.
    # Each block row is widened once (np.repeat along the row), then copied `factor` times as whole rows:
    # a broadcast into the 4-D block view copies `factor`-element runs and is ~8x slower at 4k.
    out = np.empty(shape, dtype=small.dtype)
    full_rows, full_cols = small.shape[0] * factor, small.shape[1] * factor
    wide = np.repeat(small, factor, axis=1)  # (block rows, full_cols)
    out[:full_rows, :full_cols].reshape(small.shape[0], factor, full_cols)[...] = wide[:, None, :]
    out[:full_rows, full_cols:] = out[:full_rows, full_cols - 1 : full_cols]
    out[full_rows:] = out[full_rows - 1 : full_rows]
    return out


def _otsu_classes(small: np.ndarray, ignore: np.ndarray | None) -> tuple[float, float, float] | None:
    """(threshold, dark mean, bright mean) of a clearly bimodal image, else None (see `dark_class`)."""
    from skimage.filters import threshold_otsu

    considered = small if ignore is None else small[~ignore]
    if considered.size < 16:
        return None
    # rare bright things (hot pixels, burned-in text, dark-field crystals) must not set the split
    low, high = np.percentile(considered, [0.5, 95.0])
    if high <= low:
        return None
    values = np.clip(considered.ravel(), low, high)
    threshold = float(threshold_otsu(values))
    dark = values <= threshold
    fraction = dark.mean()
    if fraction < 0.01 or fraction > 0.95:
        return None
    mu_d, mu_b = float(values[dark].mean()), float(values[~dark].mean())
    pooled = np.sqrt(0.5 * (values[dark].var() + values[~dark].var())) + 1e-12
    if (mu_b - mu_d) < 4 * pooled:
        return None
    return threshold, mu_d, mu_b


@dataclass(frozen=True)
class DarkBlocks:
    """A block-averaged copy of an image (`small`, blocks of `factor` px, as `_block_mean` makes it), the blocks
    holding ignored pixels (None: none) and the Otsu classes of the rest (`_otsu_classes`; None: no clear dark
    class). `large_dark_mask` and `black_pixel_mask` of one image share it (`dark_blocks`)."""

    small: np.ndarray
    factor: int
    ignore_small: np.ndarray | None
    classes: tuple[float, float, float] | None


def dark_blocks(image: np.ndarray, ignore: np.ndarray | None = None, max_side_px: int = 1024) -> DarkBlocks:
    """The `DarkBlocks` of `image` with sides <= `max_side_px`, pixels of `ignore` left out of the classes."""
    small, factor = _block_mean(image, max_side_px)
    ignore_small = _ignore_blocks(ignore, factor, small.shape)
    return DarkBlocks(small, factor, ignore_small, _otsu_classes(small, ignore_small))


def _dark_of(
    small: np.ndarray, ignore: np.ndarray | None, classes: tuple[float, float, float] | None
) -> np.ndarray | None:
    """`dark_class(small, ignore)` when `classes` is `_otsu_classes(small, ignore)`."""
    if classes is None:
        return None
    dark_pixels = small <= classes[0]
    if ignore is not None:
        dark_pixels &= ~ignore
    return dark_pixels


def dark_class(small: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray | None:
    """Dark pixels of a block-averaged image by Otsu's threshold, or None when there is no clear dark class.

    Values are clipped to their 0.5-95 percentiles first (hot pixels, burned-in text); `ignore` marks
    pixels left out (annotation bands). Accepted when the dark class covers 1-95 % of the image and the
    class means are more than 4 pooled within-class standard deviations apart, so a film with a few dark
    crystals has no dark class.
    """
    return _dark_of(small, ignore, _otsu_classes(small, ignore))


def keep_border_or_large(mask: np.ndarray, min_fraction: float = 0.1) -> np.ndarray:
    """The connected parts of `mask` that touch the image border or cover at least `min_fraction` of it.

    Bars, black corners and torn film run into the border or are huge; a dark crystal, even a large one at
    high magnification, sits inside the image and must not be masked as a black area.
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_fraction * mask.size
    keep[border] = True
    keep[0] = False
    return keep[labels]


def _ignore_blocks(ignore: np.ndarray | None, factor: int, shape: tuple[int, int]) -> np.ndarray | None:
    """Blocks (of a `_block_mean` copy) holding any ignored pixel; None when nothing is ignored."""
    if ignore is None or not ignore.any():
        return None
    rows, cols = shape[0] * factor, shape[1] * factor
    # ignore[:rows, :cols].reshape(shape[0], factor, shape[1], factor).any(axis=(1, 3)), rows ORed first
    return block_any(ignore[:rows, :cols], factor) if factor > 1 else np.array(ignore[:rows, :cols], dtype=bool)


def black_pixel_mask(
    image: np.ndarray, ignore: np.ndarray | None = None, max_side_px: int = 1024, blocks: DarkBlocks | None = None
) -> np.ndarray:
    """Pixels (of any extent) that are nearly black: below a quarter of the way from the dark class mean to
    the bright class mean (classes as in `dark_class`; 3x3 mean first against noise), grown by 2 px. Which
    connected parts count is decided on a block-averaged copy.

    Only parts touching the border or covering >= 10 % of the image count (`keep_border_or_large`), and the
    slivers of bars that the frame cuts (`frame_edge_slivers`). Catches bar edges and black corners the
    wide-structure detectors leave out. Empty when the image has no clear dark class. `blocks`:
    `dark_blocks(image, ignore, max_side_px)` when the caller has it.
    """
    blocks = blocks or dark_blocks(image, ignore, max_side_px)
    small, factor, ignore_small, classes = blocks.small, blocks.factor, blocks.ignore_small, blocks.classes
    if classes is None:
        return np.zeros(image.shape, dtype=bool)
    _, mu_d, mu_b = classes
    level = mu_d + 0.25 * (mu_b - mu_d)
    black_small = small <= level
    if ignore_small is not None:
        black_small &= ~ignore_small
    # which black parts count is decided on the block copy (cheap); the mask itself is pixel-exact
    allowed = grow_mask(keep_border_or_large(black_small), 3)
    black = np.zeros(image.shape, dtype=bool)
    if allowed.any():
        black = _mean_3x3_at_most(image, level) & _upsample_mask(allowed, factor, image.shape)
    black |= frame_edge_slivers(image, level, 2 * factor, known=black)
    if ignore is not None:
        black &= ~ignore
    return grow_mask(black, 5) if black.any() else black


def frame_edge_slivers(
    image: np.ndarray, level: float, depth_px: int, known: np.ndarray | None = None
) -> np.ndarray:
    """Bool mask (image shape) of the pixels at most `level` within `depth_px` of the frame's edge, in connected
    parts (8-connected, within that rim) that reach the edge, where the part's pixels outside `known` (black
    already found) run along the edge for at least 4 x `depth_px`: a bar or black area that the frame cuts to a
    sliver a pixel or two wide. Averaged into blocks, or over 3 x 3 pixels, such a sliver is brighter than black,
    and unmasked it became a row of dark objects along the frame. Pixel by pixel, not averaged: a sliver one
    pixel wide is black in its own pixels only. Where a bar meets the frame whole, its mask stays as it was (the
    few edge pixels the 3 x 3 mean leaves out do not run along the frame)."""
    rows, cols = image.shape
    mask = np.zeros((rows, cols), dtype=bool)
    depth = min(depth_px, rows, cols)
    if depth < 1:
        return mask
    min_run = 4 * depth
    # each edge as a strip whose first column lies on the frame (the rows: transposed views)
    known = np.zeros((rows, cols), dtype=bool) if known is None else np.asarray(known, dtype=bool)
    strips = (
        (image[:, :depth], known[:, :depth], mask[:, :depth]),
        (image[:, ::-1][:, :depth], known[:, ::-1][:, :depth], mask[:, ::-1][:, :depth]),
        (image[:depth].T, known[:depth].T, mask[:depth].T),
        (image[::-1][:depth].T, known[::-1][:depth].T, mask[::-1][:depth].T),
    )
    for values, found, target in strips:
        dark = values <= level
        if not dark[:, 0].any():
            continue
        labels, _count = ndimage.label(dark, structure=np.ones((3, 3), dtype=bool))
        for part, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None or box[0].stop - box[0].start < min_run:
                continue
            inside = labels[box] == part
            if box[1].start != 0 or not inside[:, 0].any():
                continue
            new = inside & ~found[box]
            runs, _count = ndimage.label(new.any(axis=1))
            if runs.any() and np.bincount(runs)[1:].max() >= min_run:
                target[box] |= new
    return mask


def _mean_3x3(image: np.ndarray) -> np.ndarray:
    """Mean of every pixel's 3x3 neighbourhood (float32; the edge pixels repeated outside the image), as
    `ndimage.uniform_filter(image, 3, mode="nearest")` up to rounding: sums of shifted slices are several
    times faster."""
    data = np.asarray(image, dtype=np.float32)
    return _sum_3(_sum_3(data, 0), 1) * np.float32(1.0 / 9.0)


#: Rows of the image averaged at a time by `_mean_3x3_at_most` (a few MB per band instead of full-size arrays).
MEAN_BAND_ROWS = 256


def _mean_3x3_at_most(image: np.ndarray, level: float) -> np.ndarray:
    """`_mean_3x3(image) <= level` (bool, image shape), band by band of `MEAN_BAND_ROWS` rows: each band is
    averaged with one row above and below, so every pixel's mean is summed from the same values in the same
    order (the same mask), and no full-size float array is made (first touch of fresh memory is slow)."""
    rows = image.shape[0]
    if rows < 2:
        return _mean_3x3(image) <= level
    out = np.empty(image.shape, dtype=bool)
    for top in range(0, rows, MEAN_BAND_ROWS):
        bottom = min(top + MEAN_BAND_ROWS, rows)
        start, stop = max(top - 1, 0), min(bottom + 1, rows)
        out[top:bottom] = _mean_3x3(image[start:stop])[top - start : bottom - start] <= level
    return out


def _sum_3(data: np.ndarray, axis: int) -> np.ndarray:
    """Sum of each element and its two neighbours along `axis` (0 or 1; the edge element repeated outside)."""
    source = data if axis == 0 else data.T
    total = np.empty_like(data)
    target = total if axis == 0 else total.T
    if source.shape[0] == 1:
        target[...] = 3 * source
        return total
    np.add(source[:-2], source[1:-1], out=target[1:-1])
    target[1:-1] += source[2:]
    target[0] = 2 * source[0] + source[1]
    target[-1] = source[-2] + 2 * source[-1]
    return total


def large_dark_mask(
    image: np.ndarray,
    min_width_px: float,
    max_side_px: int = 1024,
    ignore: np.ndarray | None = None,
    blocks: DarkBlocks | None = None,
) -> np.ndarray:
    """Pixel mask of dark areas at least `min_width_px` wide (bars, black corners, broken film edges).

    Dark class from `dark_class` on a block-averaged copy; an opening with a square of side
    `min_width_px / sqrt(2)` keeps only wide structures (not crystals, not small ice balls), and of
    those only the parts touching the border or covering >= 10 % of the image (`keep_border_or_large`).
    `blocks`: `dark_blocks(image, ignore, max_side_px)` when the caller has it.
    """
    blocks = blocks or dark_blocks(image, ignore, max_side_px)
    factor = blocks.factor
    dark = _dark_of(blocks.small, blocks.ignore_small, blocks.classes)
    if dark is None:
        return np.zeros(image.shape, dtype=bool)
    # opening with a square of side min_width/sqrt(2): a bar at any angle contains such squares;
    # separable min/max filters keep it fast
    side = max(1, round(min_width_px / factor / np.sqrt(2.0)))
    opened = ndimage.maximum_filter(ndimage.minimum_filter(dark.astype(np.uint8), size=side), size=side) > 0
    return _upsample_mask(keep_border_or_large(opened), factor, image.shape)


@dataclass(frozen=True)
class MeshDetection:
    """Result of `mesh_mask`: the pixel mask, the bar direction (deg, from the column axis) and bar count."""

    mask: np.ndarray
    angle_deg: float | None
    n_bars: int


def _line_profiles(dark: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark fraction and length of lines u = col*cos + row*sin = const (1 px bins); and u per pixel."""
    rows, cols = dark.shape
    theta = np.deg2rad(angle_deg)
    rr, cc = np.mgrid[0:rows, 0:cols]
    u = cc * np.cos(theta) + rr * np.sin(theta)
    u_bin = np.floor(u - u.min()).astype(np.int64)
    length = np.bincount(u_bin.ravel())
    dark_count = np.bincount(u_bin.ravel(), weights=dark.ravel().astype(np.float64), minlength=len(length))
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(length > 0, dark_count / np.maximum(length, 1), 0.0)
    return fraction, length, u_bin


def _mesh_angle_fft(dark: np.ndarray, step_deg: float = 0.5) -> float:
    """Direction (deg in [-45, 45)) of the strongest pair of perpendicular lines in the power spectrum
    of the dark map: a periodic mesh puts its energy along two perpendicular lines through the origin."""
    rows, cols = dark.shape
    taper = np.outer(np.hanning(rows), np.hanning(cols))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2((dark - dark.mean()) * taper)))
    centre = np.array([rows // 2, cols // 2], dtype=np.float64)
    radii = np.arange(2.0, min(rows, cols) / 2.0 - 1.0)
    angles = np.arange(-45.0, 45.0, step_deg)
    total = np.zeros(len(angles))
    for extra in (0.0, 90.0):
        theta = np.deg2rad(angles + extra)[:, None]
        r_coord = centre[0] + radii[None, :] * np.sin(theta)
        c_coord = centre[1] + radii[None, :] * np.cos(theta)
        samples = ndimage.map_coordinates(spectrum, [r_coord.ravel(), c_coord.ravel()], order=1, mode="nearest")
        total += samples.reshape(len(angles), len(radii)).sum(axis=1)
    return float(angles[int(np.argmax(total))])


def mesh_mask(
    image: np.ndarray, min_width_px: float = 4.0, max_side_px: int = 384, ignore: np.ndarray | None = None
) -> MeshDetection:
    """Detect straight dark bands (the grid-bar mesh) from projection profiles; see module docstring.

    A band is a run of lines (>= `min_width_px` wide in image pixels) whose dark fraction exceeds 0.75
    and whose length is at least a third of the image's shorter side. Both the best direction and its
    perpendicular are searched.
    """
    small, factor = _block_mean(image, max_side_px)
    dark = dark_class(small, _ignore_blocks(ignore, factor, small.shape))
    empty = MeshDetection(np.zeros(image.shape, dtype=bool), None, 0)
    if dark is None:
        return empty
    min_len = min(small.shape) / 3.0

    def score(angle: float) -> float:
        fraction, length, _ = _line_profiles(dark, angle)
        valid = length >= min_len
        return float(np.sum(fraction[valid] > 0.75)) + float(np.var(fraction[valid])) if np.any(valid) else 0.0

    coarse = _mesh_angle_fft(dark)
    fine = np.arange(coarse - 1.0, coarse + 1.01, 0.25)
    best = float(fine[int(np.argmax([score(a) + score(a + 90.0) for a in fine]))])
    band_small = np.zeros(small.shape, dtype=bool)
    n_bars = 0
    min_run = max(1, round(min_width_px / factor))
    for angle in (best, best + 90.0):
        fraction, length, u_bin = _line_profiles(dark, angle)
        barline = (fraction > 0.75) & (length >= min_len)
        runs, n_runs = ndimage.label(barline)
        for run in range(1, n_runs + 1):
            members = np.flatnonzero(runs == run)
            if len(members) < min_run:
                barline[members] = False
            else:
                n_bars += 1
        band_small |= barline[u_bin] & ndimage.binary_dilation(dark, iterations=1)
    if n_bars == 0:
        return empty
    # the band is the dark part of the bar lines, closed across small gaps
    band_small = ndimage.binary_closing(band_small, iterations=1) | band_small
    return MeshDetection(_upsample_mask(band_small, factor, image.shape), best, n_bars)
