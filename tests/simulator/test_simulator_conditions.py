"""Real-grid conditions (simulator.conditions, simulator.film_defects): each is in the image where its truth says,
and none is a crystal. Frames are small and noise-free (the scene's optical density), so the tests are fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulator import create_simulated_microscope
from simulator.conditions import REALISTIC_CONDITIONS, condition_kwargs, what_is_at_xy
from simulator.diffraction import beam_contents
from simulator.film_defects import ICE_OD_PER_NM
from simulator.imaging import SpecimenScene
from simulator.microscope import drifted_preset
from simulator.specimen import Specimen, generate_specimen

OPTIONS = {
    "crystal_count": 300, "ice_ball_count": 0, "debris_count": 0, "fold_count": 30, "tear_count": 30,
    "carbon_edge_fraction": 0.05, "ice_gradient_fraction": 0.1, "contamination_count": 60, "stacked_fraction": 0.5,
}


@pytest.fixture(scope="module")
def spec() -> Specimen:
    return generate_specimen("protein-plates", 5, **OPTIONS)


def _frame(spec: Specimen, centre_xy_um: tuple[float, float], um_per_px: float, n_px: int = 160
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(OD, stage x, stage y, what lies there) of a noise-free n x n frame centred on `centre_xy_um`."""
    od = SpecimenScene(spec).optical_density(centre_xy_um, np.eye(2) * um_per_px, (n_px, n_px), um_per_px)
    offsets = (np.arange(n_px) - (n_px - 1) / 2.0) * um_per_px
    x = centre_xy_um[0] + offsets[None, :] + np.zeros((n_px, 1))
    y = centre_xy_um[1] + offsets[:, None] + np.zeros((1, n_px))
    return od, x, y, what_is_at_xy(spec, x, y, tolerance_um=0.0)


def _alone(spec: Specimen, defect: object) -> bool:
    """True if `defect` is the only square defect of its grid square, and the square is intact (no hole)."""
    c = spec.conditions
    others = [d for d in (*c.folds, *c.tears, *c.edges, *c.gradients) if d.square_xy_um == defect.square_xy_um]
    square = spec.square_at_xy(*defect.square_xy_um)
    return len(others) == 1 and square is not None and square.state == "intact"


def _middle(points_um: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    return points_um[len(points_um) // 2]


def _not_a_crystal(spec: Specimen, x_um: np.ndarray, y_um: np.ndarray) -> None:
    """The condition's pixels are not crystals in the truth, and the truth has only the crystals it placed."""
    assert np.all(spec.crystal_id_xy(x_um, y_um) == -1)
    assert spec.crystal_count == OPTIONS["crystal_count"] + int(np.sum(spec.crystals["stacked_on"] >= 0))


def test_conditions_off_by_default_leave_the_specimen_as_it_was() -> None:
    plain = generate_specimen("graphite-flakes", 2)
    zero = generate_specimen("graphite-flakes", 2, fold_count=0, tear_count=0, contamination_count=0)
    assert plain.conditions is None and "stacked_on" not in plain.crystals
    assert json.dumps(plain.truth_dict()) == json.dumps(zero.truth_dict())
    assert "conditions" not in plain.truth_dict() and "overlaps" not in plain.truth_dict()["crystals"][0]
    assert condition_kwargs(None) == {} and condition_kwargs("none") == {}
    with pytest.raises(ValueError, match="realistic"):
        condition_kwargs("harsh")


def test_fold_is_a_line_of_double_film(spec: Specimen) -> None:
    fold = max((f for f in spec.conditions.folds if _alone(spec, f)), key=lambda f: f.width_um)
    od, x, y, kind = _frame(spec, _middle(fold.points_um), 0.1)
    on_fold, film = kind == "fold", kind == "film"
    assert on_fold.sum() > 100 and film.sum() > 1000
    ratio = np.median(od[on_fold]) / np.median(od[film])
    assert 1.6 < ratio < 2.4  # double thickness, low contrast
    _not_a_crystal(spec, x[on_fold], y[on_fold])


def test_tear_is_a_vacuum_gap_with_dark_curled_lips(spec: Specimen) -> None:
    tear = max((t for t in spec.conditions.tears if _alone(spec, t)), key=lambda t: t.width_um)
    od, x, y, kind = _frame(spec, _middle(tear.points_um), 0.1)
    gap = (kind == "tear") & ~spec.film_mask_xy(x, y)
    lips = (kind == "tear") & spec.film_mask_xy(x, y)
    assert gap.sum() > 20 and lips.sum() > 100
    assert np.median(od[gap]) < 0.01  # vacuum: nothing scatters
    assert np.percentile(od[lips], 90) > np.median(od[kind == "film"]) + 0.15
    assert not spec.film_mask_xy(*_middle(tear.points_um))
    _not_a_crystal(spec, x[lips | gap], y[lips | gap])


def test_carbon_edge_leaves_vacuum_beyond_a_film_edge(spec: Specimen) -> None:
    edge = next(e for e in spec.conditions.edges if _alone(spec, e))
    od, x, y, kind = _frame(spec, edge.square_xy_um, 0.6)
    beyond = (kind == "carbon_edge") & ~spec.film_mask_xy(x, y)
    film = kind == "film"
    open_area = beyond.sum() + film.sum()
    assert 0.05 < beyond.sum() / open_area < 0.95
    assert np.median(od[beyond]) < 0.01 < 0.03 < np.median(od[film])
    assert np.all(spec.conditions.kind_xy(x[beyond], y[beyond]) == "carbon_edge")
    _not_a_crystal(spec, x[beyond], y[beyond])


def test_contamination_is_an_irregular_dark_patch(spec: Specimen) -> None:
    dirt = spec.conditions.contamination
    i = int(np.argmax(dirt["radius_um"] * (dirt["od"] > 0.8)))
    od, x, y, kind = _frame(spec, (dirt["x_um"][i], dirt["y_um"][i]), dirt["radius_um"][i] / 40.0)
    patch = kind == "contamination"
    assert patch.sum() > 500
    assert np.median(od[patch]) > np.median(od[kind == "film"]) + 0.3
    _not_a_crystal(spec, x[patch], y[patch])
    assert spec.truth_dict()["conditions"]["contamination"][i]["radius_um"] == pytest.approx(dirt["radius_um"][i])


def test_ice_gradient_darkens_the_square_where_the_truth_says(spec: Specimen) -> None:
    for gradient in [g for g in spec.conditions.gradients if _alone(spec, g)][:4]:
        od, x, y, kind = _frame(spec, gradient.square_xy_um, 0.6)
        thick, thin = kind == "ice_gradient", kind == "film"
        expected_od = ICE_OD_PER_NM * (np.median(spec.conditions._gradient_nm(gradient, x[thick], y[thick]))
                                       - np.median(spec.conditions._gradient_nm(gradient, x[thin], y[thin])))
        assert thick.sum() > 100 and thin.sum() > 100
        assert np.median(od[thick]) - np.median(od[thin]) > 0.5 * expected_od > 0.02
        _not_a_crystal(spec, x[thick], y[thick])


def test_stacked_plates_are_both_crystals_overlap_and_both_diffract(spec: Specimen) -> None:
    truth = spec.crystal_truth()
    tops = np.nonzero(spec.crystals["stacked_on"] >= 0)[0]
    assert tops.size > 10
    top = truth[int(tops[0])]
    below = truth[top.overlaps[0]]
    assert below.overlaps == (top.id,) or top.id in below.overlaps
    assert spec.truth_dict()["crystals"][top.id]["overlaps"] == list(top.overlaps)
    od, x, y, _ = _frame(spec, (top.x_um, top.y_um), 0.05, 240)
    in_top = spec.crystal_distance_um(np.int64(top.id), x, y) > 0.1
    in_below = spec.crystal_distance_um(np.int64(below.id), x, y) > 0.1
    both = in_top & in_below
    assert both.sum() > 10 and (in_top & ~in_below).sum() > 10
    assert np.median(od[both]) > max(np.median(od[in_top & ~in_below]), np.median(od[in_below & ~in_top]))
    i = np.argwhere(both)[len(np.argwhere(both)) // 2]
    contents = beam_contents(spec, float(x[i[0], i[1]]), float(y[i[0], i[1]]), 1.0)
    assert {top.id, below.id} <= set(contents["crystals"])  # type: ignore[arg-type]


def test_beam_drift_changes_frame_brightness_by_a_few_percent_and_is_off_by_default() -> None:
    means = {}
    for fraction in (0.0, 0.03):
        microscope = create_simulated_microscope("protein-plates", 1, camera_shape_px=(64, 64),
                                                 specimen_options={"crystal_count": 0}, beam_drift_fraction=fraction)
        microscope.set_preset("search")
        x, y = microscope.ground_truth.square_centres_um()[0]
        microscope.move_stage(x_um=float(x), y_um=float(y))
        means[fraction] = [float(microscope.acquire(0.5).image.mean()) for _ in range(8)]
    assert np.std(means[0.0]) / np.mean(means[0.0]) < 0.003
    assert 0.01 < np.std(means[0.03]) / np.mean(means[0.03]) < 0.08
    preset = microscope.sim_preset("search")
    assert drifted_preset(preset, 0.0, 1, ("k",)) is preset


def test_realistic_set_reaches_the_simulator() -> None:
    microscope = create_simulated_microscope("polymer-faint", 0, camera_shape_px=(32, 32), conditions="realistic")
    counts = microscope.ground_truth.conditions.counts()
    assert counts["fold"] == REALISTIC_CONDITIONS["specimen_options"]["fold_count"]
    assert counts["contamination"] == REALISTIC_CONDITIONS["specimen_options"]["contamination_count"]
    assert microscope._beam_drift == REALISTIC_CONDITIONS["beam_drift_fraction"]
