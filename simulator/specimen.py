"""A procedural TEM grid specimen in stage micrometres, with frozen ground truth.

`generate_specimen(specimen_type, seed, **options)` builds a 3.05 mm grid centred on the stage origin:
a square mesh (default 200 mesh: 125 um pitch, 35 um bars) turned by a seeded angle, a thick rim
outside the mesh area, some broken squares (a hole torn in the film) and empty squares (no film), a
support film whose thickness varies between and within squares, contamination (ice balls: round and
dense; debris: irregular blobs) and crystals placed singly and in clusters, on film only.

The specimen types mirror the 2018 data sets:

- `graphite-flakes`: large thin plates (6-45 um), low to medium contrast, often overlapping;
- `asbestos-fibres`: long thin needles and rods (up to 60 um x 0.3-2 um), dense, in aligned bundles;
- `protein-plates`: small plates and blocks (2-12 um), medium contrast, singly and in clusters;
- `polymer-faint`: plates and rods of 3-25 um with 2-6 % contrast, barely visible at low mag.

Every crystal has a `CrystalTruth` record. Queries are vectorised over arrays of x/y (um); a cell
index (`simulator.crystal_index`) keeps `crystal_id_xy` fast with thousands of crystals. Ground truth is
for tests, evaluation and the simulated operator only, never for the agent's decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import ndimage

from drivers.base import InvalidParameterError
from simulator.crystal_index import CELL_UM, CrystalCellIndex
from simulator.film_defects import FilmDefects
from simulator.shapes import (
    CRYSTAL_SHAPES,
    SHAPE_BLOCK,
    SHAPE_NEEDLE,
    SHAPE_PLATE,
    SHAPE_ROD,
    blob_distance_um,
    crystal_distance_um,
)

SPECIMEN_TYPES: tuple[str, ...] = ("graphite-flakes", "asbestos-fibres", "protein-plates", "polymer-faint")

#: Square states (codes in `Specimen.square_state`).
SQUARE_STATES: tuple[str, ...] = ("intact", "broken", "empty", "partial")
SQUARE_INTACT, SQUARE_BROKEN, SQUARE_EMPTY, SQUARE_PARTIAL = range(4)

#: Largest tolerance (um) `crystal_id_xy` accepts; the cell index is padded by this much.
MAX_TOLERANCE_UM = 10.0
_THICKNESS_MAP_CELL_UM = 10.0
#: Optical density (ln units, bright field with objective aperture) per nm of carbon support film.
FILM_OD_PER_NM = 0.004


class SpecimenError(InvalidParameterError):
    """A specimen could not be generated from the given type and options."""


class SpecimenOptions(BaseModel):
    """Grid geometry and object counts (um, deg); None means the specimen type's seeded default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid_diameter_um: float = Field(default=3050.0, gt=100.0)
    mesh_radius_um: float = Field(default=1150.0, gt=50.0, description="radius of the meshed area inside the rim")
    mesh_pitch_um: float = Field(default=125.0, gt=5.0, description="200 mesh: 125 um")
    bar_width_um: float = Field(default=35.0, gt=0.5)
    mesh_angle_deg: float | None = Field(default=None, description="mesh rotation on the stage; None: seeded")
    broken_fraction: float = Field(default=0.08, ge=0.0, le=1.0)
    empty_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    film_thickness_nm: float = Field(default=20.0, gt=0.0, description="median support film thickness")
    crystal_count: int | None = Field(default=None, ge=0, le=200_000)
    ice_ball_count: int = Field(default=400, ge=0, le=200_000)
    debris_count: int = Field(default=150, ge=0, le=200_000)
    # conditions of real grids, all off by default (`simulator.conditions`, `simulator.film_defects`)
    fold_count: int = Field(default=0, ge=0, le=100_000, description="film folds (long curved double-film lines)")
    tear_count: int = Field(default=0, ge=0, le=100_000, description="tears (cracks with curled lips)")
    carbon_edge_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="intact squares half covered")
    ice_gradient_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="squares with thick-ice gradients")
    contamination_count: int = Field(default=0, ge=0, le=200_000, description="irregular dark patches")
    stacked_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="plates with a partner partly on top")

    @model_validator(mode="after")
    def _geometry(self) -> SpecimenOptions:
        if self.bar_width_um >= self.mesh_pitch_um:
            raise ValueError("bar_width_um must be smaller than mesh_pitch_um")
        if self.mesh_radius_um >= self.grid_diameter_um / 2:
            raise ValueError("mesh_radius_um must be smaller than half of grid_diameter_um")
        return self


@dataclass(frozen=True)
class _ShapeParams:
    weight: float
    length_um: tuple[float, float]  # log-uniform range
    aspect: tuple[float, float]  # length / width, uniform range


@dataclass(frozen=True)
class _TypeParams:
    count: int
    shapes: dict[int, _ShapeParams]
    contrast: tuple[float, float]
    cluster_fraction: float
    cluster_size: tuple[int, int]
    cluster_radius_um: float
    aligned_clusters: bool
    #: share of crystals that are ordered (nothing in the image shows it); raised by 0.03-0.05 when thickness
    #: took over part of the non-diffracting share (`simulator.thickness`), so the totals stay near what they were
    diffracting_fraction: float
    quality_beta: tuple[float, float]
    #: share of crystals that grew thick (`simulator.thickness.THICK_OD_RANGE`); a guess per type
    thick_fraction: float = 0.0


_TYPES: dict[str, _TypeParams] = {
    "graphite-flakes": _TypeParams(
        count=500,
        shapes={
            SHAPE_PLATE: _ShapeParams(0.85, (6.0, 45.0), (1.0, 1.6)),
            SHAPE_BLOCK: _ShapeParams(0.15, (4.0, 12.0), (1.0, 1.4)),
        },
        contrast=(0.08, 0.28),
        cluster_fraction=0.3,
        cluster_size=(2, 6),
        cluster_radius_um=10.0,
        aligned_clusters=False,
        diffracting_fraction=0.85,
        quality_beta=(4.0, 2.0),
        thick_fraction=0.15,
    ),
    "asbestos-fibres": _TypeParams(
        count=800,
        shapes={
            SHAPE_NEEDLE: _ShapeParams(0.7, (10.0, 60.0), (15.0, 60.0)),
            SHAPE_ROD: _ShapeParams(0.3, (4.0, 20.0), (4.0, 10.0)),
        },
        contrast=(0.3, 0.65),
        cluster_fraction=0.5,
        cluster_size=(3, 10),
        cluster_radius_um=5.0,
        aligned_clusters=True,
        diffracting_fraction=0.85,
        quality_beta=(3.0, 2.0),
        thick_fraction=0.1,
    ),
    "protein-plates": _TypeParams(
        count=1500,
        shapes={
            SHAPE_PLATE: _ShapeParams(0.6, (2.0, 12.0), (1.0, 2.0)),
            SHAPE_BLOCK: _ShapeParams(0.3, (2.0, 8.0), (1.0, 1.4)),
            SHAPE_ROD: _ShapeParams(0.1, (3.0, 12.0), (3.0, 6.0)),
        },
        contrast=(0.15, 0.5),
        cluster_fraction=0.35,
        cluster_size=(3, 12),
        cluster_radius_um=8.0,
        aligned_clusters=False,
        diffracting_fraction=0.65,
        quality_beta=(2.0, 3.0),
        thick_fraction=0.25,
    ),
    "polymer-faint": _TypeParams(
        count=1000,
        shapes={
            SHAPE_PLATE: _ShapeParams(0.5, (3.0, 20.0), (1.0, 2.0)),
            SHAPE_ROD: _ShapeParams(0.3, (5.0, 25.0), (3.0, 8.0)),
            SHAPE_NEEDLE: _ShapeParams(0.2, (10.0, 40.0), (10.0, 30.0)),
        },
        contrast=(0.02, 0.06),
        cluster_fraction=0.3,
        cluster_size=(3, 8),
        cluster_radius_um=10.0,
        aligned_clusters=False,
        diffracting_fraction=0.7,
        quality_beta=(2.0, 2.0),
        thick_fraction=0.0,  # the 2018 study's barely visible crystals: none grew thick
    ),
}


@dataclass(frozen=True)
class CrystalTruth:
    """Ground truth of one crystal: centre (um), size (um), orientation (deg), shape and diffraction.

    `contrast` is the fraction of transmitted intensity the crystal removes in bright field (0..1);
    `diffraction_quality` (0..1) says how many and how sharp its Bragg spots are; `cluster_id` groups
    crystals placed together (None for single crystals); `overlaps` lists the crystals stacked partly on it
    or it on them (the `stacked_fraction` condition; chance overlaps of other crystals are not listed).
    """

    id: int
    x_um: float
    y_um: float
    length_um: float
    width_um: float
    angle_deg: float
    shape: str
    contrast: float
    diffracts: bool
    diffraction_quality: float
    cluster_id: int | None
    overlaps: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the record (`overlaps` only when it has any, as before that condition)."""
        record = asdict(self)
        if not self.overlaps:
            del record["overlaps"]
        else:
            record["overlaps"] = list(self.overlaps)
        return record


@dataclass(frozen=True)
class GridSquare:
    """One grid square: mesh indices (i, j), centre in stage um and its state (see `SQUARE_STATES`)."""

    i: int
    j: int
    x_um: float
    y_um: float
    state: str


class Specimen:
    """A generated specimen: grid geometry, film, contamination and crystals (all in stage um).

    Build one with `generate_specimen`. Arrays are read-only. Coordinates: stage x/y in micrometres,
    grid centre at (0, 0).
    """

    def __init__(
        self,
        specimen_type: str,
        seed: int,
        options: SpecimenOptions,
        mesh_angle_deg: float,
        mesh_offset_um: tuple[float, float],
        square_state: np.ndarray,
        square_thickness_factor: np.ndarray,
        square_hole: np.ndarray,
        thickness_field: np.ndarray,
        crystals: dict[str, np.ndarray],
        ice: dict[str, np.ndarray],
        debris: dict[str, np.ndarray],
        conditions: FilmDefects | None = None,
    ) -> None:
        self.specimen_type = specimen_type
        self.seed = seed
        self.options = options
        self.pitch_um = options.mesh_pitch_um
        self.bar_width_um = options.bar_width_um
        self.mesh_radius_um = options.mesh_radius_um
        self.grid_radius_um = options.grid_diameter_um / 2.0
        self.mesh_angle_deg = mesh_angle_deg
        self.mesh_offset_um = mesh_offset_um
        self._cos_m = math.cos(math.radians(mesh_angle_deg))
        self._sin_m = math.sin(math.radians(mesh_angle_deg))
        self.square_index_offset = square_state.shape[0] // 2
        self.square_state = _frozen(square_state)
        self.square_thickness_factor = _frozen(square_thickness_factor)
        self.square_hole = _frozen(square_hole)  # (..., 3): du_um, dv_um, radius_um (0: no hole)
        self.thickness_field = _frozen(thickness_field)  # relative film thickness, map over the grid
        self.crystals = {k: _frozen(v) for k, v in crystals.items()}
        self.ice = {k: _frozen(v) for k, v in ice.items()}
        self.debris = {k: _frozen(v) for k, v in debris.items()}
        self.conditions = conditions  # film defects and contamination (`simulator.film_defects`); None: off
        self._truth: tuple[CrystalTruth, ...] | None = None
        self._texture: np.ndarray | None = None
        self._index = CrystalCellIndex(
            self.crystals["x_um"],
            self.crystals["y_um"],
            self._crystal_radius_um() + MAX_TOLERANCE_UM,
            extent_um=self.grid_radius_um + MAX_TOLERANCE_UM + CELL_UM,
        )

    # ---------------------------------------------------------------------------------------------
    # geometry
    # ---------------------------------------------------------------------------------------------
    @property
    def crystal_count(self) -> int:
        """Number of crystals."""
        return int(self.crystals["x_um"].shape[0])

    def mesh_coordinates(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage (x, y) um -> mesh (u, v) um: bars lie at u = k*pitch and v = k*pitch."""
        dx = np.asarray(x_um, dtype=np.float64) - self.mesh_offset_um[0]
        dy = np.asarray(y_um, dtype=np.float64) - self.mesh_offset_um[1]
        return dx * self._cos_m + dy * self._sin_m, -dx * self._sin_m + dy * self._cos_m

    def mesh_to_stage(self, u_um: np.ndarray, v_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mesh (u, v) um -> stage (x, y) um (inverse of `mesh_coordinates`)."""
        u = np.asarray(u_um, dtype=np.float64)
        v = np.asarray(v_um, dtype=np.float64)
        x = self.mesh_offset_um[0] + u * self._cos_m - v * self._sin_m
        y = self.mesh_offset_um[1] + u * self._sin_m + v * self._cos_m
        return x, y

    def bar_distance_um(self, u_um: np.ndarray, v_um: np.ndarray) -> np.ndarray:
        """Signed distance (um) into the nearest bar of the mesh (positive on a bar), ignoring the rim."""
        half = self.pitch_um / 2.0
        du = np.abs(np.mod(u_um + half, self.pitch_um) - half)
        dv = np.abs(np.mod(v_um + half, self.pitch_um) - half)
        return self.bar_width_um / 2.0 - np.minimum(du, dv)

    def square_lookup(self, u_um: np.ndarray, v_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mesh (u, v) -> clipped indices (ia, ja) into the per-square arrays."""
        n = self.square_state.shape[0]
        ia = np.clip(np.floor(u_um / self.pitch_um).astype(np.int64) + self.square_index_offset, 0, n - 1)
        ja = np.clip(np.floor(v_um / self.pitch_um).astype(np.int64) + self.square_index_offset, 0, n - 1)
        return ia, ja

    def bar_mask_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where (x, y) um lies on a grid bar, on the rim or outside the grid."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        u, v = self.mesh_coordinates(x, y)
        return (self.bar_distance_um(u, v) > 0) | (np.hypot(x, y) > self.mesh_radius_um)

    def film_mask_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where (x, y) um lies on support film (not on a bar, not in an empty square or a hole)."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        u, v = self.mesh_coordinates(x, y)
        ia, ja = self.square_lookup(u, v)
        state = self.square_state[ia, ja]
        hole = self.square_hole[ia, ja]
        cu = (np.floor(u / self.pitch_um) + 0.5) * self.pitch_um
        cv = (np.floor(v / self.pitch_um) + 0.5) * self.pitch_um
        in_hole = np.hypot(u - cu - hole[..., 0], v - cv - hole[..., 1]) < hole[..., 2]
        on_bar = (self.bar_distance_um(u, v) > 0) | (np.hypot(x, y) > self.mesh_radius_um)
        film = ~on_bar & (state != SQUARE_EMPTY) & ~in_hole
        return film if self.conditions is None else film & ~self.conditions.vacuum_xy(x, y)

    def film_thickness_nm_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Support film thickness (nm) at (x, y) um where there is film (the film model, ignoring holes)."""
        x = np.asarray(x_um, dtype=np.float64)
        y = np.asarray(y_um, dtype=np.float64)
        u, v = self.mesh_coordinates(x, y)
        ia, ja = self.square_lookup(u, v)
        field = self.thickness_field_xy(x, y)
        return self.options.film_thickness_nm * self.square_thickness_factor[ia, ja] * field

    def thickness_field_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """The smooth relative film thickness field (around 1) at (x, y) um, bilinear from its map."""
        n = self.thickness_field.shape[0]
        half = (n - 1) / 2.0
        cols = np.asarray(x_um, dtype=np.float64) / _THICKNESS_MAP_CELL_UM + half
        rows = np.asarray(y_um, dtype=np.float64) / _THICKNESS_MAP_CELL_UM + half
        coords = np.stack([rows.ravel(), cols.ravel()])
        values = ndimage.map_coordinates(self.thickness_field, coords, order=1, mode="nearest")
        return values.reshape(np.shape(rows))

    def film_texture(self) -> np.ndarray:
        """A seeded, tileable 256 x 256 texture (float32, mean 0, std 1, ~3-texel grains) of the film.

        Imaging lays it on the stage at fixed physical scales, so the film has the same grain wherever
        and whenever it is imaged (image registration on plain film works, as on a real grid)."""
        if self._texture is None:
            rng = np.random.default_rng([self.seed, SPECIMEN_TYPES.index(self.specimen_type), 43])
            tile = ndimage.gaussian_filter(rng.normal(size=(256, 256)), sigma=1.2, mode="wrap")
            tile = (tile - tile.mean()) / max(float(tile.std()), 1e-12)
            self._texture = _frozen(tile.astype(np.float32))
        return self._texture

    def thickness_map_geometry(self) -> tuple[float, float]:
        """(cell size um, index of the map's centre) of `thickness_field`, for resampling it in imaging."""
        return _THICKNESS_MAP_CELL_UM, (self.thickness_field.shape[0] - 1) / 2.0

    # ---------------------------------------------------------------------------------------------
    # squares
    # ---------------------------------------------------------------------------------------------
    def _square_records(self) -> list[GridSquare]:
        records = []
        k = self.square_index_offset
        for ia, ja in zip(*np.nonzero(self.square_state >= 0), strict=True):
            i, j = int(ia) - k, int(ja) - k
            x, y = self.mesh_to_stage((i + 0.5) * self.pitch_um, (j + 0.5) * self.pitch_um)
            records.append(GridSquare(i, j, float(x), float(y), SQUARE_STATES[int(self.square_state[ia, ja])]))
        return records

    def square_centres_um(self) -> np.ndarray:
        """(n, 2) stage (x, y) um of the centres of intact grid squares (whole film, inside the mesh area)."""
        centres = [(s.x_um, s.y_um) for s in self._square_records() if s.state == "intact"]
        return np.asarray(centres, dtype=np.float64).reshape(-1, 2)

    def squares(self) -> list[GridSquare]:
        """Every square of the mesh area (intact, broken, empty or partial)."""
        return self._square_records()

    def square_at_xy(self, x_um: float, y_um: float) -> GridSquare | None:
        """The grid square whose open area contains (x, y) um, or None on a bar, the rim or outside."""
        if bool(self.bar_mask_xy(np.float64(x_um), np.float64(y_um))):
            return None
        u, v = self.mesh_coordinates(np.float64(x_um), np.float64(y_um))
        ia, ja = self.square_lookup(u, v)
        state = int(self.square_state[ia, ja])
        if state < 0:
            return None
        i, j = int(ia) - self.square_index_offset, int(ja) - self.square_index_offset
        x, y = self.mesh_to_stage((i + 0.5) * self.pitch_um, (j + 0.5) * self.pitch_um)
        return GridSquare(i, j, float(x), float(y), SQUARE_STATES[state])

    # ---------------------------------------------------------------------------------------------
    # crystals
    # ---------------------------------------------------------------------------------------------
    def _crystal_radius_um(self) -> np.ndarray:
        return np.hypot(self.crystals["length_um"], self.crystals["width_um"]) / 2.0

    def crystal_distance_um(self, ids: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Signed distance (um, positive inside) of points to the crystals `ids` (broadcast together)."""
        c = self.crystals
        ids = np.asarray(ids, dtype=np.int64)
        return crystal_distance_um(
            np.asarray(x_um) - c["x_um"][ids],
            np.asarray(y_um) - c["y_um"][ids],
            c["length_um"][ids],
            c["width_um"][ids],
            c["angle_deg"][ids],
            c["shape"][ids],
        )

    def crystal_id_xy(self, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 0.0) -> np.ndarray:
        """Id of the crystal at each (x, y) um (the highest id where crystals overlap), -1 where none.

        `tolerance_um` (0..10) also counts points within that distance outside a crystal's outline.
        Returns an int64 array of the broadcast shape of x and y.
        """
        if not 0.0 <= tolerance_um <= MAX_TOLERANCE_UM:
            raise InvalidParameterError(f"tolerance_um must be in [0, {MAX_TOLERANCE_UM}] um, got {tolerance_um}")
        x, y = np.broadcast_arrays(np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64))
        flat_x = x.ravel()
        flat_y = y.ravel()
        result = np.full(flat_x.shape, -1, dtype=np.int64)
        points, starts, counts = self._index.cells_of(flat_x, flat_y)
        max_count = int(counts.max()) if counts.size else 0
        for k in range(max_count):
            has = counts > k
            sel = points[has]
            cand = self._index.ids[starts[has] + k]
            inside = self.crystal_distance_um(cand, flat_x[sel], flat_y[sel]) >= -tolerance_um
            hit = sel[inside]
            result[hit] = np.maximum(result[hit], cand[inside])
        return result.reshape(x.shape)

    def crystals_in_box(self, x_min_um: float, x_max_um: float, y_min_um: float, y_max_um: float) -> list[CrystalTruth]:
        """Crystals whose centre lies in the box [x_min, x_max] x [y_min, y_max] (um), ordered by id."""
        x = self.crystals["x_um"]
        y = self.crystals["y_um"]
        inside = (x >= x_min_um) & (x <= x_max_um) & (y >= y_min_um) & (y <= y_max_um)
        truth = self.crystal_truth()
        return [truth[i] for i in np.nonzero(inside)[0]]

    def crystal_truth(self) -> tuple[CrystalTruth, ...]:
        """Every crystal's ground-truth record, indexed by id."""
        if self._truth is None:
            c = self.crystals
            overlaps = self._stacked_pairs()
            self._truth = tuple(
                CrystalTruth(
                    id=i,
                    x_um=float(c["x_um"][i]),
                    y_um=float(c["y_um"][i]),
                    length_um=float(c["length_um"][i]),
                    width_um=float(c["width_um"][i]),
                    angle_deg=float(c["angle_deg"][i]),
                    shape=CRYSTAL_SHAPES[int(c["shape"][i])],
                    contrast=float(c["contrast"][i]),
                    diffracts=bool(c["diffracts"][i]),
                    diffraction_quality=float(c["quality"][i]),
                    cluster_id=None if int(c["cluster"][i]) < 0 else int(c["cluster"][i]),
                    overlaps=overlaps.get(i, ()),
                )
                for i in range(self.crystal_count)
            )
        return self._truth

    def _stacked_pairs(self) -> dict[int, tuple[int, ...]]:
        """Crystal id -> the ids stacked on it or it on them (empty without the stacked-plates condition)."""
        pairs: dict[int, tuple[int, ...]] = {}
        stacked = self.crystals.get("stacked_on", np.zeros(0, dtype=np.int64))
        for top in np.nonzero(stacked >= 0)[0]:
            below = int(stacked[top])
            pairs[int(top)] = (*pairs.get(int(top), ()), below)
            pairs[below] = (*pairs.get(below, ()), int(top))
        return pairs

    def crystals_near(self, x_um: float, y_um: float, radius_um: float) -> np.ndarray:
        """Ids of crystals any part of which may lie within `radius_um` of (x, y) (bounding circles)."""
        distance = np.hypot(self.crystals["x_um"] - x_um, self.crystals["y_um"] - y_um)
        return np.nonzero(distance <= radius_um + self._crystal_radius_um())[0]

    def truth_dict(self) -> dict[str, Any]:
        """JSON-serialisable ground truth: specimen type, seed, grid geometry, squares, crystals, contamination."""
        return {
            "specimen_type": self.specimen_type,
            "seed": self.seed,
            "units": {"length": "um", "angle": "deg"},
            "grid": {
                "diameter_um": self.options.grid_diameter_um,
                "mesh_radius_um": self.mesh_radius_um,
                "pitch_um": self.pitch_um,
                "bar_width_um": self.bar_width_um,
                "mesh_angle_deg": self.mesh_angle_deg,
                "mesh_offset_um": list(self.mesh_offset_um),
                "film_thickness_nm": self.options.film_thickness_nm,
                "squares": [asdict(s) for s in self._square_records()],
            },
            "crystals": [t.to_dict() for t in self.crystal_truth()],
            "ice_balls": [
                {"x_um": float(x), "y_um": float(y), "radius_um": float(r)}
                for x, y, r in zip(self.ice["x_um"], self.ice["y_um"], self.ice["radius_um"], strict=True)
            ],
            "debris": [
                {"x_um": float(x), "y_um": float(y), "radius_um": float(r)}
                for x, y, r in zip(self.debris["x_um"], self.debris["y_um"], self.debris["radius_um"], strict=True)
            ],
            **({} if self.conditions is None else {"conditions": self.conditions.truth_dict()}),
        }


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


# -------------------------------------------------------------------------------------------------
# generation
# -------------------------------------------------------------------------------------------------


def generate_specimen(specimen_type: str, seed: int, **options: Any) -> Specimen:
    """Generate a specimen of `specimen_type` (one of `SPECIMEN_TYPES`) from `seed`.

    `options` are `SpecimenOptions` fields (grid geometry in um, fractions of broken/empty squares,
    object counts). Raises `SpecimenError` for an unknown type or invalid options. Deterministic: the
    same type, seed and options give the same specimen.
    """
    if specimen_type not in _TYPES:
        raise SpecimenError(f"unknown specimen type {specimen_type!r}; choose one of: {', '.join(SPECIMEN_TYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecimenError(f"seed must be a non-negative integer, got {seed!r}")
    try:
        opts = SpecimenOptions(**options)
    except ValidationError as exc:
        raise SpecimenError(f"invalid specimen options: {exc}") from exc
    from simulator.conditions import any_specimen_condition, generate_film_defects, stack_plates
    from simulator.thickness import apply_thickness

    params = _TYPES[specimen_type]
    type_index = SPECIMEN_TYPES.index(specimen_type)
    rng = np.random.default_rng([int(seed), type_index, 3])

    mesh_angle = float(rng.uniform(-10.0, 10.0)) if opts.mesh_angle_deg is None else float(opts.mesh_angle_deg)
    offset = (float(rng.uniform(0, opts.mesh_pitch_um)), float(rng.uniform(0, opts.mesh_pitch_um)))
    state, thickness_factor, hole = _make_squares(opts, mesh_angle, offset, rng)
    field = _make_thickness_field(opts, rng)
    base = Specimen(
        specimen_type, int(seed), opts, mesh_angle, offset, state, thickness_factor, hole, field,
        _empty_crystals(), _empty_ice(), _empty_debris(),
    )
    defects = None
    if any_specimen_condition(opts):  # its own random streams: the draws below stay as they were
        defects = generate_film_defects(base, opts, np.random.default_rng([int(seed), type_index, 59]))
        base = Specimen(
            specimen_type, int(seed), opts, mesh_angle, offset, state, thickness_factor, hole, field,
            _empty_crystals(), _empty_ice(), _empty_debris(), defects,
        )
    count = params.count if opts.crystal_count is None else opts.crystal_count
    crystals = _place_crystals(base, params, count, rng)
    apply_thickness(crystals, params.thick_fraction, np.random.default_rng([int(seed), type_index, 67]))
    crystals.update(_crystal_texture(crystals, np.random.default_rng([int(seed), type_index, 41])))
    if opts.stacked_fraction > 0:
        crystals = stack_plates(base, params, crystals, opts.stacked_fraction,
                                np.random.default_rng([int(seed), type_index, 61]))
    ice = _place_ice(base, opts.ice_ball_count, rng)
    debris = _place_debris(base, opts.debris_count, rng)
    return Specimen(
        specimen_type, int(seed), opts, mesh_angle, offset, state, thickness_factor, hole, field,
        crystals, ice, debris, defects,
    )


def _make_squares(
    opts: SpecimenOptions, mesh_angle_deg: float, offset: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-square state, film thickness factor and hole (du, dv, r) arrays, indexed [i + K, j + K]."""
    k = math.ceil((opts.grid_diameter_um / 2 + abs(offset[0]) + abs(offset[1])) / opts.mesh_pitch_um) + 2
    n = 2 * k + 1
    idx = np.arange(n) - k
    ii, jj = np.meshgrid(idx, idx, indexing="ij")
    cos_m, sin_m = math.cos(math.radians(mesh_angle_deg)), math.sin(math.radians(mesh_angle_deg))
    state = np.full((n, n), -1, dtype=np.int64)
    half_open = (opts.mesh_pitch_um - opts.bar_width_um) / 2.0
    # corners of each square's open area -> inside the mesh radius?
    corner_radius = np.zeros((n, n))
    centre_radius = np.zeros((n, n))
    for su in (-1, 0, 1):
        for sv in (-1, 0, 1):
            u = (ii + 0.5) * opts.mesh_pitch_um + su * half_open
            v = (jj + 0.5) * opts.mesh_pitch_um + sv * half_open
            x = offset[0] + u * cos_m - v * sin_m
            y = offset[1] + u * sin_m + v * cos_m
            r = np.hypot(x, y)
            if su == 0 and sv == 0:
                centre_radius = r
            else:
                corner_radius = np.maximum(corner_radius, r)
    inside = corner_radius <= opts.mesh_radius_um
    touching = (centre_radius - half_open * math.sqrt(2)) < opts.mesh_radius_um
    state[touching] = SQUARE_PARTIAL
    roll = rng.uniform(size=(n, n))
    state[inside] = SQUARE_INTACT
    state[inside & (roll < opts.empty_fraction)] = SQUARE_EMPTY
    broken = inside & (roll >= opts.empty_fraction) & (roll < opts.empty_fraction + opts.broken_fraction)
    state[broken] = SQUARE_BROKEN
    thickness_factor = np.exp(rng.normal(0.0, 0.3, size=(n, n)))
    hole = np.zeros((n, n, 3))
    hole[..., 0] = rng.uniform(-half_open, half_open, size=(n, n))
    hole[..., 1] = rng.uniform(-half_open, half_open, size=(n, n))
    hole[..., 2] = np.where(broken, rng.uniform(0.3, 0.9, size=(n, n)) * 2 * half_open, 0.0)
    return state, thickness_factor, hole


def _make_thickness_field(opts: SpecimenOptions, rng: np.random.Generator) -> np.ndarray:
    """Smooth relative thickness (mean ~1, +-30 %) on a 10-um map covering the grid."""
    n = math.ceil(opts.grid_diameter_um / _THICKNESS_MAP_CELL_UM) + 5
    noise = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=8.0, mode="wrap")
    noise /= max(float(noise.std()), 1e-12)
    fine = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=2.0, mode="wrap")
    fine /= max(float(fine.std()), 1e-12)
    return np.clip(1.0 + 0.25 * noise + 0.08 * fine, 0.3, 2.5)


def _empty_crystals() -> dict[str, np.ndarray]:
    keys_float = ("x_um", "y_um", "length_um", "width_um", "angle_deg", "contrast", "quality", "wedge_x", "wedge_y",
                  "bend_strength", "bend_cos", "bend_sin", "bend_offset_um", "bend_width_um")
    arrays: dict[str, np.ndarray] = {k: np.zeros(0) for k in keys_float}
    arrays["shape"] = np.zeros(0, dtype=np.int64)
    arrays["diffracts"] = np.zeros(0, dtype=bool)
    arrays["cluster"] = np.zeros(0, dtype=np.int64)
    return arrays


def _empty_ice() -> dict[str, np.ndarray]:
    return {k: np.zeros(0) for k in ("x_um", "y_um", "radius_um", "od")}


def _empty_debris() -> dict[str, np.ndarray]:
    arrays = {k: np.zeros(0) for k in ("x_um", "y_um", "radius_um", "od")}
    arrays["harmonics"] = np.zeros((0, 4))
    arrays["phases"] = np.zeros((0, 4))
    return arrays


def _uniform_in_mesh(spec: Specimen, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    radius = spec.mesh_radius_um * np.sqrt(rng.uniform(size=n))
    theta = rng.uniform(0, 2 * np.pi, size=n)
    return radius * np.cos(theta), radius * np.sin(theta)


def _footprint_on_film(
    spec: Specimen, x: np.ndarray, y: np.ndarray, length: np.ndarray, width: np.ndarray, angle_deg: np.ndarray
) -> np.ndarray:
    """True where a crystal's centre, ends and corners all lie on film."""
    ok = spec.film_mask_xy(x, y)
    a = np.deg2rad(angle_deg)
    ca, sa = np.cos(a), np.sin(a)
    for fu, fv in ((0.5, 0.0), (-0.5, 0.0), (0.25, 0.5), (0.25, -0.5), (-0.25, 0.5), (-0.25, -0.5)):
        du = fu * length
        dv = fv * width
        ok &= spec.film_mask_xy(x + du * ca - dv * sa, y + du * sa + dv * ca)
    return ok


def _draw_shapes(params: _TypeParams, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    codes = np.array(sorted(params.shapes))
    weights = np.array([params.shapes[c].weight for c in codes], dtype=np.float64)
    shape = codes[rng.choice(len(codes), size=n, p=weights / weights.sum())]
    length = np.zeros(n)
    aspect = np.zeros(n)
    for code in codes:
        sel = shape == code
        p = params.shapes[int(code)]
        length[sel] = np.exp(rng.uniform(math.log(p.length_um[0]), math.log(p.length_um[1]), size=int(sel.sum())))
        aspect[sel] = rng.uniform(p.aspect[0], p.aspect[1], size=int(sel.sum()))
    width = np.maximum(length / aspect, 0.15)
    contrast = rng.uniform(params.contrast[0], params.contrast[1], size=n)
    contrast = np.where(shape == SHAPE_BLOCK, np.minimum(contrast * 1.6, 0.85), contrast)
    contrast = np.where(shape == SHAPE_NEEDLE, contrast * 0.9, contrast)
    diffracts = rng.uniform(size=n) < params.diffracting_fraction
    quality = np.where(diffracts, rng.beta(*params.quality_beta, size=n), 0.0)
    return {"shape": shape, "length_um": length, "width_um": width, "contrast": contrast,
            "diffracts": diffracts, "quality": quality}


def _place_crystals(spec: Specimen, params: _TypeParams, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Crystals singly and in clusters, all on film; rejection sampling with a bounded number of rounds."""
    if count == 0:
        return _empty_crystals()
    mean_cluster = (params.cluster_size[0] + params.cluster_size[1]) / 2.0
    n_clusters = round(count * params.cluster_fraction / mean_cluster)
    sizes = rng.integers(params.cluster_size[0], params.cluster_size[1] + 1, size=n_clusters)
    cluster_total = int(sizes.sum())
    if cluster_total > count:
        sizes = sizes[np.cumsum(sizes) <= count]
        cluster_total = int(sizes.sum())
    n_single = count - cluster_total
    # cluster seeds on film
    seeds_x, seeds_y = _sample_on_film(spec, len(sizes), rng)
    cluster_of = np.repeat(np.arange(len(sizes)), sizes)
    base_angle = rng.uniform(0, 180, size=len(sizes))
    parts: list[dict[str, np.ndarray]] = []
    # clustered crystals: offsets around their seed; retry off-film members a few times, then drop them
    pending = np.arange(cluster_total)
    for _ in range(12):
        if pending.size == 0:
            break
        cid = cluster_of[pending]
        m = pending.size
        shapes = _draw_shapes(params, m, rng)
        x = seeds_x[cid] + rng.normal(0, params.cluster_radius_um, size=m)
        y = seeds_y[cid] + rng.normal(0, params.cluster_radius_um, size=m)
        if params.aligned_clusters:
            angle = np.mod(base_angle[cid] + rng.normal(0, 6.0, size=m), 180.0)
        else:
            angle = rng.uniform(0, 180, size=m)
        ok = _footprint_on_film(spec, x, y, shapes["length_um"], shapes["width_um"], angle)
        part = {k: v[ok] for k, v in shapes.items()}
        part.update(x_um=x[ok], y_um=y[ok], angle_deg=angle[ok], cluster=cid[ok])
        parts.append(part)
        pending = pending[~ok]
    n_single += pending.size  # members that never fitted become singles, so the count holds
    remaining = n_single
    for _ in range(40):
        if remaining <= 0:
            break
        m = max(2 * remaining, 64)
        shapes = _draw_shapes(params, m, rng)
        x, y = _uniform_in_mesh(spec, m, rng)
        angle = rng.uniform(0, 180, size=m)
        ok = np.nonzero(_footprint_on_film(spec, x, y, shapes["length_um"], shapes["width_um"], angle))[0][:remaining]
        part = {k: v[ok] for k, v in shapes.items()}
        part.update(x_um=x[ok], y_um=y[ok], angle_deg=angle[ok], cluster=np.full(ok.size, -1, dtype=np.int64))
        parts.append(part)
        remaining -= ok.size
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # renumber clusters so that ids are dense in order of first appearance
    cluster = merged["cluster"]
    used = np.unique(cluster[cluster >= 0])
    remap = np.full(len(sizes) + 1, -1, dtype=np.int64)
    remap[used] = np.arange(used.size)
    merged["cluster"] = np.where(cluster >= 0, remap[np.maximum(cluster, 0)], -1)
    order = rng.permutation(merged["x_um"].shape[0])
    return {k: np.ascontiguousarray(v[order]) for k, v in merged.items()}


def _crystal_texture(crystals: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Thickness variation inside each crystal: a wedge (relative OD gradient, 1/um) and, for plates and
    blocks, a bend contour (a dark band of diffraction contrast across the crystal)."""
    n = crystals["x_um"].shape[0]
    length = np.maximum(crystals["length_um"], 0.1)
    direction = rng.uniform(0, 2 * np.pi, size=n)
    slope = rng.uniform(0.0, 0.8, size=n) / length  # up to +-40 % from the centre to the tip
    band_angle = rng.uniform(0, 2 * np.pi, size=n)
    has_band = np.isin(crystals["shape"], (SHAPE_PLATE, SHAPE_BLOCK)) & (rng.uniform(size=n) < 0.6)
    return {
        "wedge_x": slope * np.cos(direction),
        "wedge_y": slope * np.sin(direction),
        "bend_strength": np.where(has_band, rng.uniform(0.3, 1.5, size=n), 0.0),
        "bend_cos": np.cos(band_angle),
        "bend_sin": np.sin(band_angle),
        "bend_offset_um": rng.uniform(-0.3, 0.3, size=n) * length,
        "bend_width_um": rng.uniform(0.05, 0.15, size=n) * length,
    }


def _sample_on_film(spec: Specimen, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = [np.zeros(0)]
    ys: list[np.ndarray] = [np.zeros(0)]
    have = 0
    for _ in range(50):
        if have >= n:
            break
        x, y = _uniform_in_mesh(spec, max(2 * (n - have), 32), rng)
        ok = spec.film_mask_xy(x, y)
        xs.append(x[ok])
        ys.append(y[ok])
        have += int(ok.sum())
    if have < n:
        raise SpecimenError("could not find enough film to place objects on; lower empty_fraction/broken_fraction")
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def _place_ice(spec: Specimen, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if count == 0:
        return _empty_ice()
    x, y = _sample_on_film(spec, count, rng)
    radius = np.exp(rng.uniform(math.log(0.3), math.log(4.0), size=count))
    od = rng.uniform(1.2, 3.0, size=count)
    return {"x_um": x, "y_um": y, "radius_um": radius, "od": od}


def _place_debris(spec: Specimen, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if count == 0:
        return _empty_debris()
    x, y = _sample_on_film(spec, count, rng)
    radius = np.exp(rng.uniform(math.log(1.0), math.log(12.0), size=count))
    harmonics = rng.uniform(0.05, 0.3, size=(count, 4)) / np.arange(1, 5)
    phases = rng.uniform(0, 2 * np.pi, size=(count, 4))
    od = rng.uniform(0.3, 1.5, size=count)
    return {"x_um": x, "y_um": y, "radius_um": radius, "od": od, "harmonics": harmonics, "phases": phases}


def debris_distance_um(spec: Specimen, ids: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Signed distance (um) of points to the debris objects `ids` (broadcast together)."""
    d = spec.debris
    ids = np.asarray(ids, dtype=np.int64)
    return blob_distance_um(
        np.asarray(x_um) - d["x_um"][ids],
        np.asarray(y_um) - d["y_um"][ids],
        d["radius_um"][ids],
        d["harmonics"][ids],
        d["phases"][ids],
    )
