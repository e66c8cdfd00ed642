"""Conditions of real grids the basic simulator lacks, as options that default to off, and one set that turns them on.

Specimen conditions are `SpecimenOptions` fields (all 0 by default, so a specimen without them is the one
the simulator always made, draw for draw): `fold_count`, `tear_count`, `carbon_edge_fraction`,
`ice_gradient_fraction`, `contamination_count` (see `simulator.film_defects` for the models) and
`stacked_fraction` (plates partly on top of each other; both are crystals in the truth, and each lists the
other in `CrystalTruth.overlaps`). The microscope condition is `beam_drift_fraction` (per-exposure beam
intensity, `simulator.microscope`), which with the stage's backlash and repeat error makes the frames of a
montage differ in brightness and stitch imperfectly. `simulator.exports.export_8bit` makes what a user's
8-bit export with a burned-in data bar looks like.

`CONDITION_SETS` names sets: `none` (the default) and `realistic` (`REALISTIC_CONDITIONS`); the CLI's
`--conditions NAME` and `create_simulated_microscope(conditions=NAME)` pick one. The amounts of
`realistic` are guesses of what a typical screening grid shows (no published counts): 40 folds and 25
tears over the ~265 squares of a 200-mesh grid, 5 % of squares with a carbon edge, 20 % with an ice
gradient, 300 contamination patches, 8 % of plates with a partner on top, 3 % beam intensity jitter.

Every condition draws from its own random stream of the specimen seed, so turning one on leaves the
others, and the rest of the specimen's draws, unchanged where they do not interact (crystals, ice balls
and debris still avoid vacuum that tears and carbon edges open).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from simulator.film_defects import CarbonEdge, FilmDefects, IceGradient, LineDefect, SquareAxes

if TYPE_CHECKING:
    from simulator.specimen import Specimen, SpecimenOptions

#: Specimen option fields of the conditions (all off by default).
SPECIMEN_CONDITION_FIELDS: tuple[str, ...] = (
    "fold_count", "tear_count", "carbon_edge_fraction", "ice_gradient_fraction", "contamination_count",
    "stacked_fraction",
)
#: The realistic amounts (guesses; see the module doc): specimen options and microscope options.
REALISTIC_CONDITIONS: dict[str, Any] = {
    "specimen_options": {
        "fold_count": 40, "tear_count": 25, "carbon_edge_fraction": 0.05, "ice_gradient_fraction": 0.2,
        "contamination_count": 300, "stacked_fraction": 0.08,
    },
    "beam_drift_fraction": 0.03,
}
CONDITION_SETS: dict[str, dict[str, Any]] = {"none": {}, "realistic": REALISTIC_CONDITIONS}


def condition_kwargs(name: str | None) -> dict[str, Any]:
    """`create_simulated_microscope` keyword arguments of the named condition set (`CONDITION_SETS`);
    `ValueError` naming the sets for an unknown name. None means `none`."""
    key = name or "none"
    if key not in CONDITION_SETS:
        raise ValueError(f"unknown conditions {name!r}; choose one of: {', '.join(CONDITION_SETS)}")
    return {k: dict(v) if isinstance(v, dict) else v for k, v in CONDITION_SETS[key].items()}


def any_specimen_condition(opts: SpecimenOptions) -> bool:
    """True if any film defect or contamination option is on (stacked plates are crystals, apart)."""
    return any(getattr(opts, name) for name in SPECIMEN_CONDITION_FIELDS if name != "stacked_fraction")


# -------------------------------------------------------------------------------------------------
# film defects
# -------------------------------------------------------------------------------------------------


def generate_film_defects(spec: Specimen, opts: SpecimenOptions, rng: np.random.Generator) -> FilmDefects | None:
    """The film defects and contamination `opts` ask for on the grid of `spec`, or None when all are off."""
    if not any_specimen_condition(opts):
        return None
    axes = SquareAxes(math.cos(math.radians(spec.mesh_angle_deg)), math.sin(math.radians(spec.mesh_angle_deg)),
                      spec.pitch_um, (spec.pitch_um - spec.bar_width_um) / 2.0)
    squares = spec.squares()
    intact = [(s.x_um, s.y_um) for s in squares if s.state == "intact"]
    filmed = [(s.x_um, s.y_um) for s in squares if s.state in ("intact", "broken")]
    folds = tuple(_fold(axes, c, rng) for c in _pick(filmed, opts.fold_count, rng, replace=True))
    tears = tuple(_tear(axes, c, rng) for c in _pick(filmed, opts.tear_count, rng, replace=True))
    edges = tuple(_carbon_edge(axes, c, rng) for c in _pick(intact, round(opts.carbon_edge_fraction * len(intact)),
                                                            rng, replace=False))
    n_gradients = round(opts.ice_gradient_fraction * len(filmed))
    gradients = tuple(_ice_gradient(c, rng) for c in _pick(filmed, n_gradients, rng, replace=False))
    without_contamination = FilmDefects(axes, folds, tears, edges, gradients, _contamination(0, spec, rng))
    return FilmDefects(axes, folds, tears, edges, gradients,
                       _contamination(opts.contamination_count, spec, rng, without_contamination))


def _pick(centres: list[tuple[float, float]], n: int, rng: np.random.Generator, *, replace: bool
          ) -> list[tuple[float, float]]:
    """`n` square centres drawn from `centres` (fewer without replacement if there are fewer squares)."""
    if n <= 0 or not centres:
        return []
    n = n if replace else min(n, len(centres))
    return [centres[int(i)] for i in rng.choice(len(centres), size=n, replace=replace)]


def _curve(axes: SquareAxes, centre: tuple[float, float], du0: float, dv0: float, angle_rad: float, length_um: float,
           bow_um: float, jitter_um: np.ndarray) -> tuple[tuple[float, float], ...]:
    """A polyline (stage um) of len(jitter)+1... points: a chord of `length_um` through (du0, dv0) of the square,
    bowed by `bow_um` in the middle, each inner point pushed sideways by `jitter_um`."""
    t = np.linspace(0.0, 1.0, jitter_um.size)
    side = 4.0 * t * (1.0 - t) * bow_um + jitter_um
    du = du0 + (t - 0.5) * length_um * math.cos(angle_rad) - side * math.sin(angle_rad)
    dv = dv0 + (t - 0.5) * length_um * math.sin(angle_rad) + side * math.cos(angle_rad)
    x, y = axes.to_stage(centre, du, dv)
    return tuple((float(a), float(b)) for a, b in zip(x, y, strict=True))


def _fold(axes: SquareAxes, centre: tuple[float, float], rng: np.random.Generator) -> LineDefect:
    """A fold: a chord 0.6-1.3x the open width long through the middle part of the square, bowed by up to
    8 % of its length, 1-4 um wide (double film). Sizes are guesses from typical atlas images."""
    half = axes.half_open_um
    length = float(rng.uniform(0.6, 1.3)) * 2.0 * half
    du0, dv0 = rng.uniform(-0.4 * half, 0.4 * half, size=2)
    bow = float(rng.uniform(-0.08, 0.08)) * length
    points = _curve(axes, centre, float(du0), float(dv0), float(rng.uniform(0, math.pi)), length, bow, np.zeros(17))
    return LineDefect("fold", centre, points, width_um=float(rng.uniform(1.0, 4.0)))


def _tear(axes: SquareAxes, centre: tuple[float, float], rng: np.random.Generator) -> LineDefect:
    """A tear: a jagged crack 8-50 um long, gap up to 0.5-4 um, curled lips of OD 0.2-0.5 over 0.5-1.5 um (rolled
    film a few layers thick). Guesses."""
    half = axes.half_open_um
    length = float(np.exp(rng.uniform(math.log(8.0), math.log(50.0))))
    du0, dv0 = rng.uniform(-0.8 * half, 0.8 * half, size=2)
    jitter = rng.normal(0.0, 0.06 * length, size=9)
    jitter[[0, -1]] = 0.0
    points = _curve(axes, centre, float(du0), float(dv0), float(rng.uniform(0, math.pi)), length, 0.0, jitter)
    return LineDefect("tear", centre, points, width_um=float(rng.uniform(0.5, 4.0)),
                      curl_width_um=float(rng.uniform(0.5, 1.5)), curl_od=float(rng.uniform(0.2, 0.5)))


def _carbon_edge(axes: SquareAxes, centre: tuple[float, float], rng: np.random.Generator) -> CarbonEdge:
    """A film edge across the square leaving 20-80 % of it covered, wavy by 0.5-3 um over 15-60 um, with a
    slight curl (OD 0.05-0.15 over 0.5-1.5 um). Guesses."""
    half = axes.half_open_um
    return CarbonEdge(
        square_xy_um=centre, normal_deg=float(rng.uniform(0, 360)), offset_um=float(rng.uniform(-0.6, 0.6)) * half,
        wave_amplitude_um=tuple(float(a) for a in rng.uniform(0.5, 3.0, size=2)),  # type: ignore[arg-type]
        wave_length_um=tuple(float(a) for a in rng.uniform(15.0, 60.0, size=2)),  # type: ignore[arg-type]
        wave_phase_rad=tuple(float(a) for a in rng.uniform(0, 2 * math.pi, size=2)),  # type: ignore[arg-type]
        curl_width_um=float(rng.uniform(0.5, 1.5)), curl_od=float(rng.uniform(0.05, 0.15)),
    )


def _ice_gradient(centre: tuple[float, float], rng: np.random.Generator) -> IceGradient:
    """Half of the gradients thicken towards the bars (100-400 nm at the bar, 1/e over 5-20 um), half ramp
    0 -> 50-250 nm across the square. Guesses of what thick-ice squares look like."""
    if rng.uniform() < 0.5:
        return IceGradient(centre, "bars", float(rng.uniform(100.0, 400.0)), float(rng.uniform(5.0, 20.0)), 0.0)
    return IceGradient(centre, "ramp", float(rng.uniform(50.0, 250.0)), 0.0, float(rng.uniform(0.0, 360.0)))


def _contamination(count: int, spec: Specimen, rng: np.random.Generator, defects: FilmDefects | None = None
                   ) -> dict[str, np.ndarray]:
    """`count` irregular dark patches on film: radius 0.5-25 um (log-uniform), six harmonics of up to 35 %
    (ragged), OD 0.4-2.5 at the centre. Guesses (hydrocarbon build-up and dirt vary a lot)."""
    x, y = _sample_film(spec, count, rng, defects)
    radius = np.exp(rng.uniform(math.log(0.5), math.log(25.0), size=count))
    harmonics = rng.uniform(0.05, 0.35, size=(count, 6)) / np.arange(1, 7) ** 0.7
    phases = rng.uniform(0, 2 * np.pi, size=(count, 6))
    od = rng.uniform(0.4, 2.5, size=count)
    return {"x_um": x, "y_um": y, "radius_um": radius, "od": od, "harmonics": harmonics, "phases": phases}


def _sample_film(spec: Specimen, n: int, rng: np.random.Generator, defects: FilmDefects | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`n` points (um) uniform over the film of `spec` outside the vacuum of `defects` (fewer if it is scarce)."""
    xs, ys, have = [np.zeros(0)], [np.zeros(0)], 0
    for _ in range(50):
        if have >= n:
            break
        m = max(2 * (n - have), 32)
        radius = spec.mesh_radius_um * np.sqrt(rng.uniform(size=m))
        theta = rng.uniform(0, 2 * np.pi, size=m)
        x, y = radius * np.cos(theta), radius * np.sin(theta)
        ok = spec.film_mask_xy(x, y)
        if defects is not None:
            ok &= ~defects.vacuum_xy(x, y)
        xs.append(x[ok])
        ys.append(y[ok])
        have += int(ok.sum())
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


# -------------------------------------------------------------------------------------------------
# stacked plates
# -------------------------------------------------------------------------------------------------


def stack_plates(spec: Specimen, params: Any, crystals: dict[str, np.ndarray], fraction: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`crystals` with partners appended: for `fraction` of the plates and blocks, another crystal of the same
    shape (0.6-1.1x its length and width, turned by up to 40 deg) lying partly on top of it, its centre
    0.3-0.6 of their summed half-lengths away. Partners that would leave the film or not overlap are dropped.
    Adds `stacked_on` (the id a partner lies on; -1 for others). Amounts are guesses."""
    from simulator.shapes import SHAPE_BLOCK, SHAPE_PLATE
    from simulator.specimen import _crystal_texture, _draw_shapes, _footprint_on_film

    n = crystals["x_um"].shape[0]
    candidates = np.nonzero(np.isin(crystals["shape"], (SHAPE_PLATE, SHAPE_BLOCK)))[0]
    base = candidates[rng.uniform(size=candidates.size) < fraction]
    drawn = _draw_shapes(params, base.size, rng)
    scale = rng.uniform(0.6, 1.1, size=(2, base.size))
    length, width = crystals["length_um"][base] * scale[0], crystals["width_um"][base] * scale[1]
    angle = np.mod(crystals["angle_deg"][base] + rng.uniform(-40.0, 40.0, size=base.size), 180.0)
    direction = rng.uniform(0, 2 * np.pi, size=base.size)
    distance = rng.uniform(0.3, 0.6, size=base.size) * (crystals["length_um"][base] + length) / 2.0
    x = crystals["x_um"][base] + distance * np.cos(direction)
    y = crystals["y_um"][base] + distance * np.sin(direction)
    partner = {**drawn, "shape": crystals["shape"][base], "length_um": length, "width_um": width, "x_um": x,
               "y_um": y, "angle_deg": angle, "cluster": crystals["cluster"][base]}
    ok = _footprint_on_film(spec, x, y, length, width, angle) & _overlaps(crystals, base, partner)
    partner = {k: v[ok] for k, v in partner.items()}
    partner.update(_crystal_texture(partner, rng))
    merged = {k: np.concatenate([crystals[k], partner[k].astype(crystals[k].dtype)]) for k in crystals}
    merged["stacked_on"] = np.concatenate([np.full(n, -1, dtype=np.int64), base[ok]])
    return merged


def _overlaps(crystals: dict[str, np.ndarray], base: np.ndarray, partner: dict[str, np.ndarray]) -> np.ndarray:
    """True where a partner and its base share area: some point on the line between their centres is in both."""
    from simulator.shapes import crystal_distance_um

    t = np.linspace(0.0, 1.0, 21)[:, None]
    px = crystals["x_um"][base] + t * (partner["x_um"] - crystals["x_um"][base])
    py = crystals["y_um"][base] + t * (partner["y_um"] - crystals["y_um"][base])
    in_base = crystal_distance_um(px - crystals["x_um"][base], py - crystals["y_um"][base], crystals["length_um"][base],
                                  crystals["width_um"][base], crystals["angle_deg"][base], crystals["shape"][base]) > 0
    in_partner = crystal_distance_um(px - partner["x_um"], py - partner["y_um"], partner["length_um"],
                                     partner["width_um"], partner["angle_deg"], partner["shape"]) > 0
    return np.any(in_base & in_partner, axis=0)


# -------------------------------------------------------------------------------------------------
# what lies where (evaluation: what was a false positive?)
# -------------------------------------------------------------------------------------------------


def what_is_at_xy(spec: Specimen, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 1.0) -> np.ndarray:
    """What lies at each stage point (um), as a str array: 'crystal', a film defect ('contamination', 'tear',
    'fold', 'carbon_edge', 'ice_gradient'), 'ice_ball', 'debris', 'bar' (bar, rim, outside), 'vacuum' (no
    film: empty square, hole, tear, edge) or 'film'. Objects within `tolerance_um` (0..10) count; the first
    that applies in this order wins."""
    x, y = np.broadcast_arrays(np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64))
    result = np.where(spec.film_mask_xy(x, y), "film", "vacuum").astype(object)
    result[spec.bar_mask_xy(x, y)] = "bar"
    for name, objects in (("debris", spec.debris), ("ice_ball", spec.ice)):
        near = _near_round(objects, x, y, tolerance_um)
        result[near] = name
    if spec.conditions is not None:  # not on bars; ice only where there is film
        kinds = spec.conditions.kind_xy(x, y, tolerance_um)
        applies = (kinds != "") & (result != "bar") & ((kinds != "ice_gradient") | (result == "film"))
        result[applies] = kinds[applies]
    result[spec.crystal_id_xy(x, y, tolerance_um) >= 0] = "crystal"
    return result


def _near_round(objects: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, tolerance_um: float) -> np.ndarray:
    """True where a point lies within radius + tolerance of an object (ice balls; debris by its mean radius
    plus its largest bulge)."""
    hit = np.zeros(x.shape, dtype=bool)
    bulge = 1.0 + objects["harmonics"].sum(axis=1) if "harmonics" in objects else np.ones(objects["x_um"].size)
    for ox, oy, r in zip(objects["x_um"], objects["y_um"], objects["radius_um"] * bulge + tolerance_um, strict=True):
        box = (np.abs(x - ox) < r) & (np.abs(y - oy) < r)
        if box.any():
            hit[box] |= np.hypot(x[box] - ox, y[box] - oy) < r
    return hit
