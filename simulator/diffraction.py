"""Diffraction snapshots: what the camera shows in diffraction mode with the beam at a stage position.

The beam (selected area) is a disc of `SimPreset.beam_diameter_um` around the true stage position.
Sampling that disc gives the fractions of the beam on bars (blocked), film, ice and each crystal.

- Stacked plates (`stacked_fraction`) both diffract where they overlap: a multi-lattice pattern. Film
  defects and contamination do not diffract (tears and carbon edges only take film out of the beam).
- A diffracting crystal gives Bragg spots of its (seeded, per crystal) 2-D reciprocal lattice turned by
  the crystal's angle, out to a resolution limit of 4.0 - 3.0 x quality Angstrom; better crystals give
  more and sharper spots (spot sigma 1..4 px) and keep more of their spots in the excited zone.
- Film and ice give diffuse amorphous rings (carbon ~ 1/2.1 and 1/1.2 A^-1, ice ~ 1/3.7 A^-1).
- A bar blocks the beam: only the camera's offset and noise remain.
- Every pattern has the central beam halo and a beam stop (a disc with an arm to the edge).

Geometry: camera length L (mm) from the preset (default 1000 mm), 200 kV (lambda = 0.02508 A), a
14-um detector pixel x binning: radius_px = L x lambda x g / pixel, g in 1/A. What depends only on the
frame's shape and scale (the halo, the rings' profiles, the beam stop) is computed once per geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from simulator.imaging import CameraModel, SimPreset, electrons_to_counts
from simulator.specimen import Specimen

WAVELENGTH_A = 0.02508  # 200 kV electrons
DETECTOR_PIXEL_UM = 14.0
_CELL_A: dict[str, tuple[float, float]] = {
    "graphite-flakes": (2.4, 7.0),
    "asbestos-fibres": (5.0, 18.0),
    "protein-plates": (40.0, 120.0),
    "polymer-faint": (5.0, 25.0),
}
_N_BEAM_SAMPLES = 600


def beam_samples_um(diameter_um: float) -> np.ndarray:
    """(n, 2) offsets (um) spread evenly over a disc of `diameter_um` (a Fibonacci spiral)."""
    n = _N_BEAM_SAMPLES
    k = np.arange(n) + 0.5
    radius = diameter_um / 2.0 * np.sqrt(k / n)
    theta = k * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


def beam_contents(specimen: Specimen, x_um: float, y_um: float, diameter_um: float) -> dict[str, object]:
    """Fractions of the beam disc on bars, film, ice and each crystal (dict: bar, film, ice, crystals)."""
    offsets = beam_samples_um(diameter_um)
    x = x_um + offsets[:, 0]
    y = y_um + offsets[:, 1]
    bar = specimen.bar_mask_xy(x, y)
    film = specimen.film_mask_xy(x, y)
    ice = specimen.ice
    near_ice = np.nonzero(np.hypot(ice["x_um"] - x_um, ice["y_um"] - y_um) <= diameter_um / 2 + ice["radius_um"])[0]
    on_ice = np.zeros(x.shape, dtype=bool)
    for i in near_ice:
        on_ice |= np.hypot(x - ice["x_um"][i], y - ice["y_um"][i]) < ice["radius_um"][i]
    ids = specimen.crystal_id_xy(x, y)
    crystals: dict[int, float] = {}
    for cid in np.unique(ids[(ids >= 0) & ~bar]):
        crystals[int(cid)] = float(np.mean(ids == cid))
    if "stacked_on" in specimen.crystals:  # both plates of a stack are lit where they overlap
        crystals.update(_stacked_fractions(specimen, crystals, x, y, bar))
    thickness = float(np.mean(specimen.film_thickness_nm_xy(x[film], y[film]))) if film.any() else 0.0
    return {
        "bar": float(bar.mean()),
        "film": float(film.mean()),
        "film_thickness_nm": thickness,
        "ice": float((on_ice & ~bar).mean()),
        "crystals": crystals,
    }


def _stacked_fractions(specimen: Specimen, crystals: dict[int, float], x: np.ndarray, y: np.ndarray, bar: np.ndarray
                       ) -> dict[int, float]:
    """Beam fractions of the crystals of stacks in the beam (and their partners), each over its whole outline:
    `crystal_id_xy` gives an overlap to the top crystal only, but electrons pass through both."""
    stacked = specimen.crystals["stacked_on"]
    members = set(crystals)
    for cid in list(members):
        members.update(int(j) for j in np.nonzero(stacked == cid)[0])
        if stacked[cid] >= 0:
            members.add(int(stacked[cid]))
    fractions = {}
    for cid in sorted(members):
        if stacked[cid] >= 0 or np.any(stacked == cid):
            lit = (specimen.crystal_distance_um(np.int64(cid), x, y) >= 0) & ~bar
            if lit.any():
                fractions[cid] = float(lit.mean())
    return fractions


def px_per_inverse_angstrom(preset: SimPreset) -> float:
    """Detector radius (px) per 1/A of scattering vector at the preset's camera length and binning."""
    camera_length_mm = preset.optics.camera_length_mm or 1000.0
    return camera_length_mm * 1e3 * WAVELENGTH_A / (DETECTOR_PIXEL_UM * preset.optics.binning)


def render_diffraction(
    specimen: Specimen | None,
    true_xy_um: tuple[float, float],
    preset: SimPreset,
    camera: CameraModel,
    rng: np.random.Generator,
    *,
    exposure_s: float,
    beam_blanked: bool = False,
) -> np.ndarray:
    """The uint16 diffraction pattern of the area under the beam at `true_xy_um` (see module doc).

    Without a specimen (dataset tiles) the pattern holds the central beam and diffuse scatter only.
    """
    shape = camera.frame_shape(preset.optics.binning)
    rows, cols = shape
    cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    scale = px_per_inverse_angstrom(preset)
    geometry = _pattern_geometry(shape, scale)
    electrons = np.zeros(shape, dtype=np.float32)
    if not beam_blanked:
        if specimen is None:
            contents: dict[str, object] = {"bar": 0.0, "film": 1.0, "film_thickness_nm": 20.0, "ice": 0.0,
                                           "crystals": {}}
        else:
            contents = beam_contents(specimen, true_xy_um[0], true_xy_um[1], preset.beam_diameter_um)
        open_fraction = 1.0 - float(contents["bar"])  # type: ignore[arg-type]
        # central beam halo (low-angle scatter around the direct beam)
        electrons += np.float32(2000.0 * open_fraction) * geometry.halo
        # amorphous rings: carbon film and ice
        film_weight = float(contents["film"]) * float(contents["film_thickness_nm"]) / 20.0  # type: ignore[arg-type]
        ice_weight = float(contents["ice"]) * 3.0  # type: ignore[arg-type]
        for centre, width, weight in ((1 / 2.1, 0.06, film_weight), (1 / 1.2, 0.1, 0.5 * film_weight),
                                      (1 / 3.7, 0.05, ice_weight), (1 / 2.25, 0.06, 0.6 * ice_weight)):
            if weight > 0:
                electrons += np.float32(25.0 * weight) * geometry.ring(centre, width)
        if specimen is not None:
            for cid, fraction in contents["crystals"].items():  # type: ignore[union-attr]
                _add_bragg_spots(electrons, specimen, cid, fraction, scale, (cr, cc))
        # beam stop: a disc over the direct beam and an arm to the edge; nothing passes through it
        electrons[geometry.beam_stop] = 0.0
    electrons *= np.float32(exposure_s)
    return electrons_to_counts(electrons, camera, rng)


@dataclass(frozen=True)
class _PatternGeometry:
    """What a pattern of one shape and scale (px per 1/A) draws on whatever the beam sees, computed once:
    the central beam halo exp(-r / 25 px), each amorphous ring exp(-((g - centre) / width)^2) (g in 1/A) as
    asked for, and the beam stop mask. Read-only float32 (bool) arrays, the same values as computed afresh."""

    r_px: np.ndarray
    scale_px_per_inv_a: float
    halo: np.ndarray
    beam_stop: np.ndarray
    _rings: dict[tuple[float, float], np.ndarray] = field(default_factory=dict)

    def ring(self, centre_inv_a: float, width_inv_a: float) -> np.ndarray:
        """exp(-((g - centre) / width)^2) over the frame, g = r_px / scale (float32)."""
        key = (centre_inv_a, width_inv_a)
        if key not in self._rings:
            g = self.r_px / np.float32(self.scale_px_per_inv_a)  # 1/A per pixel
            ring = np.exp(-(((g - np.float32(centre_inv_a)) / np.float32(width_inv_a)) ** 2))
            ring.setflags(write=False)
            self._rings[key] = ring
        return self._rings[key]


@lru_cache(maxsize=3)
def _pattern_geometry(shape: tuple[int, int], scale_px_per_inv_a: float) -> _PatternGeometry:
    """The `_PatternGeometry` of frames of `shape` at `scale_px_per_inv_a`, kept for the last few asked for."""
    rows, cols = shape
    cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    r_px = np.hypot(np.arange(rows, dtype=np.float32)[:, None] - cr, np.arange(cols, dtype=np.float32)[None, :] - cc)
    halo = np.exp(-r_px / np.float32(25.0))
    beam_stop = _beam_stop_mask(shape)
    for array in (r_px, halo, beam_stop):
        array.setflags(write=False)
    return _PatternGeometry(r_px, scale_px_per_inv_a, halo, beam_stop)


def _beam_stop_mask(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    rr = np.arange(rows)[:, None] - cr
    ccol = np.arange(cols)[None, :] - cc
    radius = max(6.0, 0.025 * min(rows, cols))
    disc = rr * rr + ccol * ccol <= radius * radius
    arm = (np.abs(rr - 0.3 * ccol) <= radius * 0.4) & (ccol >= 0)
    return disc | arm


def _add_bragg_spots(
    electrons: np.ndarray, specimen: Specimen, cid: int, fraction: float, scale: float, centre: tuple[float, float]
) -> None:
    """Bragg spots of crystal `cid`, illuminated over `fraction` of the beam (see module doc)."""
    c = specimen.crystals
    if not bool(c["diffracts"][cid]):
        return
    quality = float(c["quality"][cid])
    rng = np.random.default_rng([specimen.seed, int(cid), 19])
    lo, hi = _CELL_A.get(specimen.specimen_type, (5.0, 30.0))
    a_len, b_len = rng.uniform(lo, hi, size=2)
    gamma = math.radians(rng.uniform(60.0, 120.0))
    angle = math.radians(float(c["angle_deg"][cid]))
    a_star = np.array([math.cos(angle), math.sin(angle)]) / a_len
    b_star = np.array([math.cos(angle + gamma), math.sin(angle + gamma)]) / b_len
    d_min_a = 4.0 - 3.0 * quality
    g_max = 1.0 / d_min_a
    n_max = math.ceil(g_max * max(a_len, b_len) / max(math.sin(gamma), 0.3)) + 1
    hk = np.stack(np.meshgrid(np.arange(-n_max, n_max + 1), np.arange(-n_max, n_max + 1)), axis=-1).reshape(-1, 2)
    hk = hk[np.any(hk != 0, axis=1)]
    g_vec = hk[:, :1] * a_star + hk[:, 1:] * b_star
    g_len = np.hypot(g_vec[:, 0], g_vec[:, 1])
    keep = g_len <= g_max
    hk, g_vec, g_len = hk[keep], g_vec[keep], g_len[keep]
    if g_len.size == 0:
        return
    # Wilson statistics x resolution fall-off x excitation (more of the zone for better crystals)
    strength = rng.exponential(1.0, size=g_len.size) * np.exp(-((g_len / g_max) ** 2) * 2.0)
    excited = rng.uniform(size=g_len.size) < 0.15 + 0.5 * quality
    strength = strength * excited
    peak = 4000.0 * min(1.0, 5.0 * fraction) * strength
    sigma_px = 1.0 + 3.0 * (1.0 - quality)
    col = centre[1] + g_vec[:, 0] * scale
    row = centre[0] + g_vec[:, 1] * scale
    rows, cols = electrons.shape
    visible = (peak > 0) & (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    col, row, peak = col[visible], row[visible], peak[visible]
    if col.size == 0:
        return
    half = math.ceil(3.0 * sigma_px)
    offs = np.arange(-half, half + 1)
    pc = np.rint(col).astype(np.int64)[:, None, None] + offs[None, None, :]
    pr = np.rint(row).astype(np.int64)[:, None, None] + offs[None, :, None]
    pc, pr = np.broadcast_arrays(pc, pr)
    value = peak[:, None, None] * np.exp(
        -((pc - col[:, None, None]) ** 2 + (pr - row[:, None, None]) ** 2) / (2.0 * sigma_px**2)
    )
    inside = (pc >= 0) & (pc < cols) & (pr >= 0) & (pr < rows)
    np.add.at(electrons, (pr[inside], pc[inside]), value[inside].astype(np.float32))
