"""A grid as it lies on the stage after an autoloader load: turned by a rotation and moved by a shift.

A `Specimen` is generated in its own frame, the grid centred on the origin. An autoloader puts the grid on the
stage a little turned and off centre, differently after every (re)load (`GridPlacement`: stage = R(rotation) @
grid + shift). Two views of the placed grid follow it in stage coordinates:

- `PlacedScene` renders it: a frame at stage position c with pixel matrix A shows the grid-frame point
  R^T (c - shift) + R^T A (pixel - centre), so the specimen's own renderer draws bars, film and objects under
  the transform analytically, at the cost of an unplaced frame (no image is rotated or resampled);
- `PlacedSpecimen` is the ground truth: a `Specimen` whose objects (crystals with their angles, wedges and
  bend contours, ice, debris with their outlines) and mesh (angle, offset) were moved into stage coordinates
  once, at load time, so every query (`crystal_id_xy`, `crystals_in_box`, `crystal_truth`, `squares`,
  `what_is_at_xy`, diffraction) answers in stage um. Queries that the specimen answers from maps in its own
  frame (rim, film thickness, film defects) transform the points back.

`EmptyStage` is what the camera sees with no grid on the stage: the holder's open aperture (vacuum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.film_defects import FilmDefects
from simulator.imaging import SpecimenScene
from simulator.specimen import Specimen


@dataclass(frozen=True)
class GridPlacement:
    """Where a loaded grid lies: stage (x, y) um = R(`rotation_deg`) @ grid (x, y) + `shift_xy_um`."""

    rotation_deg: float = 0.0
    shift_xy_um: tuple[float, float] = (0.0, 0.0)

    @property
    def rotation(self) -> np.ndarray:
        """The 2x2 rotation R (grid frame -> stage axes)."""
        a = math.radians(self.rotation_deg)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])

    def to_stage(self, x_um: Any, y_um: Any) -> tuple[np.ndarray, np.ndarray]:
        """Grid-frame (x, y) um -> stage (x, y) um (arrays broadcast)."""
        (c, s), (tx, ty) = self._cos_sin(), self.shift_xy_um
        x, y = np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64)
        return tx + c * x - s * y, ty + s * x + c * y

    def to_grid(self, x_um: Any, y_um: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stage (x, y) um -> grid-frame (x, y) um (the inverse of `to_stage`)."""
        (c, s), (tx, ty) = self._cos_sin(), self.shift_xy_um
        dx = np.asarray(x_um, dtype=np.float64) - tx
        dy = np.asarray(y_um, dtype=np.float64) - ty
        return c * dx + s * dy, -s * dx + c * dy

    def rotate(self, vx: Any, vy: Any) -> tuple[np.ndarray, np.ndarray]:
        """A direction (vx, vy) of the grid frame in stage axes (rotation only)."""
        c, s = self._cos_sin()
        vx, vy = np.asarray(vx, dtype=np.float64), np.asarray(vy, dtype=np.float64)
        return c * vx - s * vy, s * vx + c * vy

    def _cos_sin(self) -> tuple[float, float]:
        a = math.radians(self.rotation_deg)
        return math.cos(a), math.sin(a)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: rotation_deg and shift_xy_um."""
        return {"rotation_deg": self.rotation_deg, "shift_xy_um": list(self.shift_xy_um)}


class PlacedScene:
    """Renders `grid` as it lies on the stage under `placement` (a `simulator.imaging.Scene`)."""

    def __init__(self, grid: Specimen, placement: GridPlacement) -> None:
        self.grid = grid
        self.placement = placement
        self.specimen_type = grid.specimen_type
        self._scene = SpecimenScene(grid)
        self._rotation_t = placement.rotation.T

    def transmission(
        self, stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray, shape_px: tuple[int, int], edge_um: float
    ) -> np.ndarray:
        """See `simulator.imaging.Scene.transmission`: the grid's frame at the grid-frame view of the stage frame."""
        gx, gy = self.placement.to_grid(stage_xy_um[0], stage_xy_um[1])
        matrix = self._rotation_t @ np.asarray(matrix_um_per_px, dtype=np.float64)
        return self._scene.transmission((float(gx), float(gy)), matrix, shape_px, edge_um)


class EmptyStage:
    """No grid on the stage: every pixel sees the holder's open aperture (vacuum, transmission 1)."""

    specimen_type = "none"

    def transmission(
        self, stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray, shape_px: tuple[int, int], edge_um: float
    ) -> np.ndarray:
        """See `simulator.imaging.Scene.transmission`."""
        return np.ones(shape_px, dtype=np.float32)


class _PlacedDefects:
    """The film defects of a placed grid, queried in stage um (they are stored in the grid's frame)."""

    def __init__(self, defects: FilmDefects, placement: GridPlacement) -> None:
        self.defects = defects
        self.placement = placement
        self.contamination = _placed_objects(defects.contamination, placement)

    def vacuum_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where a tear or a carbon edge leaves no film at stage (x, y) um."""
        return self.defects.vacuum_xy(*self.placement.to_grid(x_um, y_um))

    def kind_xy(self, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 0.0) -> np.ndarray:
        """The defect at each stage point ('' where none); see `FilmDefects.kind_xy`."""
        return self.defects.kind_xy(*self.placement.to_grid(x_um, y_um), tolerance_um)

    def counts(self) -> dict[str, int]:
        """How many defects of each kind."""
        return self.defects.counts()

    def truth_dict(self) -> dict[str, Any]:
        """The defects' ground truth, in the grid's own frame (`placement` says how it lies on the stage)."""
        return {**self.defects.truth_dict(), "frame": "grid", "placement": self.placement.to_dict()}


def _placed_objects(objects: dict[str, np.ndarray], placement: GridPlacement) -> dict[str, np.ndarray]:
    """Round objects (ice, debris, contamination) moved to stage um; star-shaped outlines turned with them."""
    moved = dict(objects)
    if "x_um" in objects:
        moved["x_um"], moved["y_um"] = placement.to_stage(objects["x_um"], objects["y_um"])
    if "phases" in objects and objects["phases"].size:
        # r(t) = R (1 + sum a_k cos(k t + phi_k)), k = 2, 3, ...: turned by theta, phi_k -> phi_k - k theta
        orders = np.arange(2, objects["phases"].shape[1] + 2, dtype=np.float64)
        moved["phases"] = objects["phases"] - orders * math.radians(placement.rotation_deg)
    return moved


def _placed_crystals(crystals: dict[str, np.ndarray], placement: GridPlacement) -> dict[str, np.ndarray]:
    """Crystal arrays moved to stage um: centres, long-axis angles (mod 180), wedge and bend directions."""
    moved = dict(crystals)
    moved["x_um"], moved["y_um"] = placement.to_stage(crystals["x_um"], crystals["y_um"])
    moved["angle_deg"] = np.mod(crystals["angle_deg"] + placement.rotation_deg, 180.0)
    for vx, vy in (("wedge_x", "wedge_y"), ("bend_cos", "bend_sin")):
        if vx in crystals:
            moved[vx], moved[vy] = placement.rotate(crystals[vx], crystals[vy])
    return moved


class PlacedSpecimen(Specimen):
    """The ground truth of `grid` as it lies on the stage under `placement`, every query in stage um.

    `grid` is the specimen in its own frame (as generated) and `placement` how it lies; `to_grid` /
    `to_stage` convert points. Never for the agent's decisions."""

    def __init__(self, grid: Specimen, placement: GridPlacement) -> None:
        offset = placement.to_stage(grid.mesh_offset_um[0], grid.mesh_offset_um[1])
        super().__init__(
            grid.specimen_type, grid.seed, grid.options,
            grid.mesh_angle_deg + placement.rotation_deg, (float(offset[0]), float(offset[1])),
            np.array(grid.square_state), np.array(grid.square_thickness_factor), np.array(grid.square_hole),
            np.array(grid.thickness_field),
            _placed_crystals(grid.crystals, placement), _placed_objects(grid.ice, placement),
            _placed_objects(grid.debris, placement),
            None,
        )
        self.grid = grid
        self.placement = placement
        # queried in stage um like the rest; the type is duck-compatible with FilmDefects for these queries
        self.conditions = _PlacedDefects(grid.conditions, placement) if grid.conditions is not None else None  # type: ignore[assignment]

    def to_grid(self, x_um: Any, y_um: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stage (x, y) um -> the grid's own frame."""
        return self.placement.to_grid(x_um, y_um)

    def to_stage(self, x_um: Any, y_um: Any) -> tuple[np.ndarray, np.ndarray]:
        """The grid's own frame -> stage (x, y) um."""
        return self.placement.to_stage(x_um, y_um)

    @property
    def centre_xy_um(self) -> tuple[float, float]:
        """Stage (x, y) um of the grid's centre."""
        return (float(self.placement.shift_xy_um[0]), float(self.placement.shift_xy_um[1]))

    def bar_mask_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where stage (x, y) um lies on a grid bar, on the rim or outside the grid."""
        return self.grid.bar_mask_xy(*self.to_grid(x_um, y_um))

    def film_mask_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where stage (x, y) um lies on support film."""
        return self.grid.film_mask_xy(*self.to_grid(x_um, y_um))

    def film_thickness_nm_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Support film thickness (nm) at stage (x, y) um."""
        return self.grid.film_thickness_nm_xy(*self.to_grid(x_um, y_um))

    def thickness_field_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """The relative film thickness field at stage (x, y) um."""
        return self.grid.thickness_field_xy(*self.to_grid(x_um, y_um))

    def film_texture(self) -> np.ndarray:
        """The grid's film texture (laid in the grid's own frame by `PlacedScene`)."""
        return self.grid.film_texture()

    def truth_dict(self) -> dict[str, Any]:
        """The ground truth in stage um (see `Specimen.truth_dict`) plus the placement and the grid centre."""
        truth = super().truth_dict()
        truth["grid"]["centre_xy_um"] = list(self.centre_xy_um)
        truth["placement"] = self.placement.to_dict()
        return truth
