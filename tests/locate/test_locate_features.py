"""Vectorised patch features equal a straightforward per-patch reference implementation."""

from __future__ import annotations

import numpy as np
import pytest

from agent.locate.errors import ImageInputError, SettingsError
from agent.locate.features import (
    FEATURE_NAMES,
    grid_edges_px,
    grid_features,
    window_features,
    window_output_shape,
)


def _reference_stats(patch: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Per-patch statistics the slow, obvious way (float64, two-pass)."""
    x = patch.astype(np.float64).ravel()
    mean = x.mean()
    centred = x - mean
    var = np.mean(centred**2)
    if x.max() == x.min():
        var = 0.0
    std = np.sqrt(var)
    if var > 0:
        skew = np.mean(centred**3) / var**1.5
        kurt = np.mean(centred**4) / var**2 - 3.0
        lag1 = 1.0 - grad.mean() / (2.0 * var)
    else:
        skew = kurt = lag1 = 0.0
    rel_std = std / abs(mean) if mean != 0 else 0.0
    mode = min(max(mean - 0.5 * skew * std, x.min()), x.max())
    return np.array([mean, std, rel_std, skew, kurt, mode, x.max() - x.min(), grad.mean(), lag1])


def _reference_gradient(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float64)
    g = np.zeros_like(x)
    g[:, :-1] += (x[:, 1:] - x[:, :-1]) ** 2
    g[:-1, :] += (x[1:, :] - x[:-1, :]) ** 2
    return g / 2.0


def _test_image(shape: tuple[int, int], dtype: type, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = 20000 + 3000 * np.sin(xx / 7.0) + 2000 * np.cos(yy / 5.0)
    noisy = base + rng.normal(0, 400, shape)
    noisy[rows // 3 : rows // 3 + 5, :] = 300  # a dark bar: far from the global reference
    if np.dtype(dtype).kind == "f":
        return (noisy / 65535.0).astype(dtype)
    info = np.iinfo(dtype)
    scale = (info.max - max(info.min, 0)) / 65535.0
    return np.clip(noisy * scale, info.min, info.max).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32, np.int16])
@pytest.mark.parametrize(("shape", "grid"), [((37, 53), (3, 5)), ((64, 64), (4, 4)), ((41, 29), (7, 2))])
def test_grid_features_equal_reference(dtype: type, shape: tuple[int, int], grid: tuple[int, int]) -> None:
    image = _test_image(shape, dtype, seed=1)
    features, names = grid_features(image, *grid)
    assert names == FEATURE_NAMES
    assert features.shape == (grid[0] * grid[1], len(FEATURE_NAMES))
    assert features.dtype == np.float64
    grad = _reference_gradient(image)
    er, ec = grid_edges_px(shape[0], grid[0]), grid_edges_px(shape[1], grid[1])
    for i in range(grid[0]):
        for j in range(grid[1]):
            sl = (slice(er[i], er[i + 1]), slice(ec[j], ec[j + 1]))
            expected = _reference_stats(image[sl], grad[sl])
            np.testing.assert_allclose(features[i * grid[1] + j], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.uint16, np.float64, np.uint8])
@pytest.mark.parametrize(("shape", "window", "stride"), [((23, 31), 5, 1), ((40, 33), 7, 3), ((19, 26), 9, 2)])
def test_window_features_equal_reference(
    dtype: type, shape: tuple[int, int], window: int, stride: int
) -> None:
    image = _test_image(shape, dtype, seed=2)
    features, names = window_features(image, window, stride)
    assert names == FEATURE_NAMES
    out_rows, out_cols = window_output_shape(shape, stride)
    assert features.shape == (out_rows, out_cols, len(FEATURE_NAMES))
    grad = _reference_gradient(image)
    half = window // 2
    for i in range(out_rows):
        for j in range(out_cols):
            r, c = i * stride, j * stride
            sl = (slice(max(0, r - half), r + half + 1), slice(max(0, c - half), c + half + 1))
            expected = _reference_stats(image[sl], grad[sl])
            np.testing.assert_allclose(features[i, j], expected, rtol=1e-6, atol=1e-8)


def test_window_features_on_large_band_chunks_match_reference_rows() -> None:
    """Images taller than one processing chunk (64 rows) are stitched seamlessly."""
    image = _test_image((150, 40), np.uint16, seed=3)
    features, _ = window_features(image, 11, 1)
    grad = _reference_gradient(image)
    for r in (0, 5, 63, 64, 65, 127, 128, 149):
        for c in (0, 20, 39):
            sl = (slice(max(0, r - 5), r + 6), slice(max(0, c - 5), c + 6))
            np.testing.assert_allclose(features[r, c], _reference_stats(image[sl], grad[sl]), rtol=1e-6, atol=1e-8)


def test_flat_patches_give_zero_higher_moments() -> None:
    image = np.full((40, 40), 1234, dtype=np.uint16)
    features, _ = grid_features(image, 4, 4)
    assert np.all(features[:, FEATURE_NAMES.index("std")] == 0)
    assert np.all(features[:, FEATURE_NAMES.index("skewness")] == 0)
    assert np.all(features[:, FEATURE_NAMES.index("kurtosis")] == 0)
    np.testing.assert_allclose(features[:, 0], 1234.0)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10,), dtype=np.uint16),
        np.zeros((5, 5, 3), dtype=np.uint8),
        np.zeros((8, 8), dtype=bool),
        np.zeros((8, 8), dtype=complex),
        np.array([[1.0, np.nan], [0.0, 1.0]]),
        np.zeros((1, 50), dtype=np.uint16),
    ],
)
def test_bad_images_raise_typed_errors(bad: np.ndarray) -> None:
    with pytest.raises(ImageInputError):
        grid_features(bad, 1, 1)
    with pytest.raises(ImageInputError):
        window_features(bad, 3)


def test_bad_settings_raise_typed_errors() -> None:
    image = np.zeros((20, 30), dtype=np.uint16)
    with pytest.raises(SettingsError, match="too fine"):
        grid_features(image, 11, 2)
    with pytest.raises(SettingsError):
        grid_features(image, 0, 2)
    with pytest.raises(SettingsError, match="larger than the image"):
        window_features(image, 21)
    with pytest.raises(SettingsError, match="odd"):
        window_features(image, 4)
    with pytest.raises(SettingsError, match="stride"):
        window_features(image, 3, 0)


def test_streamed_window_features_equal_whole_image() -> None:
    from agent.locate.features import iter_window_features

    image = _test_image((90, 47), np.uint16, seed=4)
    whole, _ = window_features(image, 9, 2)
    pieces = [chunk.copy() for _, _, chunk in iter_window_features(image, 9, 2, chunk_rows=7)]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=1e-12, atol=1e-9)
    out = np.empty_like(whole)
    window_features(image, 9, 2, out=out)
    np.testing.assert_array_equal(out, whole)
    with pytest.raises(SettingsError):
        window_features(image, 9, 2, out=np.empty((3, 3, 9)))
