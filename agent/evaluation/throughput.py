"""Diffracting crystals per microscope hour: scoring a session or a raster baseline against ground truth.

A *diffracting call* is a position whose diffraction snapshot passed the plan's `min_spots` (a session's
`recorded` targets, a raster's snapshots that passed). A call is *true* when ground truth puts a crystal
there (`crystal_at` returns its id, -1 for none). What a user gets out of an hour is the number of distinct
crystals among the true calls; two calls on one crystal count once. So, for any search:

- `crystals`: distinct crystals with a true diffracting call; the rate is `crystals` per hour of microscope
  time (`per_hour`), and the time per diffracting crystal its inverse (`per_item`);
- `precision`: true calls / calls (None without calls);
- `recall`: crystals of the mapped area that diffract (ground truth) and got a true call, over all such
  crystals of the area (None when the area holds none).

The time split of a session (fixed costs paid once, the time per target) comes from its summary when the
session writes it (`fixed_time_s`, `per_target_time_s`), else from the journal's `transition` records
(`state_seconds`). Nothing here imports `simulator`: ground truth arrives as a function.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.session.records import Transition
from agent.session.states import TARGET_STATES
from agent.session.timing import FIXED_STATES, StateTimes

CrystalAt = Callable[[float, float], int]


@dataclass(frozen=True)
class DiffractingScore:
    """Diffracting calls of one search scored against ground truth (see the module doc)."""

    calls: int
    true_calls: int
    crystals: int
    precision: float | None
    recall: float | None


def score_diffracting_calls(
    calls_xy_um: Iterable[tuple[float, float]], crystal_at: CrystalAt, diffracting_ids_in_area: Iterable[int]
) -> DiffractingScore:
    """Score diffracting calls at stage positions `calls_xy_um` (um) with `crystal_at(x_um, y_um)` -> crystal id
    or -1; `diffracting_ids_in_area` are the ids of the crystals of the mapped area that diffract."""
    area = set(diffracting_ids_in_area)
    calls = true_calls = 0
    hit: set[int] = set()
    for x_um, y_um in calls_xy_um:
        calls += 1
        crystal = int(crystal_at(float(x_um), float(y_um)))
        if crystal >= 0:
            true_calls += 1
            hit.add(crystal)
    return DiffractingScore(
        calls=calls,
        true_calls=true_calls,
        crystals=len(hit),
        precision=true_calls / calls if calls else None,
        recall=len(hit & area) / len(area) if area else None,
    )


def per_hour(count: int, time_s: float) -> float | None:
    """`count` per hour of `time_s` seconds (0.0 for no count in some time; None without time)."""
    return 3600.0 * count / time_s if time_s > 0 else None


def per_item(time_s: float, count: int) -> float | None:
    """Seconds per item (None without items)."""
    return time_s / count if count > 0 else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fixed_share(fixed_time_s: Mapping[str, float], total_s: float) -> float | None:
    """Fraction of a session's microscope time paid once (sum of `fixed_time_s`, seconds, over `total_s`)."""
    return sum(float(v) for v in fixed_time_s.values()) / total_s if total_s > 0 else None


def state_seconds(records: Iterable[Mapping[str, Any]], end_s: float | None = None) -> dict[str, float]:
    """Microscope seconds per state from a journal's `transition` records (dicts with `type`, `state`,
    `microscope_time_s`), counted as the session's own summary counts them (`agent.session.timing.StateTimes`:
    a state runs until the next transition, faults recovered during a visit count as the visit's `moving`);
    the last state runs until `end_s` if given."""
    times = StateTimes()
    for record in records:
        if record.get("type") == "transition" and record.get("microscope_time_s") is not None:
            times(Transition(state=str(record.get("state")), microscope_time_s=float(record["microscope_time_s"])))
    return times.seconds_now(end_s) if end_s is not None else dict(times.seconds)


def split_session_time(seconds: Mapping[str, float], visited: int) -> tuple[dict[str, float], float | None]:
    """(fixed seconds per fixed state, mean seconds per visited target) from `state_seconds`."""
    fixed = {state: float(seconds.get(state, 0.0)) for state in FIXED_STATES}
    target_s = sum(float(seconds.get(state, 0.0)) for state in TARGET_STATES)
    return fixed, per_item(target_s, visited)


def visit_seconds(records: Iterable[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """(outcome, microscope seconds) of each target visit in a journal: from the `moving` transition that
    starts the visit to the visit's `target` record (retries and recoveries included)."""
    visits: list[tuple[str, float]] = []
    start_s: float | None = None
    for record in records:
        now_s = record.get("microscope_time_s")
        if now_s is None:
            continue
        if record.get("type") == "transition" and record.get("state") == "moving" and start_s is None:
            start_s = float(now_s)
        elif record.get("type") == "target" and start_s is not None:
            visits.append((str(record.get("outcome")), float(now_s) - start_s))
            start_s = None
    return visits


def mean_step_um(points_xy_um: Sequence[tuple[float, float]]) -> float | None:
    """Mean distance (um) between consecutive points of a path (None for fewer than two points)."""
    if len(points_xy_um) < 2:
        return None
    steps = [math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(points_xy_um)]
    return sum(steps) / len(steps)
