"""Film defects of real grids, in stage micrometres: folds, tears, carbon edges, thick-ice gradients, contamination.

A `FilmDefects` holds the defects of one specimen (made by `simulator.conditions.generate_film_defects`;
`Specimen.conditions` is None when every condition is off). Each defect but contamination belongs to one
grid square and only acts inside it (its square's open area and the bars around it, which are opaque
anyway); its geometry is given in stage um, and in the square's mesh axes (du, dv from the square's
centre) where that is simpler.

- fold: the film folded over onto itself along a long, gently curved line: double film thickness over
  `width_um` (1-4 um), low contrast (about the film's own OD again, ~8 % darker on 20-nm carbon);
- tear: a crack in the film, a vacuum gap up to `width_um` wide in its middle, closing towards its tips,
  with curled (rolled-up, several layers thick) film along both lips: a dark band of `curl_od` over
  `curl_width_um`;
- carbon edge: in a square the film covers only partly, a straight-ish (wavy by a few um) film edge with
  vacuum beyond and a slight curl along the edge;
- ice gradient: extra vitreous ice on the film of a square, thickest at the bars and falling off
  (`mode="bars"`, a meniscus) or ramping linearly across the square (`mode="ramp"`), OD
  `ICE_OD_PER_NM` per nm;
- contamination: irregular dark patches (hydrocarbon build-up, dirt) of very varied size, as arrays like
  `Specimen.debris`, drawn by imaging like the debris.

None of them is a crystal and none diffracts (`simulator.diffraction` sees film where the film is and
vacuum in gaps). `kind_xy` says which defect lies at a point (for evaluation: "this false positive was a
fold"); `truth_dict` is the JSON truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from simulator.shapes import blob_distance_um

#: Optical density per nm of vitreous ice (bright field, objective aperture): a mean free path of ~350 nm.
#: Order of magnitude after aperture-limited scattering measurements at 300 kV (Rice et al. 2018, J. Struct.
#: Biol. 204:38-44); not a figure for this simulated 200-kV instrument (a guess at that).
ICE_OD_PER_NM = 1.0 / 350.0
#: Defect kinds `kind_xy` reports, in the order it prefers them where several overlap.
DEFECT_KINDS: tuple[str, ...] = ("contamination", "tear", "fold", "carbon_edge", "ice_gradient")
#: A gradient counts as "ice_gradient" in `kind_xy` where it adds at least this fraction of its peak thickness.
_GRADIENT_KIND_FRACTION = 0.25


@dataclass(frozen=True)
class SquareAxes:
    """The mesh geometry defects need: mesh rotation (cos, sin), pitch and half the open width (um)."""

    cos_m: float
    sin_m: float
    pitch_um: float
    half_open_um: float

    def local(self, centre_xy_um: tuple[float, float], x_um: np.ndarray, y_um: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(du, dv, inside): mesh-axis offsets (um) from a square's centre, and True inside that square."""
        dx = x_um - centre_xy_um[0]
        dy = y_um - centre_xy_um[1]
        du = dx * self.cos_m + dy * self.sin_m
        dv = -dx * self.sin_m + dy * self.cos_m
        inside = np.maximum(np.abs(du), np.abs(dv)) < self.pitch_um / 2.0
        return du, dv, inside

    def to_stage(self, centre_xy_um: tuple[float, float], du_um: np.ndarray, dv_um: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Mesh-axis offsets (um) from a square's centre -> stage (x, y) um."""
        x = centre_xy_um[0] + du_um * self.cos_m - dv_um * self.sin_m
        y = centre_xy_um[1] + du_um * self.sin_m + dv_um * self.cos_m
        return x, y


@dataclass(frozen=True)
class LineDefect:
    """A fold or a tear along a polyline (stage um) in the grid square centred at `square_xy_um`.

    Fold: double film over `width_um`. Tear: a vacuum gap `width_um` wide in the middle (closing towards the
    tips as sqrt(sin(pi t))), with curled film of OD `curl_od` over `curl_width_um` on each lip.
    """

    kind: str
    square_xy_um: tuple[float, float]
    points_um: tuple[tuple[float, float], ...]
    width_um: float
    curl_width_um: float = 0.0
    curl_od: float = 0.0


@dataclass(frozen=True)
class CarbonEdge:
    """A film edge across the square centred at `square_xy_um`: vacuum where, in mesh axes,
    du cos(normal) + dv sin(normal) + wave(along) > `offset_um`; wave = sum of two sinusoids (um)."""

    square_xy_um: tuple[float, float]
    normal_deg: float
    offset_um: float
    wave_amplitude_um: tuple[float, float]
    wave_length_um: tuple[float, float]
    wave_phase_rad: tuple[float, float]
    curl_width_um: float
    curl_od: float


@dataclass(frozen=True)
class IceGradient:
    """Extra ice (nm) on the film of the square centred at `square_xy_um`: `thickness_nm` x exp(-d / `decay_um`)
    with d the distance from the nearest bar (`mode="bars"`), or a linear ramp from 0 to `thickness_nm` across
    the square towards `direction_deg` in mesh axes (`mode="ramp"`)."""

    square_xy_um: tuple[float, float]
    mode: str
    thickness_nm: float
    decay_um: float
    direction_deg: float


def polyline_distance_um(x_um: np.ndarray, y_um: np.ndarray, points_um: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(distance um, position 0..1 along the line) of points to the nearest point of a polyline ((m, 2) um)."""
    best = np.full(np.shape(x_um), np.inf)
    where = np.zeros(np.shape(x_um))
    segments = len(points_um) - 1
    for k in range(segments):
        ax, ay = points_um[k]
        bx, by = points_um[k + 1]
        ex, ey = bx - ax, by - ay
        t = np.clip(((x_um - ax) * ex + (y_um - ay) * ey) / max(ex * ex + ey * ey, 1e-12), 0.0, 1.0)
        d = np.hypot(x_um - ax - t * ex, y_um - ay - t * ey)
        closer = d < best
        best = np.where(closer, d, best)
        where = np.where(closer, (k + t) / segments, where)
    return best, where


def _ramp(distance_um: np.ndarray, edge_um: float) -> np.ndarray:
    """Coverage 0..1 of a region whose signed distance (um, positive inside) is given, edge ramp `edge_um` wide."""
    return np.clip(distance_um / edge_um + 0.5, 0.0, 1.0)


def _band(distance_um: np.ndarray, lo_um: float, hi_um: float, edge_um: float) -> np.ndarray:
    """Coverage 0..1 of the band lo <= distance <= hi (um), with edge ramps."""
    half = (hi_um - lo_um) / 2.0
    return _ramp(half - np.abs(distance_um - (lo_um + half)), edge_um)


class _Effects:
    """What the defects do to the film on a set of points: film presence, thickness factor, extra OD."""

    def __init__(self, n: int) -> None:
        self.presence = np.ones(n)
        self.thickness = np.ones(n)
        self.extra_od = np.zeros(n)


class FilmDefects:
    """The film defects and contamination of one specimen (see the module doc); read-only."""

    def __init__(self, axes: SquareAxes, folds: tuple[LineDefect, ...], tears: tuple[LineDefect, ...],
                 edges: tuple[CarbonEdge, ...], gradients: tuple[IceGradient, ...],
                 contamination: dict[str, np.ndarray]) -> None:
        self.axes = axes
        self.folds = folds
        self.tears = tears
        self.edges = edges
        self.gradients = gradients
        self.contamination = {k: _frozen(v) for k, v in contamination.items()}
        self._square_defects = (*folds, *tears, *edges, *gradients)
        self._reach_um = axes.pitch_um / math.sqrt(2.0) + 1.0

    # film effects ---------------------------------------------------------------------------------
    def _near(self, centre_xy_um: tuple[float, float], x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Indices of the (flat) points within reach of a square centred at `centre_xy_um`."""
        r = self._reach_um
        return np.nonzero((np.abs(x_um - centre_xy_um[0]) < r) & (np.abs(y_um - centre_xy_um[1]) < r))[0]

    def effects(self, x_um: np.ndarray, y_um: np.ndarray, edge_um: float) -> _Effects | None:
        """The film effects of every square defect at flat arrays of points, or None if none reaches them."""
        effects: _Effects | None = None
        for defect in self._square_defects:
            sel = self._near(defect.square_xy_um, x_um, y_um)
            if sel.size == 0:
                continue
            if effects is None:
                effects = _Effects(x_um.shape[0])
            x, y = x_um[sel].astype(np.float64), y_um[sel].astype(np.float64)
            if isinstance(defect, LineDefect):
                self._line_effects(defect, x, y, edge_um, effects, sel)
            elif isinstance(defect, CarbonEdge):
                self._edge_effects(defect, x, y, edge_um, effects, sel)
            else:
                _, _, inside = self.axes.local(defect.square_xy_um, x, y)
                effects.extra_od[sel] += self._gradient_nm(defect, x, y) * inside * ICE_OD_PER_NM
        return effects

    def _line_effects(self, defect: LineDefect, x: np.ndarray, y: np.ndarray, edge_um: float, effects: _Effects,
                      sel: np.ndarray) -> None:
        _, _, inside = self.axes.local(defect.square_xy_um, x, y)
        distance, along = polyline_distance_um(x, y, np.asarray(defect.points_um))
        if defect.kind == "fold":
            effects.thickness[sel] += _ramp(defect.width_um / 2.0 - distance, edge_um) * inside
            return
        lip = distance - self._half_gap_um(defect, along)
        effects.presence[sel] *= 1.0 - _ramp(-lip, edge_um) * inside
        effects.extra_od[sel] += defect.curl_od * _band(lip, 0.0, defect.curl_width_um, edge_um) * inside

    @staticmethod
    def _half_gap_um(defect: LineDefect, along: np.ndarray) -> np.ndarray:
        """Half the tear's gap (um) at positions 0..1 along it: widest in the middle, closed at the tips."""
        return defect.width_um / 2.0 * np.sqrt(np.clip(np.sin(np.pi * along), 0.0, 1.0))

    def _edge_distance_um(self, edge: CarbonEdge, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(signed distance um into the vacuum beyond a carbon edge, inside its square)."""
        du, dv, inside = self.axes.local(edge.square_xy_um, x, y)
        normal = math.radians(edge.normal_deg)
        across = du * math.cos(normal) + dv * math.sin(normal)
        along = -du * math.sin(normal) + dv * math.cos(normal)
        wave = sum(a * np.sin(2.0 * np.pi * along / lam + p) for a, lam, p in
                   zip(edge.wave_amplitude_um, edge.wave_length_um, edge.wave_phase_rad, strict=True))
        return across + wave - edge.offset_um, inside

    def _edge_effects(self, edge: CarbonEdge, x: np.ndarray, y: np.ndarray, edge_um: float, effects: _Effects,
                      sel: np.ndarray) -> None:
        beyond, inside = self._edge_distance_um(edge, x, y)
        effects.presence[sel] *= 1.0 - _ramp(beyond, edge_um) * inside
        effects.extra_od[sel] += edge.curl_od * _band(-beyond, 0.0, edge.curl_width_um, edge_um) * inside

    def _gradient_nm(self, gradient: IceGradient, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Extra ice thickness (nm) of a gradient at points of its square (not masked to the square)."""
        du, dv, _ = self.axes.local(gradient.square_xy_um, x, y)
        half = self.axes.half_open_um
        if gradient.mode == "bars":
            from_bar = np.maximum(half - np.maximum(np.abs(du), np.abs(dv)), 0.0)
            return gradient.thickness_nm * np.exp(-from_bar / gradient.decay_um)
        direction = math.radians(gradient.direction_deg)
        position = (du * math.cos(direction) + dv * math.sin(direction)) / (2.0 * half) + 0.5
        return gradient.thickness_nm * np.clip(position, 0.0, 1.0)

    def apply_to_film_od(self, x_um: np.ndarray, y_um: np.ndarray, film_od: np.ndarray, edge_um: float) -> None:
        """Change a block of film OD (float32, 0 where there is no film) in place for the defects at the
        stage points (x, y) um of its pixels: folds thicken it, tears and carbon edges remove it (vacuum),
        curled lips and ice add OD where film remains. Contamination is drawn as objects, not here."""
        effects = self.effects(x_um.ravel(), y_um.ravel(), edge_um)
        if effects is None:
            return
        flat = film_od.reshape(-1)
        has_film = flat > 0
        flat *= (effects.presence * effects.thickness).astype(np.float32)
        flat += (effects.extra_od * effects.presence * has_film).astype(np.float32)

    def vacuum_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where a tear or a carbon edge leaves no film (bool, the broadcast shape of x and y)."""
        x, y = np.broadcast_arrays(np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64))
        effects = self.effects(x.ravel(), y.ravel(), 1e-6)
        if effects is None:
            return np.zeros(x.shape, dtype=bool)
        return (effects.presence < 0.5).reshape(x.shape)

    # truth --------------------------------------------------------------------------------------------
    def contamination_distance_um(self, ids: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Signed distance (um, positive inside) of points to the contamination patches `ids` (broadcast)."""
        c = self.contamination
        return blob_distance_um(np.asarray(x_um) - c["x_um"][ids], np.asarray(y_um) - c["y_um"][ids],
                                c["radius_um"][ids], c["harmonics"][ids], c["phases"][ids])

    def kind_xy(self, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 0.0) -> np.ndarray:
        """Which defect lies at each point (within `tolerance_um`): a name of `DEFECT_KINDS` or '' (str array)."""
        x, y = np.broadcast_arrays(np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64))
        fx, fy = x.ravel(), y.ravel()
        hits = {kind: np.zeros(fx.shape, dtype=bool) for kind in DEFECT_KINDS}
        for defect in self._square_defects:
            sel = self._near(defect.square_xy_um, fx, fy)
            if sel.size:
                kind, hit = self._defect_hit(defect, fx[sel], fy[sel], tolerance_um)
                hits[kind][sel] |= hit
        c = self.contamination
        reach = c["radius_um"] * (1.0 + c["harmonics"].sum(axis=1)) + tolerance_um if c["x_um"].size else []
        for i, r in enumerate(reach):
            sel = np.nonzero((np.abs(fx - c["x_um"][i]) < r) & (np.abs(fy - c["y_um"][i]) < r))[0]
            hits["contamination"][sel] |= self.contamination_distance_um(np.int64(i), fx[sel], fy[sel]) >= -tolerance_um
        result = np.full(fx.shape, "", dtype=object)
        for kind in reversed(DEFECT_KINDS):
            result[hits[kind]] = kind
        return result.reshape(x.shape)

    def _defect_hit(self, defect: Any, x: np.ndarray, y: np.ndarray, tol: float) -> tuple[str, np.ndarray]:
        """(kind, where the square defect lies within `tol` um of the points)."""
        du, dv, inside = self.axes.local(defect.square_xy_um, x, y)
        if isinstance(defect, LineDefect):
            distance, along = polyline_distance_um(x, y, np.asarray(defect.points_um))
            if defect.kind == "fold":
                return "fold", inside & (distance <= defect.width_um / 2.0 + tol)
            reach = self._half_gap_um(defect, along) + defect.curl_width_um + tol
            return "tear", inside & (distance <= reach)
        if isinstance(defect, CarbonEdge):
            beyond, inside = self._edge_distance_um(defect, x, y)
            return "carbon_edge", inside & (beyond >= -(defect.curl_width_um + tol))
        open_area = np.maximum(np.abs(du), np.abs(dv)) <= self.axes.half_open_um
        thick = self._gradient_nm(defect, x, y) >= _GRADIENT_KIND_FRACTION * defect.thickness_nm
        return "ice_gradient", inside & open_area & thick

    def counts(self) -> dict[str, int]:
        """How many defects of each kind."""
        return {"fold": len(self.folds), "tear": len(self.tears), "carbon_edge": len(self.edges),
                "ice_gradient": len(self.gradients), "contamination": int(self.contamination["x_um"].size)}

    def truth_dict(self) -> dict[str, Any]:
        """JSON-serialisable truth: folds, tears, carbon edges, ice gradients (records) and contamination
        (x_um, y_um, radius_um per patch), in stage um (mesh axes for angles within a square)."""
        c = self.contamination
        return {
            "folds": [asdict(d) for d in self.folds],
            "tears": [asdict(d) for d in self.tears],
            "carbon_edges": [asdict(d) for d in self.edges],
            "ice_gradients": [asdict(d) for d in self.gradients],
            "contamination": [{"x_um": float(x), "y_um": float(y), "radius_um": float(r)}
                              for x, y, r in zip(c["x_um"], c["y_um"], c["radius_um"], strict=True)],
        }


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array
