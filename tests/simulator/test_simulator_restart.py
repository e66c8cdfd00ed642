"""A simulator started where another stopped continues as that one would have (`simulator.keyed`).

The noise of a frame and the stage's repeat error are keyed by what was acquired or moved and when, so a
second simulator told the first one's microscope time, stage position and preset gives the same frames,
the same specimen positions and the same times for the same calls, whatever the first one did before.
"""

from __future__ import annotations

import numpy as np

from drivers.base import Frame, StagePosition
from simulator import create_simulated_microscope
from simulator.microscope import SimulatedMicroscope

CAMERA = (64, 64)


def _simulator(**start: object) -> SimulatedMicroscope:
    return create_simulated_microscope("protein-plates", seed=4, camera_shape_px=CAMERA, **start)


def _work(scope: SimulatedMicroscope) -> list[tuple[Frame, tuple[float, float], float]]:
    """A few calls a step might make: frame, image and stage after each move."""
    seen = []
    for x_um, y_um, preset in ((30.0, -12.0, "search"), (31.5, -12.0, "search"), (31.5, -12.0, "atlas")):
        scope.set_preset(preset)
        scope.move_stage(x_um=x_um - 5.0, y_um=y_um - 5.0)
        scope.move_stage(x_um=x_um, y_um=y_um)
        seen.append((scope.acquire(0.5), scope.true_stage_xy_um(), scope.microscope_time_s()))
    seen.append((scope.acquire_diffraction(1.0), scope.true_stage_xy_um(), scope.microscope_time_s()))
    return seen


def test_a_restarted_simulator_continues_as_the_first_would_have() -> None:
    first = _simulator()
    first.set_preset("atlas")
    first.move_stage(x_um=-40.0, y_um=20.0)
    first.acquire(0.5)
    first.move_stage(x_um=10.0, y_um=5.0)  # where the "kill" happens: stage here, this time, this preset
    checkpoint = (first.microscope_time_s(), first.get_stage(), first.get_preset())
    uninterrupted = _work(first)

    restarted = _simulator(start_time_s=checkpoint[0], start_stage=checkpoint[1], initial_preset=checkpoint[2])
    assert restarted.get_stage() == checkpoint[1] and restarted.microscope_time_s() == checkpoint[0]
    resumed = _work(restarted)

    for (frame_a, true_a, time_a), (frame_b, true_b, time_b) in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(frame_a.image, frame_b.image)
        assert true_a == true_b and time_a == time_b
        assert frame_a.metadata.stage == frame_b.metadata.stage


def test_frames_at_one_place_with_one_setting_still_differ_in_noise() -> None:
    scope = _simulator()
    scope.set_preset("search")
    scope.move_stage(x_um=12.0, y_um=7.0)
    a, b = scope.acquire(0.5), scope.acquire(0.5)
    assert a.metadata.stage == b.metadata.stage
    assert not np.array_equal(a.image, b.image)


def test_the_repeat_error_of_a_move_does_not_depend_on_the_moves_before() -> None:
    """Two simulators reach the same move at the same microscope time by different histories."""
    a = _simulator(start_time_s=100.0)
    b = _simulator(start_time_s=40.0, start_stage=StagePosition(x_um=-300.0, y_um=0.0))
    b.move_stage(x_um=0.0, y_um=0.0)  # a different history, ending at the origin
    b.clock.advance_to(100.0)
    a.move_stage(x_um=25.0, y_um=25.0)
    b.move_stage(x_um=25.0, y_um=25.0)
    assert a.true_stage_xy_um() == b.true_stage_xy_um() != (25.0, 25.0)
