"""Stage mechanics and the virtual clock: every move, preset change, blank and exposure costs time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from drivers.base import InvalidParameterError, StageLimitError, StageMoveError
from simulator import create_simulated_microscope
from simulator.microscope import SimulatedMicroscope
from simulator.stage import StageModel, VirtualClock, profile_time_s
from simulator.timing import PROFILES

CLOCK = PROFILES["thermo-serialem"]


@pytest.fixture()
def scope() -> SimulatedMicroscope:
    return create_simulated_microscope("protein-plates", seed=2, camera_shape_px=(128, 128),
                                       specimen_options={"crystal_count": 100})


def test_profile_time_trapezoid_and_triangle() -> None:
    # 300 um at 150 um/s, 300 um/s^2: 0.5 s up, 0.5 s down (75 um), 225 um at full speed (1.5 s)
    assert profile_time_s(300.0, 150.0, 300.0) == pytest.approx(2.5)
    # 30 um: never reaches full speed, 2 sqrt(d / a)
    assert profile_time_s(30.0, 150.0, 300.0) == pytest.approx(2 * np.sqrt(0.1))
    assert profile_time_s(0.0, 150.0, 300.0) == 0.0


def test_move_costs_distance_over_speed_and_settles_before_the_next_exposure(scope: SimulatedMicroscope) -> None:
    model = StageModel()
    t0 = scope.microscope_time_s()
    scope.move_stage(x_um=300.0, y_um=-100.0)
    motion_s = profile_time_s(300.0, model.xy_speed_um_s, model.xy_accel_um_s2)
    expected = model.command_overhead_s + motion_s
    assert scope.microscope_time_s() - t0 == pytest.approx(expected)  # settling is not part of the move
    pos = scope.get_stage()
    assert (pos.x_um, pos.y_um) == (300.0, -100.0)
    assert not scope.is_stage_moving()
    # a longer move costs more
    t1 = scope.microscope_time_s()
    scope.move_stage(x_um=-900.0)
    assert scope.microscope_time_s() - t1 > expected


def test_exposure_preset_and_blank_costs(scope: SimulatedMicroscope) -> None:
    t0 = scope.microscope_time_s()
    frame = scope.acquire(0.7)
    readout = CLOCK.frame_return_s(128 * 128 / 1e6)
    assert scope.microscope_time_s() - t0 == pytest.approx(CLOCK.camera_start_s + 0.7 + readout)
    assert frame.metadata.time_s == pytest.approx(t0 + CLOCK.camera_start_s + 0.7)  # end of the exposure
    t1 = scope.microscope_time_s()
    scope.set_preset("search")
    scope.acquire(0.7)  # waits for the lens normalisation
    assert scope.microscope_time_s() - t1 == pytest.approx(
        CLOCK.command_overhead_s + CLOCK.lens_normalisation_s + CLOCK.camera_start_s + 0.7 + readout)
    t3 = scope.microscope_time_s()
    scope.set_beam_blanked(True)
    assert scope.microscope_time_s() - t3 == pytest.approx(CLOCK.beam_blank_s)
    scope.set_beam_blanked(False)
    t4 = scope.microscope_time_s()
    scope.acquire_diffraction(1.0)  # switch in before it; the switch back waits before the next image
    assert scope.microscope_time_s() - t4 == pytest.approx(CLOCK.diffraction_switch_s + CLOCK.camera_start_s + 1.0
                                                           + readout)
    t5 = scope.microscope_time_s()
    scope.acquire(0.7)
    assert scope.microscope_time_s() - t5 == pytest.approx(CLOCK.diffraction_switch_s + CLOCK.camera_start_s + 0.7
                                                           + readout)


def test_move_without_wait_completes_in_clock_time(scope: SimulatedMicroscope) -> None:
    scope.move_stage(x_um=0.0, y_um=0.0)
    start = scope.microscope_time_s()
    scope.move_stage(x_um=400.0, wait=False)
    assert scope.microscope_time_s() - start < 0.5  # returned at once
    assert scope.is_stage_moving()
    halfway = scope.get_stage().x_um
    assert 0.0 <= halfway < 400.0
    polls = 0
    while scope.is_stage_moving() and polls < 10_000:  # each poll costs clock time, so this ends
        polls += 1
    assert 10 < polls < 10_000
    assert scope.get_stage().x_um == 400.0
    # wait_for_stage advances the clock to the end of a move
    scope.move_stage(x_um=0.0, wait=False)
    scope.wait_for_stage()
    assert not scope.is_stage_moving() and scope.get_stage().x_um == 0.0
    # a timeout shorter than the move raises, and the stage keeps going
    scope.move_stage(x_um=1000.0, wait=False)
    with pytest.raises(StageMoveError, match="still moving"):
        scope.wait_for_stage(timeout_s=0.5)
    scope.wait_for_stage(timeout_s=60.0)
    assert scope.get_stage().x_um == 1000.0


def test_stop_stage_stops_between_start_and_target(scope: SimulatedMicroscope) -> None:
    scope.move_stage(x_um=-500.0, y_um=0.0)
    scope.move_stage(x_um=500.0, wait=False)
    scope.clock.advance(2.0)
    scope.stop_stage()
    pos = scope.get_stage()
    assert -500.0 < pos.x_um < 500.0
    assert not scope.is_stage_moving()
    scope.stop_stage()  # safe when idle
    assert scope.get_stage() == pos


def test_limits_are_checked_before_anything_moves(scope: SimulatedMicroscope) -> None:
    scope.move_stage(x_um=10.0, y_um=20.0)
    before, t0 = scope.get_stage(), scope.microscope_time_s()
    limits = scope.stage_limits()
    for target in ({"x_um": limits.x_max_um + 1}, {"y_um": limits.y_min_um - 1}, {"alpha_deg": 80.0},
                   {"z_um": 400.0}):
        with pytest.raises(StageLimitError, match="outside"):
            scope.move_stage(**target)
    for bad in ({"x_um": float("nan")}, {"y_um": "3"}, {"x_um": float("inf")}, {"z_um": True}):
        with pytest.raises(InvalidParameterError):
            scope.move_stage(**bad)
    assert scope.get_stage() == before and scope.microscope_time_s() == t0
    with pytest.raises(InvalidParameterError):
        scope.wait_for_stage(timeout_s=-1.0)


def test_backlash_depends_on_approach_direction() -> None:
    model = StageModel(backlash_um=1.0, repeat_error_um=0.02)
    scope = create_simulated_microscope("protein-plates", seed=4, camera_shape_px=(64, 64), stage_model=model,
                                        specimen_options={"crystal_count": 10})
    from_below, from_above = [], []
    for _ in range(5):
        scope.move_stage(x_um=-100.0, y_um=-100.0)
        scope.move_stage(x_um=0.0, y_um=0.0)  # approach moving +x, +y
        from_below.append(scope.true_stage_xy_um())
        scope.move_stage(x_um=100.0, y_um=100.0)
        scope.move_stage(x_um=0.0, y_um=0.0)  # approach moving -x, -y
        from_above.append(scope.true_stage_xy_um())
        assert scope.get_stage().x_um == 0.0  # the encoder reports the target either way
    below, above = np.array(from_below), np.array(from_above)
    assert np.abs(below).max() < 0.1  # a fixed approach direction repeats to the repeat error
    np.testing.assert_allclose(above - below, 1.0, atol=0.15)


def test_virtual_clock_only_moves_forward_and_can_sleep() -> None:
    clock = VirtualClock()
    clock.advance(1.5)
    clock.advance_to(1.0)  # the past: no change
    assert clock.now_s() == 1.5
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    real = VirtualClock(realtime=True)
    wall = time.monotonic()
    real.advance(0.05)
    assert time.monotonic() - wall >= 0.045
    assert real.now_s() >= 0.05  # follows the wall clock


def test_realtime_move_is_seen_in_progress_from_another_thread() -> None:
    model = StageModel(xy_speed_um_s=500.0, xy_accel_um_s2=5000.0, settle_s=0.05)
    scope = create_simulated_microscope("protein-plates", seed=1, camera_shape_px=(32, 32), realtime=True,
                                        stage_model=model, specimen_options={"crystal_count": 10})
    mover = threading.Thread(target=scope.move_stage, kwargs={"x_um": 100.0})
    mover.start()
    seen = []
    deadline = time.monotonic() + 5.0
    while mover.is_alive() and time.monotonic() < deadline:
        seen.append(scope.get_stage().x_um)  # not blocked by the waiting move
        time.sleep(0.01)
    mover.join(timeout=5.0)
    assert not mover.is_alive()
    assert any(0.0 < x < 100.0 for x in seen)
    assert scope.get_stage().x_um == 100.0 and scope.microscope_time_s() >= 0.25
