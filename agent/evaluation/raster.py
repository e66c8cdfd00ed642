"""Raster baselines for the session benchmark, on any `Microscope` and within a microscope-time budget.

- `naive_raster`: what a person or a simple script does without an atlas: tile the mapped area at the
  search preset (serpentine order, fields side by side), run the threshold + connected-components detector
  (`agent.evaluation.baselines.threshold_components`, smallest object `min_size_um` on a side) on every
  tile, and take a diffraction snapshot of every detection, nearest first in detector order; detections
  within `merge_um` of a position already shot are skipped (one snapshot per spot). No ground truth: a
  snapshot that passes `min_spots` is a diffracting call, scored against truth only afterwards
  (`agent.evaluation.throughput`).
- `oracle_raster`: the same raster given ground truth (issue 20's upper baseline): the same fields, each
  imaged at the search preset, and a snapshot of exactly the true crystals whose centres lie in the field
  (none missed, nothing else shot). It isolates what a perfect detector gives a raster search.
- `ground_truth_tour`: no search at all: a stage tour of exactly the crystals it is given, in band order, one
  snapshot each and no image. Not a search any instrument can run (it needs the answer first); reported as
  the ceiling of one snapshot per crystal by stage moves.

Both charge whatever the microscope charges (moves, settling, preset changes, exposures, mode switches)
and stop at the first step that would begin after `budget_s` of microscope time (so they overrun the
budget by at most one step). Snapshots are scored by the session's own scorer
(`agent.steps.diffraction_score.score_diffraction`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.evaluation.baselines import threshold_components
from agent.steps.diffraction_score import score_diffraction
from drivers.base import Frame, Microscope
from drivers.geometry import pixel_to_stage_um

BoxUm = tuple[float, float, float, float]


@dataclass(frozen=True)
class RasterSettings:
    """How a raster baseline works: preset, exposures (s), the diffraction threshold (`min_spots`, as the
    plan's), the smallest object the detector keeps (um on a side), the snapshot merge distance (um) and the
    microscope-time budget (s)."""

    preset: str = "search"
    search_exposure_s: float = 0.5
    diffraction_exposure_s: float = 1.0
    min_spots: int = 4
    min_size_um: float = 0.5
    merge_um: float = 1.5
    budget_s: float = 3600.0


@dataclass(frozen=True)
class Snapshot:
    """One diffraction snapshot: where (stage um, as commanded), its spot count and whether it passed."""

    x_um: float
    y_um: float
    n_spots: int
    diffracting: bool


@dataclass
class RasterRun:
    """What a raster baseline did: its snapshots, tiles imaged (of those planned), detections, and the
    microscope seconds it spent; `out_of_time` when the budget stopped it before the end."""

    snapshots: list[Snapshot] = field(default_factory=list)
    tiles: int = 0
    tiles_planned: int = 0
    detections: int = 0
    microscope_time_s: float = 0.0
    out_of_time: bool = False

    @property
    def calls_xy_um(self) -> list[tuple[float, float]]:
        """Positions of the diffracting calls (snapshots that passed `min_spots`)."""
        return [(s.x_um, s.y_um) for s in self.snapshots if s.diffracting]


def field_side_um(matrix_um_per_px: np.ndarray, camera_px: int) -> float:
    """Side (um) of the square stage field a `camera_px`-wide frame covers with image -> stage matrix A."""
    return float(camera_px) * math.sqrt(abs(float(np.linalg.det(np.asarray(matrix_um_per_px, dtype=float)))))


def raster_order(points_xy_um: Sequence[tuple[float, float]], band_um: float) -> list[int]:
    """Indices of `points_xy_um` in serpentine raster order: bands of `band_um` in y, bottom up, x increasing
    in even bands and decreasing in odd ones."""
    if band_um <= 0:
        raise ValueError(f"band_um must be positive, got {band_um}")
    if not points_xy_um:
        return []
    y0 = min(p[1] for p in points_xy_um)

    def key(index: int) -> tuple[int, float]:
        x, y = points_xy_um[index]
        band = int((y - y0) // band_um)
        return band, (x if band % 2 == 0 else -x)

    return sorted(range(len(points_xy_um)), key=key)


def raster_tiles(boxes_um: Sequence[BoxUm], field_um: float) -> list[tuple[float, float]]:
    """Field centres (stage um) covering each box (x_min, x_max, y_min, y_max) with fields side by side,
    box after box, each in serpentine order."""
    tiles: list[tuple[float, float]] = []
    for x0, x1, y0, y1 in boxes_um:
        nx = max(1, math.ceil((x1 - x0) / field_um))
        ny = max(1, math.ceil((y1 - y0) / field_um))
        xs = [x0 + (x1 - x0) * (i + 0.5) / nx for i in range(nx)]
        for j in range(ny):
            y = y0 + (y1 - y0) * (j + 0.5) / ny
            tiles.extend((x, y) for x in (xs if j % 2 == 0 else xs[::-1]))
    return tiles


class _Budget:
    """Microscope seconds since the start, against the budget."""

    def __init__(self, microscope: Microscope, budget_s: float) -> None:
        self.microscope = microscope
        self.start_s = microscope.microscope_time_s()
        self.budget_s = budget_s

    def spent_s(self) -> float:
        return self.microscope.microscope_time_s() - self.start_s

    def over(self) -> bool:
        return self.spent_s() >= self.budget_s


def _snapshot(microscope: Microscope, x_um: float, y_um: float, settings: RasterSettings) -> Snapshot:
    """Move to (x, y), take a diffraction snapshot and score it."""
    microscope.move_stage(x_um=x_um, y_um=y_um)
    frame = microscope.acquire_diffraction(settings.diffraction_exposure_s)
    n_spots = score_diffraction(frame.image).n_spots
    return Snapshot(x_um=x_um, y_um=y_um, n_spots=n_spots, diffracting=n_spots >= settings.min_spots)


def _near_any(x_um: float, y_um: float, shots: Sequence[Snapshot], distance_um: float) -> bool:
    return any(math.hypot(s.x_um - x_um, s.y_um - y_um) < distance_um for s in shots)


def naive_raster(
    microscope: Microscope,
    boxes_um: Sequence[BoxUm],
    matrix_um_per_px: np.ndarray,
    frame_px: int,
    settings: RasterSettings,
) -> RasterRun:
    """The naive raster search of `boxes_um` (see the module doc); `matrix_um_per_px` is the search preset's
    image -> stage matrix (a stored calibration's) and `frame_px` the side of its frames (pixels)."""
    matrix = np.asarray(matrix_um_per_px, dtype=float)
    pixel_um = math.sqrt(abs(float(np.linalg.det(matrix))))
    min_area_px = max(4, round((settings.min_size_um / pixel_um) ** 2))
    tiles = raster_tiles(boxes_um, field_side_um(matrix, frame_px))
    microscope.set_preset(settings.preset)
    budget = _Budget(microscope, settings.budget_s)
    run = RasterRun(tiles_planned=len(tiles))
    for x_um, y_um in tiles:
        if budget.over():
            run.out_of_time = True
            break
        microscope.move_stage(x_um=x_um, y_um=y_um)
        frame = microscope.acquire(settings.search_exposure_s)
        run.tiles += 1
        if not _shoot_detections(microscope, frame, matrix, min_area_px, settings, budget, run):
            run.out_of_time = True
            break
    run.microscope_time_s = budget.spent_s()
    return run


def _shoot_detections(
    microscope: Microscope,
    frame: Frame,
    matrix: np.ndarray,
    min_area_px: int,
    settings: RasterSettings,
    budget: _Budget,
    run: RasterRun,
) -> bool:
    """A snapshot of every detection in `frame` not yet shot; False when the budget ran out first."""
    stage = frame.metadata.stage
    for detection in threshold_components(frame.image, min_area_px=min_area_px).detections:
        run.detections += 1
        xy = pixel_to_stage_um(
            np.array([detection.col_px, detection.row_px]), frame.shape_px, (stage.x_um, stage.y_um), matrix
        )
        x_um, y_um = float(xy[0]), float(xy[1])
        if _near_any(x_um, y_um, run.snapshots, settings.merge_um):
            continue
        if budget.over():
            return False
        run.snapshots.append(_snapshot(microscope, x_um, y_um, settings))
    return True


def oracle_raster(
    microscope: Microscope,
    boxes_um: Sequence[BoxUm],
    matrix_um_per_px: np.ndarray,
    frame_px: int,
    crystals_xy_um: Sequence[tuple[float, float]],
    settings: RasterSettings,
) -> RasterRun:
    """The raster of `naive_raster` (same fields, a search image each) with ground truth for a detector: in
    each field, a snapshot of every crystal of `crystals_xy_um` (stage um) whose centre lies in that field and
    was not shot yet, in the field's serpentine order (see the module doc)."""
    field_um = field_side_um(np.asarray(matrix_um_per_px, dtype=float), frame_px)
    tiles = raster_tiles(boxes_um, field_um)
    microscope.set_preset(settings.preset)
    budget = _Budget(microscope, settings.budget_s)
    run = RasterRun(tiles_planned=len(tiles))
    left = [(float(x), float(y)) for x, y in crystals_xy_um]
    for x_um, y_um in tiles:
        if budget.over():
            run.out_of_time = True
            break
        microscope.move_stage(x_um=x_um, y_um=y_um)
        microscope.acquire(settings.search_exposure_s)
        run.tiles += 1
        here = [p for p in left if abs(p[0] - x_um) <= field_um / 2 and abs(p[1] - y_um) <= field_um / 2]
        left = [p for p in left if p not in here]
        run.detections += len(here)
        for index in raster_order(here, field_um / 4) if here else []:
            if budget.over():
                run.out_of_time = True
                break
            run.snapshots.append(_snapshot(microscope, *here[index], settings))
        if run.out_of_time:
            break
    run.microscope_time_s = budget.spent_s()
    return run


def ground_truth_tour(
    microscope: Microscope, crystals_xy_um: Sequence[tuple[float, float]], band_um: float, settings: RasterSettings
) -> RasterRun:
    """Visit exactly `crystals_xy_um` (ground truth, stage um) in raster order with bands of `band_um` (the
    search field's side), one diffraction snapshot each and no image, at the raster's preset (see the module
    doc)."""
    microscope.set_preset(settings.preset)
    budget = _Budget(microscope, settings.budget_s)
    run = RasterRun(tiles_planned=0)
    for index in raster_order(crystals_xy_um, band_um):
        if budget.over():
            run.out_of_time = True
            break
        x_um, y_um = crystals_xy_um[index]
        run.snapshots.append(_snapshot(microscope, float(x_um), float(y_um), settings))
    run.microscope_time_s = budget.spent_s()
    return run
