"""Fault injection for the simulated microscope: which calls fail, planned or at a seeded rate.

Counting is per method and 1-based over every call: the first `move_stage` call is move number 1
(calls rejected for limits or bad arguments count too), the first `acquire` is acquire number 1, the
first `acquire_diffraction` is diffraction number 1. Faults never corrupt state: a failed move leaves
the stage where it really stopped (part of the way, reported truthfully), a timed-out acquisition
costs the exposure plus the timeout on the clock and changes nothing else.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class FaultPlan(BaseModel):
    """Planned and random faults (frozen). Rates are probabilities per call, drawn from `seed`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fail_move_numbers: frozenset[int] = Field(
        default_factory=frozenset, description="move calls raising StageMoveError"
    )
    timeout_acquire_numbers: frozenset[int] = Field(
        default_factory=frozenset, description="acquire calls raising AcquisitionTimeout"
    )
    timeout_diffraction_numbers: frozenset[int] = Field(
        default_factory=frozenset, description="acquire_diffraction calls raising AcquisitionTimeout"
    )
    move_failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    acquire_timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    acquire_timeout_s: float = Field(default=10.0, ge=0.0, description="clock time lost by a timed-out acquisition")
    seed: int = 0


class FaultInjector:
    """Decides, call by call, whether a planned or random fault fires; keeps the per-method counters."""

    def __init__(self, plan: FaultPlan | None) -> None:
        self.plan = plan or FaultPlan()
        self._rng = np.random.default_rng([self.plan.seed, 23])
        self.move_calls = 0
        self.acquire_calls = 0
        self.diffraction_calls = 0

    def next_move(self) -> float | None:
        """Count a move call; return the fraction of the way at which it fails, or None if it succeeds."""
        self.move_calls += 1
        draw, fraction = self._rng.uniform(size=2)
        if self.move_calls in self.plan.fail_move_numbers or draw < self.plan.move_failure_rate:
            return 0.1 + 0.8 * float(fraction)
        return None

    def next_acquire(self) -> bool:
        """Count an acquire call; True if it times out."""
        self.acquire_calls += 1
        draw = float(self._rng.uniform())
        return self.acquire_calls in self.plan.timeout_acquire_numbers or draw < self.plan.acquire_timeout_rate

    def next_diffraction(self) -> bool:
        """Count an acquire_diffraction call; True if it times out."""
        self.diffraction_calls += 1
        draw = float(self._rng.uniform())
        return self.diffraction_calls in self.plan.timeout_diffraction_numbers or draw < self.plan.acquire_timeout_rate
