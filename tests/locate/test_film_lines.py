"""Film lines (folds, tears, carbon edges) are found whole; crystals that are long and thin are not lines."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from agent.locate.film_lines import film_line_mask, is_line_component, skeleton_length_px

SHAPE = (400, 400)


def _canvas() -> tuple[np.ndarray, np.ndarray]:
    """Deviation (film noise sigmas, smoothed like the locator's) and a boundary mask with two vertical bars."""
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.0)
    bars = np.zeros(SHAPE, dtype=bool)
    bars[:, :40] = bars[:, -40:] = True
    return noise / noise.std(), bars


def _stroke(deviation: np.ndarray, rows: np.ndarray, cols: np.ndarray, width_px: float, sigma: float) -> np.ndarray:
    """Add a line of `width_px` and `sigma` along the points (rows, cols); returns its mask."""
    mask = np.zeros(SHAPE, dtype=bool)
    mask[np.clip(rows.astype(int), 0, SHAPE[0] - 1), np.clip(cols.astype(int), 0, SHAPE[1] - 1)] = True
    mask = ndimage.binary_dilation(mask, iterations=max(1, int(width_px // 2)))
    deviation += sigma * mask
    return mask


def test_a_gentle_fold_from_bar_to_bar_is_a_line_a_needle_and_a_plate_are_not() -> None:
    deviation, bars = _canvas()
    cols = np.arange(40, 360, 0.5)
    fold = _stroke(deviation, 120 + 0.0004 * (cols - 200) ** 2, cols, 5, 8.0)  # nearly straight, bar to bar
    needle_rows = np.arange(250, 330, 0.5)
    needle = _stroke(deviation, needle_rows, 150 + 0.3 * (needle_rows - 250), 3, 12.0)  # straight, on the film
    plate = np.zeros(SHAPE, dtype=bool)
    plate[300:330, 250:290] = True
    deviation += 15.0 * plate
    lines = film_line_mask(deviation, bars)
    assert lines[fold & ~bars].mean() > 0.9
    assert not lines[needle].any() and not lines[plate].any()


def test_a_curved_tear_inside_a_square_is_a_line_crossing_needles_are_not() -> None:
    deviation, bars = _canvas()
    angle = np.linspace(0.2, 2.9, 600)
    tear = _stroke(deviation, 200 - 90 * np.sin(angle), 200 + 90 * np.cos(angle), 3, 8.0)  # an arc, ends on film
    t = np.arange(-50, 50, 0.5)
    cross = _stroke(deviation, 320 + t * 0.7, 120 + t * 0.7, 3, 12.0)
    cross |= _stroke(deviation, 320 - t * 0.7, 120 + t * 0.7, 3, 12.0)
    lines = film_line_mask(deviation, bars)
    assert lines[tear].mean() > 0.9
    assert not lines[cross].any()


def test_a_ring_is_not_a_line() -> None:
    yy, xx = np.mgrid[:80, :80]
    ring = np.abs(np.hypot(yy - 40, xx - 40) - 30) < 1.5
    assert not is_line_component(ring)


def test_skeleton_length_counts_diagonal_steps_as_root_two() -> None:
    line = np.eye(50, dtype=bool)
    assert abs(skeleton_length_px(line) - 49 * np.sqrt(2)) < 1e-9
    assert skeleton_length_px(np.ones((1, 30), dtype=bool)) == 29.0
