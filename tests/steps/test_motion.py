"""Stage paths: nearest neighbour + 2-opt visits every target once and is not longer than NN alone."""

from __future__ import annotations

import numpy as np
import pytest

from agent.steps.motion import path_length_um, plan_path, plan_tiered_path
from tests.conftest import MakeMicroscope


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


def test_backlash_approach_only_when_the_move_goes_backwards(simulated_microscope: MakeMicroscope) -> None:
    from agent.steps.motion import approach_move
    from simulator.stage import StageModel

    scope = simulated_microscope(camera_px=64, stage_model=StageModel(backlash_um=0.6, repeat_error_um=0.0))

    def moves_for(x_um: float, y_um: float, **options: bool) -> int:
        before = scope.fault_counts["move"]
        approach_move(scope, x_um, y_um, 5.0, **options)
        true_x, true_y = scope.true_stage_xy_um()
        assert (true_x, true_y) == pytest.approx((x_um, y_um), abs=1e-9)  # arrived from -x/-y: no backlash left
        return scope.fault_counts["move"] - before

    assert moves_for(10.0, 10.0) == 1  # +x +y: arrives from the right side by itself
    assert moves_for(10.0, 20.0) == 1  # x kept, +y
    assert moves_for(5.0, 25.0) == 2  # -x: overshoot and come back
    assert moves_for(8.0, 12.0) == 2  # +x -y
    assert moves_for(9.0, 13.0, always=True) == 2  # the calibration steps always approach
