"""Stage motion helpers: backlash-aware approach and short stage paths through many targets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from drivers.base import Microscope


def approach_move(microscope: Microscope, x_um: float, y_um: float, approach_um: float) -> None:
    """Move to (x_um, y_um), arriving always from the -x/-y side by `approach_um` to take up backlash.

    With `approach_um <= 0` this is a plain move. The intermediate point is clipped to the stage limits.
    """
    if approach_um > 0:
        limits = microscope.stage_limits()
        pre_x = max(limits.x_min_um, x_um - approach_um)
        pre_y = max(limits.y_min_um, y_um - approach_um)
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
