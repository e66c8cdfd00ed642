"""Diffraction scoring tells Bragg spots from diffuse rings on synthetic camera frames."""

from __future__ import annotations

import numpy as np
import pytest

from agent.steps.diffraction_score import score_diffraction


def _frame(spots: int, rings: bool, seed: int = 0, size: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    centre = size / 2 + rng.normal(0, 3, 2)
    radius = np.hypot(yy - centre[0], xx - centre[1])
    signal = 200.0 + 8000.0 * np.exp(-((radius / 6.0) ** 2)) + 3000.0 / (1.0 + (radius / 25.0) ** 2)
    if rings:
        signal += 400.0 * np.exp(-(((radius - 0.3 * size) / 12.0) ** 2))
    for _ in range(spots):
        r, angle = rng.uniform(0.12 * size, 0.45 * size), rng.uniform(0, 2 * np.pi)
        row, col = centre[0] + r * np.sin(angle), centre[1] + r * np.cos(angle)
        signal += 1500.0 * np.exp(-(((yy - row) ** 2 + (xx - col) ** 2) / (2 * 1.5**2)))
    return rng.poisson(signal).astype(np.uint16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spots_are_counted_and_rings_are_not_spots(seed: int) -> None:
    crystal = score_diffraction(_frame(spots=25, rings=True, seed=seed))
    amorphous = score_diffraction(_frame(spots=0, rings=True, seed=seed))
    empty = score_diffraction(_frame(spots=0, rings=False, seed=seed))
    assert crystal.n_spots >= 18
    assert amorphous.n_spots <= 3 and empty.n_spots <= 3
    assert crystal.signal_to_background > amorphous.signal_to_background


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        score_diffraction(np.zeros((4, 4)))


def test_hot_pixels_are_not_spots() -> None:
    rng = np.random.default_rng(7)
    frame = _frame(spots=0, rings=True, seed=7).astype(np.int64)
    rows, cols = rng.integers(0, 512, size=(2, 30))
    frame[rows, cols] = 60000  # detector defects: single bright pixels
    assert score_diffraction(frame.astype(np.uint16)).n_spots <= 3
    with_spots = _frame(spots=20, rings=True, seed=7).astype(np.int64)
    with_spots[rows, cols] = 60000
    assert score_diffraction(with_spots.astype(np.uint16)).n_spots >= 15
