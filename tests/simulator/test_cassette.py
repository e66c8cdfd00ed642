"""The simulated autoloader cassette: slots and their states, load time on the clock, a new placement after every
reload (measured on images of one crystal), ground truth that follows the grid, bad slots, the default cassette
and the cassette file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import simulator
from drivers.base import CassetteMicroscope, GridLoadError, InvalidParameterError, cassette_slot_count
from simulator.cassette import (
    DEFAULT_LOAD_S,
    DEFAULT_UNLOAD_S,
    CassetteSpec,
    CassetteSpecError,
    SimulatedCassetteMicroscope,
    SlotSpec,
    default_cassette,
    grid_placement,
    load_cassette_spec,
)
from simulator.conditions import what_is_at_xy
from simulator.specimen import CrystalTruth, Specimen

SPEC = CassetteSpec(
    slots=(
        SlotSpec(slot=1, specimen_type="asbestos-fibres", seed=4, options={"crystal_count": 300}, label="fibres"),
        SlotSpec(slot=2, specimen_type="graphite-flakes", seed=5, options={"crystal_count": 50}),
        SlotSpec(slot=4, specimen_type="protein-plates", seed=6, fails_to_load=True),
    ),
    seed=3,
)


def _microscope(**options: object) -> SimulatedCassetteMicroscope:
    m = simulator.create_simulated_microscope(cassette=SPEC, seed=1, camera_shape_px=(512, 512), camera_noise=False,
                                              initial_preset="search", **options)
    assert isinstance(m, SimulatedCassetteMicroscope)
    return m


def _isolated_rod(truth: Specimen) -> CrystalTruth:
    """A clearly visible rod with nothing else within 12 um (its image orientation is then easy to measure)."""
    for c in truth.crystal_truth():
        alone = truth.crystals_near(c.x_um, c.y_um, 12).size == 1
        if c.shape == "rod" and 8 < c.length_um < 15 and c.contrast > 0.4 and alone:
            return c
    raise AssertionError("no isolated rod on the test grid")


def _dark_blob(image: np.ndarray) -> tuple[float, np.ndarray]:
    """Orientation (deg, mod 180, image axes) of the dark region's long axis and its centroid (col, row) px."""
    rows, cols = np.nonzero(image.astype(np.float64) < 0.6 * np.median(image))
    centroid = np.array([cols.mean(), rows.mean()])
    values, vectors = np.linalg.eigh(np.cov(np.stack([cols - centroid[0], rows - centroid[1]])))
    axis = vectors[:, int(np.argmax(values))]
    return float(np.degrees(np.arctan2(axis[1], axis[0])) % 180.0), centroid


def _image_at(m: SimulatedCassetteMicroscope, x_um: float, y_um: float) -> np.ndarray:
    m.move_stage(x_um=x_um, y_um=y_um)
    return np.asarray(m.acquire(0.5).image)


def test_slots_states_and_the_capability() -> None:
    m = _microscope()
    assert isinstance(m, CassetteMicroscope) and cassette_slot_count(m) == 12 and m.info().cassette_slots == 12
    states = {s.slot: s.state for s in m.cassette_slots()}
    assert [s.slot for s in m.cassette_slots()] == list(range(1, 13))
    assert states[1] == states[2] == states[4] == "occupied" and states[3] == states[12] == "empty"
    assert m.cassette_slots()[0].label == "fibres"
    assert m.loaded_slot() is None and m.ground_truth is None
    m.load_grid(2)
    assert m.loaded_slot() == 2 and m.cassette_slots()[1].state == "loaded"
    assert m.acquire(0.5).metadata.extra["specimen"] == "graphite-flakes"


def test_a_load_costs_its_time_on_the_clock_and_loading_the_same_slot_again_nothing() -> None:
    m = _microscope()
    t0 = m.microscope_time_s()
    m.load_grid(1)
    t1 = m.microscope_time_s()
    assert t1 - t0 == pytest.approx(DEFAULT_LOAD_S)  # the stage held no grid: nothing to unload
    m.load_grid(1)
    assert m.microscope_time_s() == t1 and m.load_counts() == {1: 1}
    m.load_grid(2)
    assert m.microscope_time_s() - t1 == pytest.approx(DEFAULT_UNLOAD_S + DEFAULT_LOAD_S)
    assert m.get_stage().x_um == 0.0 and m.get_stage().y_um == 0.0  # the stage comes back at the origin


def test_a_reload_turns_and_moves_the_grid_seen_on_images_of_one_crystal_and_truth_follows() -> None:
    m = _microscope()
    m.load_grid(1)
    first = m.grid_placement()
    rod = _isolated_rod(m.ground_truth)  # type: ignore[arg-type]
    angle_before, centre_before = _dark_blob(_image_at(m, rod.x_um, rod.y_um))
    assert np.hypot(*(centre_before - 255.5)) < 40  # imaged where the truth says it is

    m.load_grid(2)
    m.load_grid(1)  # the same grid again: load number 2 of slot 1
    second = m.grid_placement()
    assert first is not None and second is not None and m.load_counts() == {1: 2, 2: 1}
    turn_deg = second.rotation_deg - first.rotation_deg
    moved = m.ground_truth.crystal_truth()[rod.id]  # type: ignore[union-attr]
    shift_um = float(np.hypot(moved.x_um - rod.x_um, moved.y_um - rod.y_um))
    assert abs(turn_deg) > 0.5 and shift_um > 5.0

    # at the old stage coordinates the crystal is gone; at the truth's new ones it is there, turned with the grid
    assert int(m.ground_truth.crystal_id_xy(np.array([rod.x_um]), np.array([rod.y_um]), 1.0)[0]) != rod.id  # type: ignore[union-attr]
    old_place = _image_at(m, rod.x_um, rod.y_um)
    assert (old_place[200:312, 200:312] < 0.6 * np.median(old_place)).mean() < 0.05
    angle_after, centre_after = _dark_blob(_image_at(m, moved.x_um, moved.y_um))
    assert np.hypot(*(centre_after - 255.5)) < 40
    measured = (angle_after - angle_before + 90.0) % 180.0 - 90.0
    assert measured == pytest.approx(turn_deg, abs=0.5)
    assert what_is_at_xy(m.ground_truth, np.array([moved.x_um]), np.array([moved.y_um]))[0] == "crystal"  # type: ignore[arg-type]


def test_placements_are_reproducible_and_a_restarted_simulator_shows_the_same_grid() -> None:
    assert grid_placement(3, 1, 2) == grid_placement(3, 1, 2) != grid_placement(3, 1, 1)
    m = _microscope()
    m.load_grid(1)
    m.load_grid(2)
    m.load_grid(1)
    again = _microscope(loaded_slot=1, load_counts=m.load_counts(), start_time_s=m.microscope_time_s())
    assert again.loaded_slot() == 1 and again.grid_placement() == m.grid_placement()
    assert np.array_equal(_image_at(again, 100.0, 50.0), _image_at(m, 100.0, 50.0))


def test_the_camera_calibration_does_not_change_with_the_grid() -> None:
    m = _microscope()
    m.load_grid(1)
    before = m.true_image_to_stage_matrix("search")
    m.load_grid(2)
    assert np.array_equal(m.true_image_to_stage_matrix("search"), before)


def test_bad_slots_fail_with_typed_errors_and_lose_nothing() -> None:
    m = _microscope()
    m.load_grid(2)
    t0 = m.microscope_time_s()
    with pytest.raises(GridLoadError, match="slot 3 is empty"):
        m.load_grid(3)
    assert m.loaded_slot() == 2 and m.ground_truth is not None  # the transfer never started
    assert m.microscope_time_s() - t0 < 1.0
    for bad in (0, 13, "3", 2.0, True):
        with pytest.raises(InvalidParameterError):
            m.load_grid(bad)  # type: ignore[arg-type]
    assert m.loaded_slot() == 2
    with pytest.raises(GridLoadError, match="slot 4 failed"):
        m.load_grid(4)
    assert m.loaded_slot() is None and m.ground_truth is None
    assert m.cassette_slots()[3].state == "unknown"
    assert m.acquire(0.5).image.min() > 1000  # no grid: the open holder, vacuum
    m.load_grid(1)  # the session goes on with the next grid
    assert m.loaded_slot() == 1


def test_the_default_cassette_is_varied() -> None:
    spec = default_cassette(7)
    grids = [s for s in spec.slots if not s.empty]
    assert spec.slot_count == 12 and len(grids) == 10  # two empty slots
    assert len({s.specimen_type for s in grids}) >= 3
    assert any(s.options.get("broken_fraction", 0) >= 0.3 for s in grids)  # poor grids
    assert any(s.options.get("crystal_count", 1000) < 100 for s in grids)
    assert any(s.options == {} for s in grids)  # good ones
    assert len({s.seed for s in grids}) == 10
    assert default_cassette(7) == spec and [s.slot for s in default_cassette(8).slots] != [s.slot for s in grids]


def test_a_cassette_file_round_trips_and_bad_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "cassette.json"
    path.write_text(SPEC.to_json())
    assert load_cassette_spec(path) == SPEC
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"slot": 2, "specimen_type": "polymer-faint", "seed": 9}]))
    spec = load_cassette_spec(listed)
    assert spec.slot(2).specimen_type == "polymer-faint" and spec.slot(5).empty
    m = simulator.create_simulated_microscope(cassette=str(listed), camera_shape_px=(64, 64))
    m.load_grid(2)  # type: ignore[attr-defined]
    assert m.ground_truth is not None and m.ground_truth.specimen_type == "polymer-faint"
    for bad, reason in (
        ([{"slot": 13, "specimen_type": "polymer-faint"}], "do not exist"),
        ([{"slot": "2", "specimen_type": "polymer-faint"}], "slot"),
        ([{"slot": 1, "specimen_type": "quartz"}], "unknown specimen type"),
        ([{"slot": 1, "specimen_type": "polymer-faint", "options": {"broken_fraction": 2}}], "options"),
        ([{"slot": 1}, {"slot": 1}], "twice"),
        ("12 grids", "list of slots"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(CassetteSpecError, match=reason):
            load_cassette_spec(path)
    with pytest.raises(CassetteSpecError, match="cannot read"):
        load_cassette_spec(tmp_path / "missing.json")


def test_every_ground_truth_query_follows_the_placed_grid() -> None:
    spec = CassetteSpec(slots=(SlotSpec(slot=1, specimen_type="protein-plates", seed=5),), seed=2)
    m = simulator.create_simulated_microscope(cassette=spec, camera_shape_px=(64, 64), conditions="realistic",
                                              loaded_slot=1)
    truth = m.ground_truth
    assert truth is not None and truth.placement.rotation_deg != 0.0  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1000, 1000, 2000), rng.uniform(-1000, 1000, 2000)
    in_grid_frame = truth.to_grid(x, y)  # type: ignore[attr-defined]
    # the placed truth in stage um answers as the generated specimen does at the same grid point: bars, film,
    # film defects, ice balls, debris outlines (turned with the grid) and crystals
    kinds = what_is_at_xy(truth, x, y)
    assert np.array_equal(kinds, what_is_at_xy(truth.grid, *in_grid_frame))  # type: ignore[attr-defined]
    assert {"bar", "film", "crystal", "debris", "fold"} <= set(kinds)
    square = truth.square_at_xy(float(x[kinds == "film"][0]), float(y[kinds == "film"][0]))
    assert square is not None and truth.bar_mask_xy(np.array([square.x_um]), np.array([square.y_um]))[0] == False  # noqa: E712
