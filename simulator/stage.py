"""The simulated stage and the virtual clock.

`VirtualClock` is the simulator's notion of instrument time (seconds). Every move, preset change,
beam blank, status poll and exposure advances it by what it would cost on a real instrument. With
`realtime=True` the clock also really sleeps for each advance, so a session runs at instrument pace.

`SimulatedStage` models a goniometer stage:
- limits (checked before anything moves: `StageLimitError`);
- motion time per axis: trapezoidal profile (max speed, acceleration), axes in parallel; settling
  (drift decay) is not part of the move: `settled_at_s` says when the stage is settled (end of the last
  motion + `settle_s`), and the microscope's next exposure waits for it, once (as SerialEM's
  `StageMoveDelay`); the figures come from a `simulator.timing.TimingProfile`;
- backlash: the last approach direction along x and y leaves the specimen `backlash_um` short of the
  target when approached from the negative side (moving towards -x or -y); approaching from the
  positive direction (moving towards +x/+y) is exact, so a fixed approach direction removes it;
- a small random repeat error (Gaussian) on every x/y move, drawn from a generator keyed by the seed, the
  move's target and its start time (`simulator.keyed`), not by how many moves came before, so that a
  simulator restarted where another stopped (`start`, and the clock's `start_s`) moves as it would have.

The stage *reports* the encoder position (the commanded target, or where it stopped); the specimen
sits at the *true* position = reported + backlash + repeat error, which is what the camera sees.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from drivers.base import StageLimits, StageMoveError, StagePosition
from simulator.keyed import POSITION_QUANTUM_UM, TIME_QUANTUM_S, keyed_rng, quantise

log = logging.getLogger(__name__)


class VirtualClock:
    """Seconds of instrument time.

    Virtual (default): time stands still until `advance` moves it on, so a session runs as fast as the
    computer allows while every step is accounted. Realtime: the clock follows the wall clock
    (monotonic) from its start, and `advance` sleeps until the target time, so other threads see time
    pass (e.g. a moving stage) while one call waits. Thread-safe.
    """

    def __init__(self, realtime: bool = False, start_s: float = 0.0) -> None:
        self.realtime = realtime
        self._start_s = float(start_s)
        self._now_s = float(start_s)
        self._wall0 = time.monotonic()
        self._lock = threading.Lock()

    def now_s(self) -> float:
        """Current instrument time in seconds."""
        if self.realtime:
            return self._start_s + (time.monotonic() - self._wall0)
        return self._now_s

    def advance(self, seconds: float) -> float:
        """Advance the clock by `seconds` (>= 0) and return the new time; sleeps that long if realtime."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"the clock can only advance by a finite, non-negative time, got {seconds}")
        if self.realtime:
            return self._sleep_until(self.now_s() + seconds)
        with self._lock:
            self._now_s += seconds
            return self._now_s

    def advance_to(self, t_s: float) -> float:
        """Advance the clock to `t_s` if that lies in the future; return the new time."""
        if self.realtime:
            return self._sleep_until(t_s)
        with self._lock:
            self._now_s = max(self._now_s, float(t_s))
            return self._now_s

    def _sleep_until(self, t_s: float) -> float:
        while True:
            left = t_s - self.now_s()
            if left <= 0:
                return self.now_s()
            time.sleep(left)


@dataclass(frozen=True)
class StageModel:
    """Stage mechanics: speeds (um/s, deg/s), accelerations (um/s^2, deg/s^2), settling before the next
    exposure (s), backlash and repeat error (um), status poll cost (s). The defaults are those of the
    `thermo-serialem` timing profile (`simulator.timing`, where their sources are)."""

    xy_speed_um_s: float = 150.0
    xy_accel_um_s2: float = 300.0
    z_speed_um_s: float = 20.0
    z_accel_um_s2: float = 40.0
    alpha_speed_deg_s: float = 10.0
    alpha_accel_deg_s2: float = 20.0
    settle_s: float = 2.0
    command_overhead_s: float = 0.05
    backlash_um: float = 0.6
    repeat_error_um: float = 0.15
    poll_s: float = 0.02


def profile_time_s(distance: float, speed: float, accel: float) -> float:
    """Duration (s) of a trapezoidal (or triangular) move of `distance` with max `speed` and `accel`."""
    distance = abs(distance)
    if distance == 0:
        return 0.0
    ramp = speed / accel  # time to reach full speed
    ramp_distance = speed * ramp  # distance of accelerating + decelerating at full profile
    if distance <= ramp_distance:
        return 2.0 * math.sqrt(distance / accel)
    return 2.0 * ramp + (distance - ramp_distance) / speed


def profile_fraction(t: float, duration: float, distance: float, speed: float, accel: float) -> float:
    """Fraction (0..1) of a trapezoidal move of `distance` covered `t` seconds after its start."""
    distance = abs(distance)
    if distance == 0 or duration <= 0 or t >= duration:
        return 1.0
    if t <= 0:
        return 0.0
    peak = min(speed, math.sqrt(distance * accel))
    ramp = peak / accel
    if t <= ramp:
        covered = 0.5 * accel * t * t
    elif t <= duration - ramp:
        covered = 0.5 * accel * ramp * ramp + peak * (t - ramp)
    else:
        left = duration - t
        covered = distance - 0.5 * accel * left * left
    return min(max(covered / distance, 0.0), 1.0)


class SimulatedStage:
    """A stage with limits, motion time, settling, backlash and repeat error on a `VirtualClock`."""

    def __init__(
        self, clock: VirtualClock, limits: StageLimits, model: StageModel, seed: int = 0,
        start: StagePosition | None = None,
    ) -> None:
        """A stage at `start` (default the origin; checked against `limits`), approached last from -x/-y."""
        self.clock = clock
        self.limits = limits
        self.model = model
        self._seed = int(seed)
        if start is not None:
            limits.check(start)
        self._reported = start if start is not None else StagePosition(x_um=0.0, y_um=0.0)
        self._error_xy_um = np.zeros(2)  # true - reported, after the last move
        self._last_direction = np.ones(2)  # +1: last approach from the negative side (moving +)
        self._move: _Move | None = None
        self.settled_at_s = clock.now_s()  # end of the last motion + settle_s: the next exposure waits for it

    # state ----------------------------------------------------------------------------------------
    def _update(self) -> None:
        """Finish a move whose end time has passed."""
        if self._move is not None and self.clock.now_s() >= self._move.end_s:
            self._reported = self._move.target
            self._move = None

    def is_moving(self) -> bool:
        """True until the clock passes the end of the current move (motion only; settling is `settled_at_s`)."""
        self._update()
        return self._move is not None

    def position(self) -> StagePosition:
        """The reported (encoder) position; during a move, where the stage is on its way."""
        self._update()
        if self._move is None:
            return self._reported
        return self._move.position_at(self.clock.now_s())

    def true_xy_um(self) -> tuple[float, float]:
        """Where the specimen really is (reported position + backlash + repeat error), um."""
        pos = self.position()
        return (pos.x_um + float(self._error_xy_um[0]), pos.y_um + float(self._error_xy_um[1]))

    def move_end_s(self) -> float | None:
        """Clock time at which the current move ends, or None when idle."""
        self._update()
        return None if self._move is None else self._move.end_s

    # commands -------------------------------------------------------------------------------------
    def start_move(self, target: StagePosition, fail_fraction: float | None = None) -> float:
        """Start a move to `target` (checked against the limits first); return its duration in seconds.

        With `fail_fraction` the move stops that fraction of the way and raises `StageMoveError` after
        the clock has advanced to the stop; the stage then reports where it really stopped.
        """
        self.limits.check(target)
        start = self.position()
        self._move = None
        self._reported = start
        m = self.model
        dx, dy = target.x_um - start.x_um, target.y_um - start.y_um
        duration = max(
            profile_time_s(dx, m.xy_speed_um_s, m.xy_accel_um_s2),
            profile_time_s(dy, m.xy_speed_um_s, m.xy_accel_um_s2),
            profile_time_s(target.z_um - start.z_um, m.z_speed_um_s, m.z_accel_um_s2),
            profile_time_s(target.alpha_deg - start.alpha_deg, m.alpha_speed_deg_s, m.alpha_accel_deg_s2),
        )
        moves_xy = dx != 0 or dy != 0
        if fail_fraction is not None:
            stop = StagePosition(
                x_um=start.x_um + fail_fraction * dx,
                y_um=start.y_um + fail_fraction * dy,
                z_um=start.z_um + fail_fraction * (target.z_um - start.z_um),
                alpha_deg=start.alpha_deg + fail_fraction * (target.alpha_deg - start.alpha_deg),
            )
            self.clock.advance(m.command_overhead_s + fail_fraction * duration)
            self.settled_at_s = self.clock.now_s() + m.settle_s
            self._reported = stop
            self._error_xy_um = self._error_xy_um + self._repeat_error_um(target)
            raise StageMoveError(
                f"stage move to ({target.x_um:.2f}, {target.y_um:.2f}) um failed after "
                f"{fail_fraction:.0%} of the way; the stage stopped at ({stop.x_um:.2f}, {stop.y_um:.2f}) um. "
                "Read the position and retry the move."
            )
        if duration == 0:
            self.clock.advance(m.command_overhead_s)
            return m.command_overhead_s
        if moves_xy:
            self._apply_mechanical_errors(dx, dy, target)
        end = self.clock.now_s() + m.command_overhead_s + duration
        self._move = _Move(start, target, self.clock.now_s() + m.command_overhead_s, duration, end, m)
        self.settled_at_s = end + m.settle_s
        return end - self.clock.now_s()

    def wait(self, timeout_s: float, lock: AbstractContextManager[object]) -> None:
        """Advance the clock to the end of the current move(s), holding `lock` (the owner's state lock) only
        to look, not while time passes (so that in realtime mode other threads see the stage move).
        `StageMoveError` if the move ends more than `timeout_s` from now (the clock then stands at the limit)."""
        deadline = self.clock.now_s() + timeout_s
        while True:
            with lock:
                end = self.move_end_s()
                if end is None:
                    return
                now = self.clock.now_s()
            if end > deadline:
                self.clock.advance_to(deadline)
                raise StageMoveError(
                    f"stage still moving after {timeout_s:.2f} s (the move ends in {end - now:.2f} s); "
                    "wait longer or stop the stage"
                )
            self.clock.advance_to(end)

    def _apply_mechanical_errors(self, dx: float, dy: float, target: StagePosition) -> None:
        m = self.model
        for axis, delta in ((0, dx), (1, dy)):
            if delta != 0:
                self._last_direction[axis] = 1.0 if delta > 0 else -1.0
        backlash = np.where(self._last_direction < 0, m.backlash_um, 0.0)
        self._error_xy_um = backlash + self._repeat_error_um(target)

    def _repeat_error_um(self, target: StagePosition) -> np.ndarray:
        """The x/y repeat error (um) of a move to `target` starting now: keyed by the seed, the target
        (1 nm) and the start time (1 us), so it does not depend on the moves before (`simulator.keyed`)."""
        rng = keyed_rng(
            self._seed, "stage-repeat",
            quantise(target.x_um, POSITION_QUANTUM_UM), quantise(target.y_um, POSITION_QUANTUM_UM),
            quantise(self.clock.now_s(), TIME_QUANTUM_S),
        )
        return rng.normal(0.0, self.model.repeat_error_um, size=2)

    def stop(self) -> None:
        """Stop at once: the stage stays where it is now (a short deceleration is ignored)."""
        self._update()
        if self._move is not None:
            self._reported = self._move.position_at(self.clock.now_s())
            self._move = None
            self.settled_at_s = self.clock.now_s() + self.model.settle_s
            log.info("stage stopped at (%.2f, %.2f) um", self._reported.x_um, self._reported.y_um)
        self.clock.advance(self.model.command_overhead_s)


@dataclass(frozen=True)
class _Move:
    start: StagePosition
    target: StagePosition
    begin_s: float
    duration_s: float
    end_s: float
    model: StageModel

    def position_at(self, t_s: float) -> StagePosition:
        m = self.model
        t = t_s - self.begin_s

        def along(a: float, b: float, speed: float, accel: float) -> float:
            return a + (b - a) * profile_fraction(t, profile_time_s(b - a, speed, accel), b - a, speed, accel)

        s, g = self.start, self.target
        return StagePosition(
            x_um=along(s.x_um, g.x_um, m.xy_speed_um_s, m.xy_accel_um_s2),
            y_um=along(s.y_um, g.y_um, m.xy_speed_um_s, m.xy_accel_um_s2),
            z_um=along(s.z_um, g.z_um, m.z_speed_um_s, m.z_accel_um_s2),
            alpha_deg=along(s.alpha_deg, g.alpha_deg, m.alpha_speed_deg_s, m.alpha_accel_deg_s2),
        )
