"""Stage paths: nearest neighbour + 2-opt visits every target once and is not longer than NN alone."""

from __future__ import annotations

import numpy as np

from agent.steps.motion import path_length_um, plan_path, plan_tiered_path


def _nearest_neighbour(start: np.ndarray, points: np.ndarray) -> list[int]:
    order, current, left = [], start, set(range(len(points)))
    while left:
        best = min(left, key=lambda i: float(np.hypot(*(points[i] - current))))
        order.append(best)
        left.discard(best)
        current = points[best]
    return order


def test_path_visits_every_point_once_and_beats_or_equals_nearest_neighbour() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        points = rng.uniform(-500, 500, size=(40, 2))
        start = np.array([0.0, 0.0])
        order = plan_path(start, points)
        assert sorted(order) == list(range(40))
        baseline = path_length_um(start, points, _nearest_neighbour(start, points))
        assert path_length_um(start, points, order) <= baseline + 1e-9


def test_two_opt_untangles_a_crossing() -> None:
    points = np.array([[0.0, 10.0], [10.0, 0.0], [10.0, 10.0], [0.0, 0.0]])
    order = plan_path((0.0, -1.0), points)
    assert path_length_um((0.0, -1.0), points, order) <= 31.0 + 1e-9


def test_empty_and_single() -> None:
    assert plan_path((0, 0), np.zeros((0, 2))) == []
    assert plan_path((0, 0), np.array([[5.0, 5.0]])) == [0]


def test_tiered_path_visits_every_point_of_a_tier_before_the_next_tier() -> None:
    sure = np.array([[100.0, 0.0], [200.0, 0.0], [150.0, 5.0]])
    mixed = np.array([[1.0, 0.0], [210.0, 0.0], [5.0, 1.0]])  # two of them right next to the start
    order = plan_tiered_path((0.0, 0.0), [sure, mixed])
    assert [tier for tier, _ in order] == [0, 0, 0, 1, 1, 1]
    assert sorted(i for t, i in order if t == 0) == [0, 1, 2] and sorted(i for t, i in order if t == 1) == [0, 1, 2]
    assert [i for t, i in order if t == 0] == plan_path((0.0, 0.0), sure)
    assert order[3] == (1, 1)  # the mixed tier starts from where the sure one ended (x = 200), not from the start
    assert plan_tiered_path((0.0, 0.0), [np.zeros((0, 2)), mixed])[0] == (1, 0)
    assert plan_tiered_path((0.0, 0.0), [np.zeros((0, 2)), np.zeros((0, 2))]) == []
