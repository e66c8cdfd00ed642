"""The numpy scaler, PCA and k-means of `agent.locate.cluster` give what scikit-learn gives (up to rounding)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.locate.cluster import kmeans, principal_components, standard_scale

sklearn = pytest.importorskip("sklearn")


def _blobs(n: int, n_features: int, n_blobs: int, seed: int) -> np.ndarray:
    """`n` points around `n_blobs` seeded centres, columns of very different scales."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_blobs, n_features))
    points = centres[rng.integers(0, n_blobs, n)] + rng.normal(0, 1, (n, n_features)) * rng.uniform(0.2, 3, n_features)
    points[:, 0] *= 100
    return points


@pytest.mark.parametrize(
    ("n", "n_features", "k", "seed"), [(20_000, 9, 5, 0), (5000, 4, 3, 2), (60, 9, 6, 1), (40, 3, 2, 3)]
)
def test_kmeans_matches_scikit_learn(n: int, n_features: int, k: int, seed: int) -> None:
    from sklearn.cluster import KMeans

    points = _blobs(n, n_features, k + 2, seed)
    reference = KMeans(n_clusters=k, n_init=3, random_state=seed, max_iter=100).fit(points)
    centres, labels = kmeans(points, k, seed=seed, n_init=3, max_iter=100)
    np.testing.assert_array_equal(labels, reference.labels_)
    np.testing.assert_allclose(centres, reference.cluster_centers_, rtol=1e-9, atol=1e-9)


def test_kmeans_with_duplicate_points_matches_scikit_learn() -> None:
    """Few distinct points: clusters run empty and are re-seeded as scikit-learn does."""
    import warnings

    from sklearn.cluster import KMeans

    rng = np.random.default_rng(4)
    points = rng.integers(0, 2, (300, 3)).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = KMeans(n_clusters=6, n_init=3, random_state=1, max_iter=100).fit(points)
    centres, labels = kmeans(points, 6, seed=1, n_init=3, max_iter=100)
    np.testing.assert_array_equal(labels, reference.labels_)
    np.testing.assert_allclose(centres, reference.cluster_centers_, atol=1e-12)


@pytest.mark.parametrize(("n", "n_features"), [(20_000, 9), (50, 9), (9, 9)])
def test_scaler_and_pca_match_scikit_learn(n: int, n_features: int) -> None:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    points = _blobs(n, n_features, 4, 5)
    points[:, 1] = 7.0  # a constant column keeps unit scale
    scaler = StandardScaler().fit(points)
    mean, scale = standard_scale(points)
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(scale, scaler.scale_, rtol=1e-10)
    scaled = (points - mean) / scale
    pca = PCA(n_components=min(scaled.shape), random_state=0).fit(scaled)
    pca_mean, components, ratio = principal_components(scaled)
    np.testing.assert_allclose(pca_mean, pca.mean_, atol=1e-12)
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, atol=1e-10)
    strong = pca.explained_variance_ratio_ > 1e-6  # directions of (near) zero variance are arbitrary
    np.testing.assert_allclose(components[strong], pca.components_[strong], atol=1e-7)
