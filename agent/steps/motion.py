"""Stage motion helpers: backlash-aware approach and short stage paths through many targets."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from drivers.base import Microscope

T = TypeVar("T")


def approach_move(
    microscope: Microscope, x_um: float, y_um: float, approach_um: float, *, always: bool = False
) -> None:
    """Move to (x_um, y_um) so that the stage arrives from the -x/-y side on both axes (backlash taken up).

    A move that already goes +x and +y (or keeps an axis where it is) arrives that way by itself and is one
    move; otherwise the stage first goes to `approach_um` short of the target on each axis it would reach
    going backwards (clipped to the stage limits), then to the target. An axis left where it is keeps the
    side it arrived from last, which this helper always made -x/-y. With `approach_um <= 0` this is a
    plain move. `always=True` approaches from `approach_um` short on both axes whatever the direction (the
    calibration steps: their moves are then alike whatever came before, and a stage that has just arrived is
    always settled again before the next exposure).
    """
    if approach_um > 0:
        here = microscope.get_stage()
        backwards_x = always or x_um < here.x_um
        backwards_y = always or y_um < here.y_um
        if backwards_x or backwards_y:
            limits = microscope.stage_limits()
            pre_x = max(limits.x_min_um, x_um - approach_um) if backwards_x else here.x_um
            pre_y = max(limits.y_min_um, y_um - approach_um) if backwards_y else here.y_um
            microscope.move_stage(x_um=pre_x, y_um=pre_y, wait=True)
    microscope.move_stage(x_um=x_um, y_um=y_um, wait=True)


def path_length_um(start_xy_um: Sequence[float], points_xy_um: np.ndarray, order: Sequence[int]) -> float:
    """Length of the open path from `start_xy_um` through `points_xy_um[order]`, micrometres."""
    if len(order) == 0:
        return 0.0
    path = np.vstack([np.asarray(start_xy_um, dtype=np.float64)[None, :], points_xy_um[list(order)]])
    return float(np.sum(np.hypot(*np.diff(path, axis=0).T)))


def plan_path(start_xy_um: Sequence[float], points_xy_um: np.ndarray, max_two_opt_rounds: int = 50) -> list[int]:
    """A short open path visiting every point once: nearest neighbour, then 2-opt improvement.

    Returns the visiting order as indices into `points_xy_um` (shape (n, 2), micrometres). Deterministic.
    """
    points = np.asarray(points_xy_um, dtype=np.float64).reshape(-1, 2)
    count = len(points)
    if count <= 1:
        return list(range(count))
    remaining = set(range(count))
    current = np.asarray(start_xy_um, dtype=np.float64)
    order: list[int] = []
    while remaining:
        candidates = sorted(remaining)
        distances = np.hypot(*(points[candidates] - current).T)
        nearest = candidates[int(np.argmin(distances))]
        order.append(nearest)
        remaining.discard(nearest)
        current = points[nearest]
    nodes = np.vstack([np.asarray(start_xy_um, dtype=np.float64)[None, :], points])
    route = [0] + [index + 1 for index in order]  # node 0 is the fixed start

    def dist(a: int, b: int) -> float:
        return math.hypot(*(nodes[a] - nodes[b]))

    for _ in range(max_two_opt_rounds):
        improved = False
        for i in range(1, len(route) - 1):
            for j in range(i + 1, len(route)):
                before = dist(route[i - 1], route[i]) + (dist(route[j], route[j + 1]) if j + 1 < len(route) else 0.0)
                after = dist(route[i - 1], route[j]) + (dist(route[i], route[j + 1]) if j + 1 < len(route) else 0.0)
                if after < before - 1e-9:
                    route[i : j + 1] = reversed(route[i : j + 1])
                    improved = True
        if not improved:
            break
    return [node - 1 for node in route[1:]]


def order_by_tier(
    start_xy_um: Sequence[float], items: Sequence[T], tier: Callable[[T], int], xy_um: Callable[[T], Sequence[float]]
) -> list[T]:
    """`items` in visiting order: grouped by `tier(item)` (lowest first), each group on a short path
    (`plan_tiered_path`) from `start_xy_um`; `xy_um(item)` is an item's stage position (um)."""
    tiers = sorted({tier(item) for item in items})
    groups = [[item for item in items if tier(item) == value] for value in tiers]
    points = [np.array([xy_um(item) for item in group], dtype=np.float64).reshape(-1, 2) for group in groups]
    return [groups[group][index] for group, index in plan_tiered_path(start_xy_um, points)]


def plan_tiered_path(start_xy_um: Sequence[float], tiers: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """Visit every point of `tiers[0]` before any of `tiers[1]`, and so on: each tier (shape (n, 2),
    micrometres) on a short path (`plan_path`) that starts where the previous tier's path ended.

    Returns (tier, index into that tier) pairs in visiting order.
    """
    order: list[tuple[int, int]] = []
    start = np.asarray(start_xy_um, dtype=np.float64)
    for tier, points in enumerate(tiers):
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        path = plan_path(start, points)
        order += [(tier, index) for index in path]
        if path:
            start = points[path[-1]]
    return order
