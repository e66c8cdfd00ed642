"""The procedural specimen: geometry, ground truth and its vectorised queries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drivers.base import InvalidParameterError
from simulator.specimen import (
    SPECIMEN_TYPES,
    Specimen,
    SpecimenError,
    generate_specimen,
)


@pytest.fixture(scope="module")
def specimens() -> dict[str, Specimen]:
    return {name: generate_specimen(name, 5) for name in SPECIMEN_TYPES}


def _footprint_points(spec: Specimen, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = spec.crystals
    angle = np.deg2rad(c["angle_deg"][ids])
    xs, ys = [c["x_um"][ids]], [c["y_um"][ids]]
    for fu, fv in ((0.45, 0.0), (-0.45, 0.0), (0.0, 0.45), (0.0, -0.45)):
        du, dv = fu * c["length_um"][ids], fv * c["width_um"][ids]
        xs.append(c["x_um"][ids] + du * np.cos(angle) - dv * np.sin(angle))
        ys.append(c["y_um"][ids] + du * np.sin(angle) + dv * np.cos(angle))
    return np.concatenate(xs), np.concatenate(ys)


def test_every_type_generates_crystals_on_film_only(specimens: dict[str, Specimen]) -> None:
    for name, spec in specimens.items():
        assert spec.crystal_count > 200, name
        x, y = _footprint_points(spec, np.arange(spec.crystal_count))
        assert spec.film_mask_xy(x, y).all(), f"{name}: a crystal lies off the film"
        assert not spec.bar_mask_xy(x, y).any(), f"{name}: a crystal lies on a bar"


def test_same_seed_same_specimen_other_seed_differs() -> None:
    a = generate_specimen("asbestos-fibres", 11, crystal_count=300)
    b = generate_specimen("asbestos-fibres", 11, crystal_count=300)
    c = generate_specimen("asbestos-fibres", 12, crystal_count=300)
    assert a.truth_dict() == b.truth_dict()
    assert a.truth_dict()["crystals"] != c.truth_dict()["crystals"]


def test_specimen_types_mirror_the_2018_data_sets(specimens: dict[str, Specimen]) -> None:
    def med(name: str, key: str) -> float:
        return float(np.median(specimens[name].crystals[key]))

    aspect = {n: float(np.median(s.crystals["length_um"] / s.crystals["width_um"])) for n, s in specimens.items()}
    assert aspect["asbestos-fibres"] > 10 > aspect["graphite-flakes"]
    assert med("graphite-flakes", "length_um") > 2 * med("protein-plates", "length_um")
    assert specimens["polymer-faint"].crystals["contrast"].max() < 0.07
    assert med("protein-plates", "contrast") > 3 * med("polymer-faint", "contrast")
    shapes = {t.shape for t in specimens["protein-plates"].crystal_truth()}
    assert {"plate", "block"} <= shapes


def test_clusters_and_square_states(specimens: dict[str, Specimen]) -> None:
    spec = specimens["protein-plates"]
    truth = spec.crystal_truth()
    clustered = [t for t in truth if t.cluster_id is not None]
    assert 0 < len(clustered) < len(truth)
    members = [t for t in clustered if t.cluster_id == clustered[0].cluster_id]
    assert len(members) >= 2
    spread = np.ptp([m.x_um for m in members]) + np.ptp([m.y_um for m in members])
    assert spread < 200.0  # members lie together
    states = {s.state for s in spec.squares()}
    assert {"intact", "broken", "empty"} <= states


def test_crystal_id_matches_brute_force(specimens: dict[str, Specimen]) -> None:
    spec = specimens["graphite-flakes"]
    rng = np.random.default_rng(0)
    # points near crystals (so that hits are frequent) and uniform points
    ids = rng.integers(0, spec.crystal_count, size=1500)
    x = np.concatenate([spec.crystals["x_um"][ids] + rng.normal(0, 8, 1500), rng.uniform(-1200, 1200, 1000)])
    y = np.concatenate([spec.crystals["y_um"][ids] + rng.normal(0, 8, 1500), rng.uniform(-1200, 1200, 1000)])
    for tolerance in (0.0, 3.0):
        fast = spec.crystal_id_xy(x, y, tolerance_um=tolerance)
        all_ids = np.arange(spec.crystal_count)
        inside = spec.crystal_distance_um(all_ids[None, :], x[:, None], y[:, None]) >= -tolerance
        brute = np.where(inside.any(axis=1), np.where(inside, all_ids[None, :], -1).max(axis=1), -1)
        np.testing.assert_array_equal(fast, brute)
        assert (fast >= 0).sum() > 250
    assert spec.crystal_id_xy(np.float64(5000.0), np.float64(0.0)) == -1
    with pytest.raises(InvalidParameterError):
        spec.crystal_id_xy(x, y, tolerance_um=50.0)


def test_crystal_id_at_centres_and_tolerance(specimens: dict[str, Specimen]) -> None:
    spec = specimens["protein-plates"]
    c = spec.crystals
    ids = spec.crystal_id_xy(c["x_um"], c["y_um"])
    assert (ids >= 0).all()
    assert (ids == np.arange(spec.crystal_count)).mean() > 0.9  # the rest are covered by an overlapping crystal
    # a point 2 um beyond the tip of a lone crystal: outside, but within a 3 um tolerance
    lone = next(t for t in spec.crystal_truth() if len(spec.crystals_near(t.x_um, t.y_um, 15.0)) == 1)
    a = np.deg2rad(lone.angle_deg)
    px = lone.x_um + (lone.length_um / 2 + 2.0) * np.cos(a)
    py = lone.y_um + (lone.length_um / 2 + 2.0) * np.sin(a)
    assert spec.crystal_id_xy(px, py) == -1
    assert spec.crystal_id_xy(px, py, tolerance_um=3.0) == lone.id


def test_crystals_in_box_and_squares(specimens: dict[str, Specimen]) -> None:
    spec = specimens["protein-plates"]
    box = (-300.0, 100.0, -50.0, 400.0)
    found = spec.crystals_in_box(*box)
    c = spec.crystals
    in_x = (c["x_um"] >= box[0]) & (c["x_um"] <= box[1])
    expected = np.nonzero(in_x & (c["y_um"] >= box[2]) & (c["y_um"] <= box[3]))[0]
    assert [t.id for t in found] == list(expected)
    assert len(found) > 5

    centres = spec.square_centres_um()
    assert centres.shape[1] == 2 and len(centres) > 150
    assert spec.film_mask_xy(centres[:, 0], centres[:, 1]).mean() > 0.95  # intact squares have film at the centre
    square = spec.square_at_xy(*centres[0])
    assert square is not None and square.state == "intact"
    assert np.hypot(square.x_um - centres[0, 0], square.y_um - centres[0, 1]) < 1e-6
    # half a pitch from a centre along the mesh axis lies on a bar
    angle = np.deg2rad(spec.mesh_angle_deg)
    bar_x = centres[0, 0] + spec.pitch_um / 2 * np.cos(angle)
    bar_y = centres[0, 1] + spec.pitch_um / 2 * np.sin(angle)
    assert spec.bar_mask_xy(bar_x, bar_y)
    assert spec.square_at_xy(bar_x, bar_y) is None
    assert spec.bar_mask_xy(np.array([1600.0, 0.0]), np.array([0.0, 1600.0])).all()  # outside the grid


def test_truth_dict_is_json(specimens: dict[str, Specimen]) -> None:
    truth = json.loads(json.dumps(specimens["polymer-faint"].truth_dict()))
    assert truth["specimen_type"] == "polymer-faint"
    assert len(truth["crystals"]) == specimens["polymer-faint"].crystal_count
    assert truth["grid"]["pitch_um"] == 125.0 and truth["grid"]["diameter_um"] == 3050.0
    first = truth["crystals"][0]
    assert set(first) >= {"id", "x_um", "y_um", "length_um", "width_um", "angle_deg", "shape", "contrast",
                          "diffracts", "diffraction_quality", "cluster_id"}
    assert 0.0 <= first["diffraction_quality"] <= 1.0


def test_bad_type_and_options_are_typed_errors() -> None:
    with pytest.raises(SpecimenError, match="unknown specimen type"):
        generate_specimen("diamonds", 0)
    with pytest.raises(SpecimenError, match="invalid specimen options"):
        generate_specimen("protein-plates", 0, mesh_pitch_um=20.0, bar_width_um=30.0)
    with pytest.raises(SpecimenError, match="invalid specimen options"):
        generate_specimen("protein-plates", 0, colour="red")
    with pytest.raises(SpecimenError, match="seed"):
        generate_specimen("protein-plates", -1)
    custom = generate_specimen("protein-plates", 0, mesh_pitch_um=90.0, bar_width_um=25.0, crystal_count=50,
                               mesh_angle_deg=0.0)
    assert custom.crystal_count == 50 and custom.pitch_um == 90.0 and custom.mesh_angle_deg == 0.0
