"""`agent.locate.smoothing.gaussian_rows`: bands of rows equal to `ndimage.gaussian_filter` of the whole image."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from agent.locate.smoothing import gaussian_rows, gaussian_weights


@pytest.mark.parametrize("sigma_px", [0.1, 0.6, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(300, 257), (7, 40), (2, 9), (130, 1)])
def test_bands_equal_the_whole_image_bit_for_bit(sigma_px: float, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(1000.0, 50.0, shape) * rng.uniform(0.5, 2.0, shape)
    whole = ndimage.gaussian_filter(image, sigma_px)
    edges = sorted({0, shape[0], *rng.integers(0, shape[0], 4).tolist()})
    bands = [gaussian_rows(image, top, bottom, sigma_px) for top, bottom in itertools.pairwise(edges)]
    assert np.array_equal(np.concatenate(bands), whole)


def test_weights_are_ndimage_kernel() -> None:
    impulse = np.zeros(41)
    impulse[20] = 1.0
    response = ndimage.gaussian_filter1d(impulse, 1.5)
    weights = gaussian_weights(1.5)
    radius = len(weights) // 2
    assert np.array_equal(response[20 - radius : 21 + radius], weights[::-1])
