"""The session benchmark's scoring (`agent.evaluation.throughput`) and raster baselines
(`agent.evaluation.raster`, on the real simulator with a small camera)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.evaluation.raster import (
    RasterSettings,
    ground_truth_tour,
    naive_raster,
    oracle_raster,
    raster_order,
    raster_tiles,
)
from agent.evaluation.throughput import (
    fixed_share,
    mean_step_um,
    per_hour,
    per_item,
    ratio,
    score_diffracting_calls,
    split_session_time,
    state_seconds,
    visit_seconds,
)
from simulator import create_simulated_microscope


def test_diffracting_calls_count_distinct_true_crystals() -> None:
    crystals = {(0.0, 0.0): 1, (0.5, 0.0): 1, (10.0, 0.0): 2, (20.0, 0.0): -1}
    calls = list(crystals)  # two calls on crystal 1, one on crystal 2, one on film
    score = score_diffracting_calls(calls, lambda x, y: crystals[(x, y)], diffracting_ids_in_area=[1, 3])
    assert (score.calls, score.true_calls, score.crystals) == (4, 3, 2)
    assert score.precision == pytest.approx(0.75)
    assert score.recall == pytest.approx(0.5)  # crystal 3 diffracts and was missed; 2 is not in the area's list


def test_no_calls_and_no_diffracting_crystals_give_none_not_zero() -> None:
    score = score_diffracting_calls([], lambda x, y: 0, diffracting_ids_in_area=[])
    assert (score.calls, score.crystals, score.precision, score.recall) == (0, 0, None, None)


def test_rates_and_ratios() -> None:
    assert per_hour(3, 1800.0) == pytest.approx(6.0)
    assert per_hour(0, 1800.0) == 0.0 and per_hour(3, 0.0) is None
    assert per_item(120.0, 4) == pytest.approx(30.0) and per_item(120.0, 0) is None
    assert ratio(6.0, 2.0) == pytest.approx(3.0)
    assert ratio(6.0, 0.0) is None and ratio(None, 2.0) is None
    assert fixed_share({"calibrating": 30.0, "mapping": 60.0}, 900.0) == pytest.approx(0.1)
    assert mean_step_um([(0.0, 0.0), (3.0, 4.0), (3.0, 10.0)]) == pytest.approx(5.5)
    assert mean_step_um([(0.0, 0.0)]) is None


def test_state_seconds_split_fixed_from_per_target_time() -> None:
    journal = [
        {"type": "session", "microscope_time_s": 0.0},
        {"type": "transition", "state": "calibrating", "microscope_time_s": 0.0},
        {"type": "transition", "state": "mapping", "microscope_time_s": 5.0},
        {"type": "transition", "state": "moving", "microscope_time_s": 50.0},
        {"type": "transition", "state": "recovering", "microscope_time_s": 52.0},  # a fault during the visit
        {"type": "transition", "state": "moving", "microscope_time_s": 55.0},
        {"type": "transition", "state": "diffraction", "microscope_time_s": 57.0},
        {"type": "target", "microscope_time_s": 60.0},
        {"type": "transition", "state": "moving", "microscope_time_s": 60.0},
    ]
    seconds = state_seconds(journal, end_s=70.0)
    assert seconds == pytest.approx({"calibrating": 5.0, "mapping": 45.0, "moving": 17.0, "diffraction": 3.0})
    fixed, per_target_s = split_session_time(seconds, visited=2)
    assert sum(fixed.values()) == pytest.approx(50.0) and fixed["mapping"] == pytest.approx(45.0)
    assert per_target_s == pytest.approx(10.0)
    journal[-2]["outcome"] = "recorded"
    assert visit_seconds(journal) == [("recorded", pytest.approx(10.0))]  # the second visit has no record yet


def test_raster_order_is_serpentine_and_tiles_cover_the_box() -> None:
    points = [(0.0, 0.0), (5.0, 1.0), (9.0, 0.5), (1.0, 11.0), (8.0, 12.0)]
    assert raster_order(points, band_um=10.0) == [0, 1, 2, 4, 3]
    tiles = raster_tiles([(0.0, 25.0, 0.0, 15.0)], field_um=10.0)
    assert len(tiles) == 3 * 2
    assert [round(x, 3) for x, _ in tiles] == [round(v, 3) for v in (25 / 6, 12.5, 125 / 6, 125 / 6, 12.5, 25 / 6)]
    assert all(0 < x < 25 and 0 < y < 15 for x, y in tiles)


@pytest.fixture(scope="module")
def crystals_xy_um() -> list[tuple[float, float]]:
    truth = create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256)).ground_truth
    # thin ones: a crystal nearly opaque at low magnification (simulator.thickness) is masked as a black area
    return [(c.x_um, c.y_um) for c in truth.crystal_truth() if c.contrast < 0.7][:3]


def test_ground_truth_tour_visits_the_given_crystals_once_each_within_the_budget(crystals_xy_um: list) -> None:
    microscope = create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256))
    run = ground_truth_tour(microscope, crystals_xy_um, band_um=10.0, settings=RasterSettings())
    assert sorted((s.x_um, s.y_um) for s in run.snapshots) == sorted(crystals_xy_um)
    assert run.microscope_time_s > 3 * RasterSettings().diffraction_exposure_s and not run.out_of_time
    assert run.calls_xy_um == [(s.x_um, s.y_um) for s in run.snapshots if s.n_spots >= 4]

    spent = create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256))
    stopped = ground_truth_tour(spent, crystals_xy_um, band_um=10.0, settings=RasterSettings(budget_s=1e-6))
    assert len(stopped.snapshots) == 1 and stopped.out_of_time  # the budget is checked before each visit


def test_naive_raster_images_every_field_and_shoots_each_spot_once(crystals_xy_um: list) -> None:
    microscope = create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256))
    x, y = crystals_xy_um[0]
    box = (x - 8.0, x + 8.0, y - 8.0, y + 8.0)
    matrix = microscope.true_image_to_stage_matrix("search")
    run = naive_raster(microscope, [box], matrix, 256, RasterSettings(merge_um=1.5))
    assert run.tiles == run.tiles_planned == 4  # 16 um box, ~10 um fields
    assert 0 < len(run.snapshots) <= run.detections
    for i, a in enumerate(run.snapshots):
        assert all(math.hypot(a.x_um - b.x_um, a.y_um - b.y_um) >= 1.5 for b in run.snapshots[:i])
    near = [s for s in run.snapshots if math.hypot(s.x_um - x, s.y_um - y) < 2.0]
    assert near, "the detector finds the crystal at the box centre"
    assert np.isfinite(run.microscope_time_s) and run.microscope_time_s > 0


def test_oracle_raster_images_every_field_and_shoots_exactly_the_crystals_in_it(crystals_xy_um: list) -> None:
    microscope = create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256))
    x, y = crystals_xy_um[0]
    box = (x - 8.0, x + 8.0, y - 8.0, y + 8.0)
    inside = [p for p in crystals_xy_um if box[0] <= p[0] <= box[1] and box[2] <= p[1] <= box[3]]
    matrix = microscope.true_image_to_stage_matrix("search")
    run = oracle_raster(microscope, [box], matrix, 256, crystals_xy_um, RasterSettings())
    assert run.tiles == run.tiles_planned == 4  # the naive raster's fields, each imaged
    assert sorted((s.x_um, s.y_um) for s in run.snapshots) == sorted(inside)  # crystals outside the box: not shot
    tour = ground_truth_tour(create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256)),
                             inside, band_um=10.0, settings=RasterSettings())
    assert run.microscope_time_s > tour.microscope_time_s  # it pays for its four search images

    spent = create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(256, 256))
    stopped = oracle_raster(spent, [box], matrix, 256, crystals_xy_um, RasterSettings(budget_s=1e-6))
    assert stopped.tiles == 1 and stopped.snapshots == [] and stopped.out_of_time
