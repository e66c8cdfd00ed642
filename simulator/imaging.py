"""Rendering what the camera sees: specimen -> bright-field transmission -> electrons -> uint16 counts.

`render(scene, stage_xy_um, preset, camera, optics_errors, rng, exposure_s=...)` is a pure function of
its arguments. The geometry follows `drivers.geometry` exactly: the specimen point under pixel
p = (col, row) is `stage_xy_um + A_true @ (p - image_centre_px(shape))` with
`A_true = true_matrix(preset, optics_errors)` (pixel size x (1 + scale error) x rotation [x flip]).

Image model (bright field, with objective aperture):
- the scene gives an optical density (OD, natural-log units) per pixel: film ~0.05-0.2, crystals
  -ln(1 - contrast), ice balls 1.2-3 at their centre (spheres), debris 0.3-1.5, bars and rim ~7 (opaque);
- the film carries a fixed grain (a seeded texture laid on the stage at 10 nm or 250 nm texels, +-2 %
  intensity, fading when much finer than a pixel), so plain film registers between frames;
- crystals have a thickness wedge and, for plates and blocks, often a dark bend contour;
- defocus and the instrument's resolution blur every edge: objects are drawn analytically with an edge
  ramp as wide as the blur kernel (equivalent to a Gaussian blur of the geometry, at no per-pixel cost);
- uneven illumination (a beam centred off the frame centre, falling off towards the corners);
- electrons per pixel = dose rate x exposure x illumination x exp(-OD); shot noise (Gaussian
  approximation of Poisson, exact in mean and variance) plus read noise; gain and offset; a few hot
  pixels fixed per camera; clipped to 0..65535 (saturation) and rounded to uint16.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from drivers.base import OpticsPreset
from drivers.geometry import image_centre_px
from simulator.shapes import blob_distance_um, crystal_distance_um
from simulator.specimen import FILM_OD_PER_NM, SQUARE_BROKEN, SQUARE_EMPTY, Specimen

#: Optical density of grid bars, the rim and the holder (transmits ~0.1 %).
BAR_OD = 7.0
_SPLAT_RADIUS_PX = 0.75
_COARSE_STEP = 16
_BATCH_RADIUS_PX = 8
#: Film grain: texel sizes (um) and OD amplitude (natural-log units, ~ +-2 % intensity).
_TEXTURE_TEXEL_UM = (0.01, 0.25)
_TEXTURE_OD = 0.02
_BLOCK_ROWS = 128
_POOL: ThreadPoolExecutor | None = None


def _forget_pool_after_fork() -> None:
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def for_blocks(rows: int, work: Callable[[int, int], None]) -> None:
    """Run `work(r0, r1)` over row blocks of a frame on a small thread pool (numpy releases the GIL)."""
    global _POOL
    blocks = [(r0, min(r0 + _BLOCK_ROWS, rows)) for r0 in range(0, rows, _BLOCK_ROWS)]
    if len(blocks) == 1:
        work(*blocks[0])
        return
    if _POOL is None:  # (re)created lazily, also in a forked child, whose copy has no threads
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="render")
    for future in [_POOL.submit(work, r0, r1) for r0, r1 in blocks]:
        future.result()


@dataclass(frozen=True)
class SimPreset:
    """A simulator optics preset: the public `OpticsPreset` plus what the simulator needs to render.

    `dose_e_per_px_s`: electrons per (binned) pixel per second through vacuum at the frame centre;
    `blur_um`: the instrument's resolution at this magnification (Gaussian sigma, um), to which the
    defocus adds `|defocus_um| x 1 mrad`; `beam_diameter_um`: the illuminated / selected area seen by
    `acquire_diffraction`.
    """

    optics: OpticsPreset
    dose_e_per_px_s: float
    blur_um: float
    beam_diameter_um: float

    @property
    def name(self) -> str:
        """The preset's name."""
        return self.optics.name

    @property
    def pixel_size_um(self) -> float:
        """Nominal pixel size (um/px) after binning."""
        return self.optics.pixel_size_um

    def blur_sigma_um(self, z_um: float = 0.0) -> float:
        """Total blur (Gaussian sigma, um): resolution plus defocus x 1 mrad beam convergence, where the
        defocus is the preset's plus the specimen's height `z_um` off the eucentric plane."""
        return math.hypot(self.blur_um, abs(self.optics.defocus_um + z_um) * 1e-3)


@dataclass(frozen=True)
class OpticsErrors:
    """The hidden truth of a preset: camera-vs-stage rotation (deg), pixel-size error (fraction), flip,
    and the illumination (beam centre offset as a fraction of the frame half-size, corner fall-off)."""

    rotation_deg: float = 0.0
    scale_error: float = 0.0
    flip: bool = False
    illumination_centre: tuple[float, float] = (0.0, 0.0)
    illumination_falloff: float = 0.0


@dataclass(frozen=True)
class CameraModel:
    """Camera: unbinned sensor shape (rows, cols), gain (counts/e), offset and read noise (counts).

    `noise=False` gives noise-free frames (for tests that compare pixels); `readout_s_per_mpx` is the
    readout time per million (binned) pixels plus `readout_base_s`.
    """

    shape_px: tuple[int, int] = (2048, 2048)
    gain_counts_per_e: float = 2.0
    offset_counts: float = 100.0
    read_noise_counts: float = 3.0
    hot_pixels: int = 12
    hot_pixel_seed: int = 0
    noise: bool = True
    readout_base_s: float = 0.05
    readout_s_per_mpx: float = 0.06
    _hot_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def frame_shape(self, binning: int) -> tuple[int, int]:
        """(rows, cols) of a frame at `binning`."""
        return (max(1, self.shape_px[0] // binning), max(1, self.shape_px[1] // binning))

    def readout_s(self, shape_px: tuple[int, int]) -> float:
        """Seconds to read out a frame of `shape_px`."""
        return self.readout_base_s + self.readout_s_per_mpx * shape_px[0] * shape_px[1] / 1e6

    def hot_pixel_positions(self, shape_px: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the camera's hot pixels in a frame of `shape_px` (fixed per camera seed)."""
        if shape_px not in self._hot_cache:
            rng = np.random.default_rng([self.hot_pixel_seed, shape_px[0], shape_px[1], 11])
            rows = rng.integers(0, shape_px[0], size=self.hot_pixels)
            cols = rng.integers(0, shape_px[1], size=self.hot_pixels)
            self._hot_cache[shape_px] = (rows, cols)
        return self._hot_cache[shape_px]


class Scene(Protocol):
    """Something the camera can look at: returns the transmission (0..1, float32) of a frame."""

    def transmission(
        self, stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray, shape_px: tuple[int, int], edge_um: float
    ) -> np.ndarray:
        """Bright-field transmission of every pixel of a frame of `shape_px` centred at `stage_xy_um`.

        `matrix_um_per_px` maps (col, row) pixel offsets from the centre to stage um; `edge_um` is the
        width over which an edge rises (pixel size and blur combined).
        """
        ...


def true_matrix(preset: SimPreset, errors: OpticsErrors) -> np.ndarray:
    """A_true (2x2, um per px): pixel (col, row) offsets -> stage (x, y) offsets for this preset."""
    angle = math.radians(errors.rotation_deg)
    scale = preset.pixel_size_um * (1.0 + errors.scale_error)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    flip = np.diag([-1.0, 1.0]) if errors.flip else np.eye(2)
    return scale * rotation @ flip


def edge_width_um(preset: SimPreset, matrix_um_per_px: np.ndarray, z_um: float = 0.0) -> float:
    """Width (um) of the linear edge ramp: one pixel combined with the blur (10-90 % ~ 2.5 sigma)."""
    pixel_um = float(np.sqrt(abs(np.linalg.det(matrix_um_per_px))))
    return math.hypot(pixel_um, 2.5 * preset.blur_sigma_um(z_um))


def render(
    scene: Scene | Specimen,
    stage_xy_um: tuple[float, float],
    preset: SimPreset,
    camera: CameraModel,
    optics_errors: OpticsErrors,
    rng: np.random.Generator,
    *,
    exposure_s: float,
    beam_blanked: bool = False,
    z_um: float = 0.0,
) -> np.ndarray:
    """The uint16 frame the camera records at `stage_xy_um` (true stage position, um) in `preset`.

    `z_um` (stage height off the eucentric plane) adds to the preset's defocus and so to the blur.

    `scene` is a `Specimen` (wrapped in `SpecimenScene`) or any `Scene` (e.g. dataset tiles). `rng`
    draws the noise only, so the same arguments and rng state give the same frame.
    """
    shape = camera.frame_shape(preset.optics.binning)
    matrix = true_matrix(preset, optics_errors)
    if beam_blanked:
        transmission = np.zeros(shape, dtype=np.float32)
    else:
        if isinstance(scene, Specimen):
            scene = SpecimenScene(scene)
        transmission = scene.transmission(stage_xy_um, matrix, shape, edge_width_um(preset, matrix, z_um))
    return expose(transmission, preset, camera, optics_errors, rng, exposure_s=exposure_s)


def illumination(shape_px: tuple[int, int], errors: OpticsErrors) -> np.ndarray:
    """Relative beam intensity (1 at the beam centre) over a frame, float32."""
    rows, cols = shape_px
    half_r, half_c = max(rows / 2.0, 1.0), max(cols / 2.0, 1.0)
    centre_c = (cols - 1) / 2.0 + errors.illumination_centre[0] * half_c
    centre_r = (rows - 1) / 2.0 + errors.illumination_centre[1] * half_r
    dc = ((np.arange(cols, dtype=np.float32) - centre_c) / half_c) ** 2
    dr = ((np.arange(rows, dtype=np.float32) - centre_r) / half_r) ** 2
    falloff = np.float32(errors.illumination_falloff / 2.0)  # /2: a corner is at (1, 1)
    return np.float32(1.0) - falloff * (dr[:, None] + dc[None, :])


def expose(
    transmission: np.ndarray,
    preset: SimPreset,
    camera: CameraModel,
    errors: OpticsErrors,
    rng: np.random.Generator,
    *,
    exposure_s: float,
) -> np.ndarray:
    """Transmission (0..1) -> uint16 counts: illumination x dose x exposure, then `electrons_to_counts`."""
    shape = (int(transmission.shape[0]), int(transmission.shape[1]))
    light = illumination(shape, errors)
    light *= np.float32(preset.dose_e_per_px_s * exposure_s)
    electrons = np.empty(shape, dtype=np.float32)

    def block(r0: int, r1: int) -> None:
        np.multiply(transmission[r0:r1], light[r0:r1], out=electrons[r0:r1])

    for_blocks(shape[0], block)
    return electrons_to_counts(electrons, camera, rng)


def electrons_to_counts(electrons: np.ndarray, camera: CameraModel, rng: np.random.Generator) -> np.ndarray:
    """Expected electrons per pixel -> uint16 counts: shot + read noise, gain, offset, hot pixels, 16-bit clip.

    The noise of each row block comes from its own generator seeded from `rng`, so the result does not
    depend on how blocks are scheduled.
    """
    shape = (int(electrons.shape[0]), int(electrons.shape[1]))
    out = np.empty(shape, dtype=np.uint16)
    n_blocks = -(-shape[0] // _BLOCK_ROWS)
    seeds = rng.integers(0, 2**63 - 1, size=n_blocks) if camera.noise else np.zeros(n_blocks, dtype=np.int64)
    gain = np.float32(camera.gain_counts_per_e)
    read_var = np.float32(camera.read_noise_counts**2)

    def block(r0: int, r1: int) -> None:
        mean_e = np.maximum(electrons[r0:r1], np.float32(0.0))
        counts = mean_e * gain
        if camera.noise:
            # Poisson shot noise (variance = mean electrons) + Gaussian read noise, as one Gaussian draw
            sigma = mean_e
            sigma *= gain * gain
            sigma += read_var
            np.sqrt(sigma, out=sigma)
            block_rng = np.random.default_rng(int(seeds[r0 // _BLOCK_ROWS]))
            sigma *= block_rng.standard_normal(sigma.shape, dtype=np.float32)
            counts += sigma
        counts += np.float32(camera.offset_counts)
        np.clip(counts, 0.0, 65535.0, out=counts)
        np.rint(counts, out=counts)
        out[r0:r1] = counts

    for_blocks(shape[0], block)
    if camera.noise and camera.hot_pixels:
        rows, cols = camera.hot_pixel_positions(shape)
        out[rows, cols] = np.maximum(out[rows, cols], np.uint16(30000))
    return out


# -------------------------------------------------------------------------------------------------
# the procedural specimen as a scene
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Pixel geometry of one frame: stage um of pixel (col, row) = origin + A @ (col, row)."""

    shape: tuple[int, int]
    matrix: np.ndarray
    origin_um: np.ndarray  # stage um of pixel (0, 0)
    inverse: np.ndarray

    @classmethod
    def make(cls, stage_xy_um: tuple[float, float], matrix: np.ndarray, shape: tuple[int, int]) -> _Frame:
        matrix = np.asarray(matrix, dtype=np.float64)
        origin = np.asarray(stage_xy_um, dtype=np.float64) - matrix @ image_centre_px(shape)
        return cls(shape, matrix, origin, np.linalg.inv(matrix))

    def corners_um(self) -> np.ndarray:
        rows, cols = self.shape
        corners = np.array([[0, 0], [cols - 1, 0], [0, rows - 1], [cols - 1, rows - 1]], dtype=np.float64)
        return self.origin_um + corners @ self.matrix.T

    def to_pixel(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage um -> (col, row) pixel coordinates (float)."""
        dx = np.asarray(x_um) - self.origin_um[0]
        dy = np.asarray(y_um) - self.origin_um[1]
        inv = self.inverse
        return inv[0, 0] * dx + inv[0, 1] * dy, inv[1, 0] * dx + inv[1, 1] * dy

    def affine(self, coeff_x: float, coeff_y: float, const: float, rows: slice, cols: slice) -> np.ndarray:
        """float32 array over the pixel block of  const + cx * x_um + cy * y_um  (x, y affine in pixels)."""
        a = self.matrix
        c0 = const + coeff_x * self.origin_um[0] + coeff_y * self.origin_um[1]
        per_col = coeff_x * a[0, 0] + coeff_y * a[1, 0]
        per_row = coeff_x * a[0, 1] + coeff_y * a[1, 1]
        col = np.arange(cols.start, cols.stop, dtype=np.float64) * per_col
        row = np.arange(rows.start, rows.stop, dtype=np.float64) * per_row + c0
        return np.add.outer(row.astype(np.float32), col.astype(np.float32))


def crystal_texture(crystals: dict[str, np.ndarray], i: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Relative OD inside crystals `i` at offsets (dx, dy) um: wedge x (1 + bend contour), 0.3..3."""
    wedge = 1.0 + crystals["wedge_x"][i] * dx + crystals["wedge_y"][i] * dy
    across = crystals["bend_cos"][i] * dx + crystals["bend_sin"][i] * dy - crystals["bend_offset_um"][i]
    band = crystals["bend_strength"][i] * np.exp(-((across / crystals["bend_width_um"][i]) ** 2))
    return np.clip(wedge * (1.0 + band), 0.3, 3.0)


class SpecimenScene:
    """Renders a `Specimen` (grid, film, contamination, crystals) as bright-field transmission."""

    def __init__(self, specimen: Specimen) -> None:
        self.specimen = specimen

    def transmission(
        self, stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray, shape_px: tuple[int, int], edge_um: float
    ) -> np.ndarray:
        """See `Scene.transmission`."""
        od = self.optical_density(stage_xy_um, matrix_um_per_px, shape_px, edge_um)
        np.negative(od, out=od)
        np.exp(od, out=od)
        return od

    def optical_density(
        self, stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray, shape_px: tuple[int, int], edge_um: float
    ) -> np.ndarray:
        """Optical density (float32) of every pixel: film, bars, rim, contamination and crystals."""
        frame = _Frame.make(stage_xy_um, matrix_um_per_px, shape_px)
        od = self._grid_od(frame, edge_um)
        self._add_objects(frame, od, edge_um)
        return od

    # grid, film, rim ------------------------------------------------------------------------------
    def _grid_od(self, frame: _Frame, edge_um: float) -> np.ndarray:
        """OD of film, bars and rim over the whole frame, computed in row blocks on worker threads."""
        rows, cols = frame.shape
        od = np.empty((rows, cols), dtype=np.float32)
        coarse = self._thickness_coarse(frame)
        corners = frame.corners_um()
        near_rim = float(np.hypot(corners[:, 0], corners[:, 1]).max()) > self.specimen.mesh_radius_um - 2 * edge_um
        for_blocks(rows, lambda r0, r1: self._grid_block(frame, edge_um, coarse, near_rim, od, r0, r1))
        return od

    def _grid_block(
        self, frame: _Frame, edge_um: float, coarse: np.ndarray, near_rim: bool, od: np.ndarray, r0: int, r1: int
    ) -> None:
        spec = self.specimen
        block_rows, all_cols = slice(r0, r1), slice(0, frame.shape[1])
        cos_m, sin_m = math.cos(math.radians(spec.mesh_angle_deg)), math.sin(math.radians(spec.mesh_angle_deg))
        ox, oy = spec.mesh_offset_um
        pitch = np.float32(spec.pitch_um)
        inv_edge = np.float32(1.0 / edge_um)
        u = frame.affine(cos_m, sin_m, -(ox * cos_m + oy * sin_m), block_rows, all_cols)
        v = frame.affine(-sin_m, cos_m, ox * sin_m - oy * cos_m, block_rows, all_cols)

        # square index of every pixel -> per-square tables restricted to the squares in this block
        iu = u * np.float32(1.0 / spec.pitch_um)
        np.floor(iu, out=iu)
        iv = v * np.float32(1.0 / spec.pitch_um)
        np.floor(iv, out=iv)
        i_min, i_max = int(iu.min()), int(iu.max())
        j_min, j_max = int(iv.min()), int(iv.max())
        k = spec.square_index_offset
        n = spec.square_state.shape[0]
        ii = np.clip(np.arange(i_min, i_max + 1) + k, 0, n - 1)
        jj = np.clip(np.arange(j_min, j_max + 1) + k, 0, n - 1)
        states = spec.square_state[np.ix_(ii, jj)]
        local_index = (iu - np.float32(i_min)).astype(np.int32)
        local_index *= np.int32(len(jj))
        local_index += (iv - np.float32(j_min)).astype(np.int32)

        # position in the square relative to its centre: fu, fv in [-pitch/2, pitch/2)
        iu += np.float32(0.5)
        iu *= pitch
        fu = np.subtract(u, iu, out=u)
        iv += np.float32(0.5)
        iv *= pitch
        fv = np.subtract(v, iv, out=v)
        open_half = np.float32((spec.pitch_um - spec.bar_width_um) / 2.0)
        # distance into the open area (positive inside); bar coverage = ramp(-distance)
        bar_cov = np.abs(fu, out=iu)
        np.maximum(bar_cov, np.abs(fv, out=iv), out=bar_cov)
        bar_cov -= open_half
        bar_cov *= inv_edge
        bar_cov += np.float32(0.5)
        np.clip(bar_cov, 0.0, 1.0, out=bar_cov)

        # film: thickness field x per-square factor, absent in empty squares and holes
        film_od = od[r0:r1]
        self._thickness_block(coarse, r0, r1, frame.shape[1], film_od)
        factor_table = spec.square_thickness_factor[np.ix_(ii, jj)] * (spec.options.film_thickness_nm * FILM_OD_PER_NM)
        factor_table = np.where(states == SQUARE_EMPTY, 0.0, factor_table).astype(np.float32).ravel()
        film_od *= np.take(factor_table, local_index)
        self._add_film_texture(frame, film_od, r0, r1)
        if np.any(states == SQUARE_BROKEN):
            self._cut_holes(fu, fv, ii, jj, local_index, inv_edge, film_od)
        if spec.conditions is not None:  # folds, tears, carbon edges, ice gradients
            x = frame.affine(1.0, 0.0, 0.0, block_rows, all_cols)
            spec.conditions.apply_to_film_od(x, frame.affine(0.0, 1.0, 0.0, block_rows, all_cols), film_od, edge_um)
        if near_rim:  # rim and holder outside the meshed area
            x = frame.affine(1.0, 0.0, 0.0, block_rows, all_cols)
            y = frame.affine(0.0, 1.0, 0.0, block_rows, all_cols)
            x *= x
            y *= y
            x += y
            radius = np.sqrt(x, out=x)
            radius -= np.float32(spec.mesh_radius_um)
            radius *= inv_edge
            radius += np.float32(0.5)
            rim_cov = np.clip(radius, 0.0, 1.0, out=radius)
            np.maximum(bar_cov, rim_cov, out=bar_cov)
        # od = film (1 - bar) + BAR_OD bar
        film_od -= film_od * bar_cov
        bar_cov *= np.float32(BAR_OD)
        film_od += bar_cov

    def _cut_holes(self, fu: np.ndarray, fv: np.ndarray, ii: np.ndarray, jj: np.ndarray, local_index: np.ndarray,
                   inv_edge: np.float32, film_od: np.ndarray) -> None:
        """Remove the film (with an edge ramp) inside the round holes of broken squares of a row block."""
        hole = self.specimen.square_hole[np.ix_(ii, jj)].reshape(-1, 3).astype(np.float32)
        hu = fu - np.take(hole[:, 0], local_index)
        hv = fv - np.take(hole[:, 1], local_index)
        hu *= hu
        hv *= hv
        hu += hv
        hole_dist = np.sqrt(hu, out=hu)
        hole_dist -= np.take(hole[:, 2], local_index)
        hole_dist *= inv_edge
        hole_dist += np.float32(0.5)
        film_od *= np.clip(hole_dist, 0.0, 1.0, out=hole_dist)

    def _add_film_texture(self, frame: _Frame, film_od: np.ndarray, r0: int, r1: int) -> None:
        """Add the film's grain (OD +-`_TEXTURE_OD`) where there is film, at the texture scale that suits
        the pixel size; a texture much finer than a pixel averages out (its amplitude falls)."""
        pixel_um = float(np.sqrt(abs(np.linalg.det(frame.matrix))))
        texel_um = next((t for t in _TEXTURE_TEXEL_UM if t >= 1.5 * pixel_um), _TEXTURE_TEXEL_UM[-1])
        amplitude = _TEXTURE_OD * min(1.0, texel_um / (2.0 * pixel_um)) ** 2
        if amplitude < 0.002:
            return
        tile = self.specimen.film_texture()
        size = tile.shape[0]
        rows, cols = slice(r0, r1), slice(0, frame.shape[1])
        tx = frame.affine(1.0 / texel_um, 0.0, 0.0, rows, cols)
        ty = frame.affine(0.0, 1.0 / texel_um, 0.0, rows, cols)
        fx = np.floor(tx)
        fy = np.floor(ty)
        tx -= fx
        ty -= fy
        ix = fx.astype(np.int64) & (size - 1)
        iy = (fy.astype(np.int64) & (size - 1)) * size
        ix1 = (ix + 1) & (size - 1)
        iy1 = (iy + size) & (size * size - 1)
        flat = tile.ravel()
        top = np.take(flat, iy + ix)
        top += (np.take(flat, iy + ix1) - top) * tx
        bottom = np.take(flat, iy1 + ix)
        bottom += (np.take(flat, iy1 + ix1) - bottom) * tx
        top += (bottom - top) * ty
        top *= np.float32(amplitude)
        top *= film_od > 0
        film_od += top

    def _thickness_coarse(self, frame: _Frame) -> np.ndarray:
        """The relative film thickness sampled every `_COARSE_STEP` px of the frame (float32)."""
        rows, cols = frame.shape
        sub_r = np.arange(0, rows + _COARSE_STEP, _COARSE_STEP, dtype=np.float64)
        sub_c = np.arange(0, cols + _COARSE_STEP, _COARSE_STEP, dtype=np.float64)
        cc, rr = np.meshgrid(sub_c, sub_r)
        x = frame.origin_um[0] + frame.matrix[0, 0] * cc + frame.matrix[0, 1] * rr
        y = frame.origin_um[1] + frame.matrix[1, 0] * cc + frame.matrix[1, 1] * rr
        return self.specimen.thickness_field_xy(x, y).astype(np.float32)

    @staticmethod
    def _thickness_block(coarse: np.ndarray, r0: int, r1: int, cols: int, out: np.ndarray) -> None:
        """Bilinear interpolation of the coarse thickness samples to rows r0..r1 (separable)."""
        col_pos = np.arange(cols, dtype=np.float32) / _COARSE_STEP
        c0 = np.minimum(col_pos.astype(np.int64), coarse.shape[1] - 2)
        wc = col_pos - c0
        along_cols = coarse[:, c0] * (1 - wc) + coarse[:, c0 + 1] * wc  # (coarse rows, cols)
        row_pos = np.arange(r0, r1, dtype=np.float32) / _COARSE_STEP
        i0 = np.minimum(row_pos.astype(np.int64), coarse.shape[0] - 2)
        wr = (row_pos - i0)[:, None]
        np.multiply(along_cols[i0], 1 - wr, out=out)
        out += along_cols[i0 + 1] * wr

    # objects ----------------------------------------------------------------------------------------
    def _add_objects(self, frame: _Frame, od: np.ndarray, edge_um: float) -> None:
        spec = self.specimen
        corners = frame.corners_um()
        x_lo, y_lo = corners.min(axis=0)
        x_hi, y_hi = corners.max(axis=0)
        pixel_um = float(np.sqrt(abs(np.linalg.det(frame.matrix))))

        c = spec.crystals
        c_radius = np.hypot(c["length_um"], c["width_um"]) / 2.0
        crystal_od = -np.log1p(-np.clip(c["contrast"], 0.0, 0.99))
        draw_objects(
            frame, od, edge_um, pixel_um, c["x_um"], c["y_um"], c_radius, (x_lo, x_hi, y_lo, y_hi),
            area_um2=np.where(c["shape"] == 0, 0.75, 1.0) * c["length_um"] * c["width_um"],
            od_value=crystal_od,
            # thinner than the edge ramp: drawn edge-wide with the OD scaled down (integrated OD kept)
            distance=lambda i, dx, dy: crystal_distance_um(
                dx, dy, np.maximum(c["length_um"][i], edge_um), np.maximum(c["width_um"][i], edge_um),
                c["angle_deg"][i], c["shape"][i],
            ),
            thin=lambda i: np.minimum(1.0, c["length_um"][i] / edge_um) * np.minimum(1.0, c["width_um"][i] / edge_um),
            profile=lambda i, dx, dy: crystal_texture(c, i, dx, dy),
        )
        ice = spec.ice
        draw_objects(
            frame, od, edge_um, pixel_um, ice["x_um"], ice["y_um"], ice["radius_um"], (x_lo, x_hi, y_lo, y_hi),
            area_um2=np.pi * ice["radius_um"] ** 2 * (2.0 / 3.0),  # sphere: mean thickness 2/3 of the centre
            od_value=ice["od"],
            distance=lambda i, dx, dy: ice["radius_um"][i] - np.sqrt(dx * dx + dy * dy),
            profile=lambda i, dx, dy: np.sqrt(np.clip(1.0 - (dx * dx + dy * dy) / ice["radius_um"][i] ** 2, 0.0, 1.0)),
        )
        deb = spec.debris
        d_radius = deb["radius_um"] * (1.0 + deb["harmonics"].sum(axis=1))
        draw_objects(
            frame, od, edge_um, pixel_um, deb["x_um"], deb["y_um"], d_radius, (x_lo, x_hi, y_lo, y_hi),
            area_um2=np.pi * deb["radius_um"] ** 2,
            od_value=deb["od"],
            distance=lambda i, dx, dy: blob_distance_um(
                dx, dy, deb["radius_um"][i], deb["harmonics"][i], deb["phases"][i]
            ),
        )
        if spec.conditions is not None and spec.conditions.contamination["x_um"].size:
            dirt = spec.conditions.contamination
            draw_objects(
                frame, od, edge_um, pixel_um, dirt["x_um"], dirt["y_um"],
                dirt["radius_um"] * (1.0 + dirt["harmonics"].sum(axis=1)), (x_lo, x_hi, y_lo, y_hi),
                area_um2=np.pi * dirt["radius_um"] ** 2 * 0.6, od_value=dirt["od"],
                distance=lambda i, dx, dy: blob_distance_um(
                    dx, dy, dirt["radius_um"][i], dirt["harmonics"][i], dirt["phases"][i]
                ),
                # thicker in the middle: 0.3 at the rim to 1 at the centre
                profile=lambda i, dx, dy: 0.3 + 0.7 * np.sqrt(
                    np.clip(1.0 - (dx * dx + dy * dy) / dirt["radius_um"][i] ** 2, 0.0, 1.0)
                ),
            )


def draw_objects(
    frame: _Frame,
    od: np.ndarray,
    edge_um: float,
    pixel_um: float,
    x_um: np.ndarray,
    y_um: np.ndarray,
    radius_um: np.ndarray,
    box: tuple[float, float, float, float],
    *,
    area_um2: np.ndarray,
    od_value: np.ndarray,
    distance: object,
    thin: object = None,
    profile: object = None,
) -> None:
    """Add the OD of objects at (x_um, y_um) with bounding radius `radius_um` to `od` (a frame of `frame`):
    sub-pixel objects are splatted (area-weighted), larger ones drawn on a patch with the edge ramp `edge_um`.
    `distance(ids, dx, dy)` is their signed distance (um), `thin(ids)` an OD factor, `profile(ids, dx, dy)`
    their relative thickness; `box` (x_lo, x_hi, y_lo, y_hi) um is the frame's extent."""
    x_lo, x_hi, y_lo, y_hi = box
    near = np.nonzero(
        (x_um + radius_um >= x_lo) & (x_um - radius_um <= x_hi) & (y_um + radius_um >= y_lo)
        & (y_um - radius_um <= y_hi)
    )[0]
    if near.size == 0:
        return
    rows, cols = frame.shape
    col_f, row_f = frame.to_pixel(x_um[near], y_um[near])
    radius_px = radius_um[near] / pixel_um
    small = radius_px < _SPLAT_RADIUS_PX
    # splat: the object's integrated OD over one pixel, at its nearest pixel
    col_i = np.rint(col_f[small]).astype(np.int64)
    row_i = np.rint(row_f[small]).astype(np.int64)
    inside = (col_i >= 0) & (col_i < cols) & (row_i >= 0) & (row_i < rows)
    if np.any(inside):
        ids = near[small][inside]
        weight = (od_value[ids] * area_um2[ids] / (pixel_um * pixel_um)).astype(np.float32)
        np.add.at(od, (row_i[inside], col_i[inside]), weight)

    def coverage(ids: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        value = np.clip(distance(ids, dx, dy) / edge_um + 0.5, 0.0, 1.0)  # type: ignore[operator]
        if thin is not None:
            value = value * thin(ids)  # type: ignore[operator]
        value = value * od_value[ids]
        if profile is not None:
            value = value * np.maximum(profile(ids, dx, dy), 0.25)  # type: ignore[operator]
        return value

    # medium objects: all at once on fixed-size patches around their centre pixel
    medium = ~small & (radius_px + 2.0 <= _BATCH_RADIUS_PX)
    if np.any(medium):
        ids = near[medium]
        offsets = np.arange(-_BATCH_RADIUS_PX, _BATCH_RADIUS_PX + 1)
        pc = np.rint(col_f[medium]).astype(np.int64)[:, None, None] + offsets[None, None, :]
        pr = np.rint(row_f[medium]).astype(np.int64)[:, None, None] + offsets[None, :, None]
        pc, pr = np.broadcast_arrays(pc, pr)
        m = frame.matrix
        dx = frame.origin_um[0] + m[0, 0] * pc + m[0, 1] * pr - x_um[ids][:, None, None]
        dy = frame.origin_um[1] + m[1, 0] * pc + m[1, 1] * pr - y_um[ids][:, None, None]
        value = coverage(ids[:, None, None], dx, dy)
        keep = (pc >= 0) & (pc < cols) & (pr >= 0) & (pr < rows) & (value > 0)
        np.add.at(od, (pr[keep], pc[keep]), value[keep].astype(np.float32))
    # large objects: one patch each, clipped to the frame
    large = ~small & ~medium
    for cf, rf, rad, i in zip(col_f[large], row_f[large], radius_px[large] + 2.0, near[large], strict=True):
        c0, c1 = max(math.floor(cf - rad), 0), min(math.ceil(cf + rad) + 1, cols)
        r0, r1 = max(math.floor(rf - rad), 0), min(math.ceil(rf + rad) + 1, rows)
        if c0 >= c1 or r0 >= r1:
            continue
        dx = frame.affine(1.0, 0.0, -float(x_um[i]), slice(r0, r1), slice(c0, c1))
        dy = frame.affine(0.0, 1.0, -float(y_um[i]), slice(r0, r1), slice(c0, c1))
        od[r0:r1, c0:c1] += coverage(np.int64(i), dx, dy).astype(np.float32)
