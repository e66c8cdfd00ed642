"""The scorer's fast filters and medians give the values of scipy's filters and numpy's median, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from agent.steps import diffraction_score as ds


def _arrays(shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """Float32 test arrays: continuous values, heavy ties, infinities, a NaN, and signed zeros."""
    rng = np.random.default_rng(seed)
    continuous = (rng.standard_normal(shape) * 100).astype(np.float32)
    ties = rng.integers(0, 4, size=shape).astype(np.float32)
    infinite = continuous.copy()
    infinite[rng.random(shape) < 0.02] = np.inf
    infinite[rng.random(shape) < 0.02] = -np.inf
    nan = continuous.copy()
    nan[shape[0] // 2, shape[1] // 3] = np.nan
    zeros = ties.copy()
    zeros[rng.random(shape) < 0.3] = -0.0
    return {"continuous": continuous, "ties": ties, "infinite": infinite, "nan": nan, "zeros": zeros}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaN where NaN, the same dtype and the same sign of every zero."""
    return bool(a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
                and np.array_equal(np.signbit(a), np.signbit(b)))


@pytest.mark.parametrize("shape", [(16, 16), (17, 29), (130, 97)])
def test_median_filter_and_hot_pixels_match_scipy(shape: tuple[int, int]) -> None:
    for name, data in _arrays(shape, 1).items():
        assert _same(ds._median3x3(data), ndimage.median_filter(data, size=3)), name
        median = ndimage.median_filter(data, size=3)
        excess = data - median
        spread = 1.4826 * float(np.median(np.abs(excess - np.median(excess)))) or 1.0
        with np.errstate(invalid="ignore"):
            height = data - ndimage.minimum_filter(data, size=5)
        hot = (excess > 1.0 * spread) & (excess > 0.5 * np.maximum(height, 1e-6))
        expected = data.copy()
        expected[hot] = median[hot]
        assert _same(ds.remove_hot_pixels(data, isolation=0.5, min_excess_sigma=1.0), expected), name


@pytest.mark.parametrize("size", [3, 5, 21, 33])
def test_window_maxima_match_scipy(size: int) -> None:
    for name, data in _arrays((40, 57), size).items():
        for values in (data, data.astype(np.float64)):
            candidates = np.random.default_rng(size).random(values.shape) < 0.4
            expected = candidates & (values == ndimage.maximum_filter(values, size=size))
            assert np.array_equal(ds._window_maxima(values, candidates, size), expected), (name, size)
            if size // 2 < 20 and name != "nan":
                rows, cols = np.nonzero(candidates)
                padded = np.pad(values, size // 2 + 2, mode="symmetric")
                for maximum, scipy_filter in ((True, ndimage.maximum_filter), (False, ndimage.minimum_filter)):
                    found = ds._window_extremes_at(padded, size // 2 + 2, rows, cols, size, maximum=maximum)
                    assert np.array_equal(found, scipy_filter(values, size=size)[rows, cols]), (name, size)


@pytest.mark.parametrize("n", [11, 65536, 65537, 300_001])
def test_median_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    for dtype in (np.float32, np.float64):
        cases = {"normal": rng.standard_normal(n), "ties": rng.integers(0, 3, n).astype(float),
                 "skewed": rng.exponential(size=n) ** 3, "sorted": np.sort(rng.standard_normal(n)),
                 "integer": np.round(rng.standard_normal(n) * 0.3),  # mostly +0 and -0: np.round keeps the sign
                 "zeros": np.where(np.arange(n) < n // 2 + 5, -0.0, rng.standard_normal(n))}
        for name, values in cases.items():
            values = values.astype(dtype)
            expected, found = np.median(values), ds._median(values)
            assert type(found) is type(expected) and _same(np.asarray(found), np.asarray(expected)), (name, dtype)


def _sorted_definition(x: np.ndarray, bins: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The per-bin median as defined: a stable sort of bin + value scaled into [0, 0.5]."""
    valid = counts > 0
    key = bins + (x - x.min()) / ((x.max() - x.min()) or 1.0) * 0.5
    medians = np.zeros(counts.size)
    medians[valid] = x[np.argsort(key, kind="stable")][starts[valid] + (counts[valid] - 1) // 2]
    return medians


def test_per_bin_median_matches_its_sorted_definition() -> None:
    rng = np.random.default_rng(5)
    bins = np.sort(rng.integers(0, 50, 5000)) + 2  # bins 0 and 1 empty
    counts = np.bincount(bins, minlength=bins.max() + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    spread = np.float64(1e16)  # two values 1 apart share a key: the full sort decides between them
    for x in (rng.standard_normal(bins.size), rng.integers(0, 5, bins.size).astype(float),
              np.where(rng.random(bins.size) < 0.5, 0.0, 1.0) + np.r_[spread, np.zeros(bins.size - 1)],
              np.where(rng.random(bins.size) < 0.5, -0.0, 0.0) + (bins % 3 == 0)):
        x = x.astype(np.float32).astype(np.float64)  # float32 values (as the scorer's), so also given narrow
        expected = _sorted_definition(x, bins, starts, counts)
        for narrow in (None, x.astype(np.float32)):
            found = ds._per_bin_median(x, bins, starts, counts, narrow)
            assert np.array_equal(found, expected) and np.array_equal(np.signbit(found), np.signbit(expected))


@pytest.mark.parametrize("shape", [(16, 16), (40, 70), (513, 300)])
def test_smoothed_argmax_matches_the_whole_filter(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    counts = rng.poisson(100, shape).astype(np.float32)
    spots = counts.copy()
    spots[shape[0] // 3, shape[1] // 2] = spots[2, 3] = spots[-1, -1] = 1e5  # ties, one at an edge
    cases = {"counts": counts, "flat": np.full(shape, 7, np.float32), "spots": spots, "negative": counts - 150,
             "binary": rng.integers(0, 2, shape).astype(np.float32), **_arrays(shape, 2)}
    for name, data in cases.items():
        expected = np.unravel_index(int(np.argmax(ndimage.gaussian_filter(data, 4.0))), shape)
        assert ds._smoothed_argmax(data, 4.0) == (int(expected[0]), int(expected[1])), name
