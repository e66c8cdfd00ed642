"""Faster paths of the locator equal the plain computations they replace, value for value."""

from __future__ import annotations

import numpy as np
import pytest

from agent.locate.cluster import _upsample_mask


@pytest.mark.parametrize(
    ("small_shape", "factor", "shape"),
    [((8, 6), 4, (32, 24)), ((8, 6), 4, (35, 27)), ((5, 7), 3, (15, 23)), ((3, 3), 1, (3, 5)), ((1, 4), 5, (9, 20))],
)
def test_upsample_mask_gives_each_pixel_its_block(
    small_shape: tuple[int, int], factor: int, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(factor)
    small = rng.random(small_shape) < 0.4
    rows = np.minimum(np.arange(shape[0]) // factor, small_shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // factor, small_shape[1] - 1)
    up = _upsample_mask(small, factor, shape)
    assert up.shape == shape and up.dtype == np.bool_
    assert np.array_equal(up, small[rows][:, cols])


@pytest.mark.parametrize("threaded", [False, True])
def test_gaussian_rows_on_threads_equal_the_whole_image_bit_for_bit(
    threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy import ndimage

    from agent.locate import smoothing

    monkeypatch.setattr(smoothing, "PARALLEL_MIN_PX", 0 if threaded else 1 << 62)
    rng = np.random.default_rng(5)
    image = rng.normal(1000.0, 50.0, (301, 190)) * rng.uniform(0.5, 2.0, (301, 190))
    whole = ndimage.gaussian_filter(image, 1.0)
    bands = [smoothing.gaussian_rows(image, top, bottom, 1.0) for top, bottom in ((0, 150), (150, 151), (151, 301))]
    assert np.array_equal(np.concatenate(bands), whole)
