"""Real-world-like low-magnification TEM test images with known truth (a shared test helper).

`make_grid_image(...)` draws a grid-square view the way real images look, not the way the simulator
renders them: a tilted mesh of grid bars, support film with uneven illumination (a vignette and a
gradient), crystals (thin plates with internal bend contours and sharp edges), ice balls (round, smooth)
and debris (irregular, smooth), readout artefacts (hot pixels, a bright column, row stripes), an
annotation data bar burned into the bottom, optional tile seams (mis-stitched tiles with different
gains), either contrast polarity (bright field: crystals dark; dark field: crystals bright) and either an
8-bit export or 16-bit camera counts.

Everything is seeded; `SyntheticImage` carries the truth: crystal centres and radii (pixels), the
bar mask and the data-bar rows. Tests in every room import it as `from tests.synthetic_images import make_grid_image`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class PlantedCrystal:
    """A planted crystal: centre (row_px, col_px), radius (px, of its bounding circle), kind."""

    row_px: float
    col_px: float
    radius_px: float
    kind: str = "plate"


@dataclass(frozen=True)
class SyntheticImage:
    """A synthetic image and its truth."""

    image: np.ndarray
    crystals: tuple[PlantedCrystal, ...]
    bar_mask: np.ndarray
    ice_centres_px: tuple[tuple[float, float], ...] = ()
    data_bar_rows: tuple[int, int] | None = None
    polarity: str = "bright"
    hole_mask: np.ndarray | None = None
    notes: dict[str, float] = field(default_factory=dict)

    def crystal_mask(self, margin_px: float = 0.0) -> np.ndarray:
        """Pixels within radius + margin of any crystal centre."""
        rows, cols = self.image.shape
        mask = np.zeros((rows, cols), dtype=bool)
        for c in self.crystals:
            r = c.radius_px + margin_px
            r0, r1 = int(max(0, c.row_px - r)), int(min(rows, c.row_px + r + 1))
            c0, c1 = int(max(0, c.col_px - r)), int(min(cols, c.col_px + r + 1))
            yy, xx = np.mgrid[r0:r1, c0:c1]
            mask[r0:r1, c0:c1] |= (yy - c.row_px) ** 2 + (xx - c.col_px) ** 2 <= r * r
        return mask


def _bar_mask(
    shape: tuple[int, int], pitch_px: float, width_px: float, angle_deg: float, offset: np.ndarray
) -> np.ndarray:
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    theta = np.deg2rad(angle_deg)
    u = xx * np.cos(theta) + yy * np.sin(theta) + offset[0]
    v = -xx * np.sin(theta) + yy * np.cos(theta) + offset[1]
    in_u = np.mod(u, pitch_px) < width_px
    in_v = np.mod(v, pitch_px) < width_px
    return in_u | in_v


def _plate(rows: int, cols: int, rng: np.random.Generator, size_px: float) -> tuple[np.ndarray, float]:
    """A convex polygon plate (thickness map 0..1 with bend contours) in a (n, n) stamp."""
    n = int(np.ceil(size_px * 1.2)) | 1
    half = n // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    n_sides = int(rng.integers(4, 7))
    angle0 = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.5, 1.0)
    radius = size_px / 2
    inside = np.ones_like(xx, dtype=bool)
    for k in range(n_sides):
        a = angle0 + 2 * np.pi * k / n_sides
        inside &= xx * np.cos(a) + yy * np.sin(a) / aspect <= radius * np.cos(np.pi / n_sides)
    bend = 0.5 + 0.5 * np.cos(2 * np.pi * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / max(3.0, radius / 1.5))
    thickness = inside * (0.6 + 0.4 * bend)
    return thickness, radius


def make_grid_image(
    shape: tuple[int, int] = (768, 768),
    seed: int = 0,
    *,
    polarity: Literal["bright", "dark"] = "bright",
    bit_depth: Literal[8, 16] = 16,
    bars: bool = True,
    bar_pitch_px: float = 300.0,
    bar_width_px: float = 70.0,
    bar_angle_deg: float | None = None,
    n_crystals: int = 12,
    crystal_size_px: tuple[float, float] = (10.0, 22.0),
    crystal_contrast: float = 0.45,
    n_ice: int = 4,
    n_debris: int = 3,
    uneven_illumination: float = 0.25,
    artefacts: bool = True,
    data_bar: bool = True,
    tile_seams: bool = False,
    noise_counts: float = 1.0,
    torn_film_hole: bool = False,
    film_grain: float = 0.0,
    grain_px: float = 6.0,
) -> SyntheticImage:
    """A seeded real-world-like grid image; see the module docstring. Crystals lie on film only, away
    from bars, the data bar and each other (no overlaps). `torn_film_hole`: one square's film has a round
    hole (vacuum: about 8 % brighter than the film in bright field, dark in dark field; `hole_mask`).
    `film_grain`: the film's mottle at high magnification, a random texture correlated over `grain_px`
    pixels with this standard deviation (fraction of the transmission); drawn from its own seeded stream,
    so images without it are unchanged."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    angle = float(rng.uniform(-20, 20)) if bar_angle_deg is None else float(bar_angle_deg)
    offset = rng.uniform(0, bar_pitch_px, size=2)
    bar = _bar_mask(shape, bar_pitch_px, bar_width_px, angle, offset) if bars else np.zeros(shape, dtype=bool)
    data_rows = (rows - max(12, rows // 20), rows) if data_bar else None

    # "transmission" of the specimen: 1 on film, lower on things; bars 0
    coarse = ndimage.zoom(rng.normal(size=(8, 8)), (rows / 8, cols / 8), order=3)[:rows, :cols]
    film = 1.0 - 0.03 * coarse  # slowly varying film thickness
    if film_grain > 0:
        grain = ndimage.gaussian_filter(np.random.default_rng([seed, 1]).normal(size=shape), grain_px)
        film += film_grain * grain / max(float(grain.std()), 1e-12)
    scatter = np.zeros(shape)  # how much each object scatters (for dark field)
    margin = max(8.0, crystal_size_px[1])
    forbidden = ndimage.distance_transform_edt(~bar) < margin if bars else np.zeros(shape, dtype=bool)
    if data_rows is not None:
        forbidden[data_rows[0] - int(crystal_size_px[1]) * 2 :, :] = True
    forbidden[: int(crystal_size_px[1]), :] = True
    forbidden[:, : int(crystal_size_px[1])] = True
    forbidden[:, -int(crystal_size_px[1]) :] = True
    hole = np.zeros(shape, dtype=bool)
    if torn_film_hole:
        open_distance = ndimage.distance_transform_edt(~(bar | forbidden))
        centre = np.unravel_index(int(np.argmax(open_distance)), shape)
        radius = 0.8 * float(open_distance[centre])
        yy, xx = np.ogrid[0:rows, 0:cols]
        hole = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2) & ~bar
        forbidden |= ndimage.distance_transform_edt(~hole) < margin
    crystals: list[PlantedCrystal] = []
    attempts = 0
    while len(crystals) < n_crystals and attempts < n_crystals * 200:
        attempts += 1
        size = float(rng.uniform(*crystal_size_px))
        r, c = float(rng.uniform(0, rows)), float(rng.uniform(0, cols))
        if forbidden[int(r), int(c)]:
            continue
        stamp, radius = _plate(rows, cols, rng, size)
        half = stamp.shape[0] // 2
        r0, c0 = int(r) - half, int(c) - half
        if r0 < 0 or c0 < 0 or r0 + stamp.shape[0] > rows or c0 + stamp.shape[1] > cols:
            continue
        window = (slice(r0, r0 + stamp.shape[0]), slice(c0, c0 + stamp.shape[1]))
        if np.any(forbidden[window] & (stamp > 0)):
            continue
        film[window] -= crystal_contrast * stamp
        scatter[window] += stamp
        crystals.append(PlantedCrystal(float(int(r)), float(int(c)), radius))
        forbidden[max(0, r0 - half) : r0 + 3 * half, max(0, c0 - half) : c0 + 3 * half] = True
    ice: list[tuple[float, float]] = []
    for _ in range(n_ice):
        for _try in range(50):
            r, c = float(rng.uniform(0, rows)), float(rng.uniform(0, cols))
            if not forbidden[int(r), int(c)]:
                break
        radius = float(rng.uniform(6, 14))
        r0, r1 = int(max(0, r - radius - 1)), int(min(rows, r + radius + 2))
        c0, c1 = int(max(0, c - radius - 1)), int(min(cols, c + radius + 2))
        yy, xx = np.ogrid[r0:r1, c0:c1]
        dist2 = (yy - r) ** 2 + (xx - c) ** 2
        ball = np.clip(1 - dist2 / radius**2, 0, None) ** 0.5  # smooth sphere profile
        film[r0:r1, c0:c1] -= 0.5 * ball
        scatter[r0:r1, c0:c1] += 0.6 * ball
        ice.append((r, c))
        keep = int(3 * radius)
        forbidden[max(0, int(r) - keep) : int(r) + keep, max(0, int(c) - keep) : int(c) + keep] = True
    for _ in range(n_debris):
        r, c = int(rng.uniform(30, rows - 30)), int(rng.uniform(30, cols - 30))
        local = np.zeros((61, 61))
        local[30, 30] = 1.0
        local = ndimage.gaussian_filter(local, sigma=rng.uniform(4, 9))
        local = ndimage.gaussian_filter(local / local.max() * (rng.random(local.shape) > 0.3), 2)
        window = (slice(r - 30, r + 31), slice(c - 30, c + 31))
        film[window] -= 0.2 * local
        scatter[window] += 0.2 * local
    film[hole] = 1.08  # vacuum: nothing scatters
    scatter[hole] = -0.15  # dark field: darker than the film
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    vignette = 1.0 - uneven_illumination * (((yy - rows * 0.4) / rows) ** 2 + ((xx - cols * 0.6) / cols) ** 2) * 2
    gradient = 1.0 + uneven_illumination * 0.5 * (xx / cols - 0.5)
    illumination = vignette * gradient
    if polarity == "bright":
        signal = np.clip(film, 0.05, None) * illumination
    else:
        signal = (0.15 + 0.8 * np.clip(scatter, 0, 1.2)) * illumination
    signal[bar] = 0.0
    counts_scale = 20000.0
    expected = signal * counts_scale
    noisy = rng.poisson(np.clip(expected / max(noise_counts, 1e-3), 0, None)) * max(noise_counts, 1e-3)
    image = noisy + 200.0  # camera offset
    if tile_seams:
        tile = rows // 2
        image[:tile, : cols // 2] *= 1.08
        image[tile:, cols // 2 :] *= 0.93
        image = np.roll(image, 3, axis=1)  # a stitching shift leaves a visible seam
    if artefacts:
        hot = rng.integers(0, rows * cols, size=max(5, rows * cols // 20000))
        image.ravel()[hot] = 65000
        image[:, int(rng.integers(0, cols))] *= 1.3  # a bright column
        image[:: max(1, rows // 64), :] *= 1.02  # row stripes
    if data_rows is not None:
        image[data_rows[0] :, :] = 60000.0 if polarity == "dark" else 500.0
        for k in range(8):  # burned-in text blocks
            c0 = 20 + k * 40
            if c0 + 20 < cols:
                image[data_rows[0] + 3 : data_rows[1] - 3, c0 : c0 + 20] = 64000.0 if polarity == "bright" else 800
    image = np.clip(image, 0, 65535)
    if bit_depth == 8:
        low, high = np.percentile(image, [0.5, 99.5])
        out = np.clip((image - low) / max(high - low, 1) * 255, 0, 255).astype(np.uint8)
    else:
        out = image.astype(np.uint16)
    return SyntheticImage(
        image=out,
        crystals=tuple(crystals),
        bar_mask=bar,
        ice_centres_px=tuple(ice),
        data_bar_rows=data_rows,
        polarity=polarity,
        hole_mask=hole if torn_film_hole else None,
        notes={"bar_angle_deg": angle},
    )


def make_simulated_export(
    shape_px: int = 256,
    seed: int = 0,
    *,
    specimen: str = "protein-plates",
    conditions: str | None = "realistic",
    preset: str = "atlas",
    band: Literal["dark", "bright"] = "dark",
) -> SyntheticImage:
    """A simulator frame (with the named `simulator.conditions` set) turned into a user's 8-bit export with a
    burned-in data bar (`simulator.exports.export_8bit`), with its truth: crystal centres and radii (pixels, off
    the data bar), the bar mask and the data-bar rows. Centred on an intact grid square picked by `seed`."""
    from simulator import create_simulated_microscope
    from simulator.exports import export_8bit

    microscope = create_simulated_microscope(specimen, seed, camera_shape_px=(shape_px, shape_px),
                                             conditions=conditions)
    truth = microscope.ground_truth
    centres = truth.square_centres_um()
    x_um, y_um = centres[np.random.default_rng([seed, 5]).integers(len(centres))]
    microscope.set_preset(preset)
    microscope.move_stage(x_um=float(x_um), y_um=float(y_um))
    frame = microscope.acquire(0.5)
    exported = export_8bit(frame.image, pixel_size_um=frame.metadata.pixel_size_um, band=band, seed=seed)
    matrix = microscope.true_image_to_stage_matrix(preset)
    stage = np.asarray(microscope.true_stage_xy_um())
    centre = np.array([(shape_px - 1) / 2.0, (shape_px - 1) / 2.0])
    cols, rows = np.meshgrid(np.arange(shape_px) - centre[0], np.arange(shape_px) - centre[1])
    bar = truth.bar_mask_xy(stage[0] + matrix[0, 0] * cols + matrix[0, 1] * rows,
                            stage[1] + matrix[1, 0] * cols + matrix[1, 1] * rows)
    um_per_px = float(np.sqrt(abs(np.linalg.det(matrix))))
    inverse = np.linalg.inv(matrix)
    half_um = shape_px * um_per_px
    crystals = []
    for record in truth.crystals_in_box(stage[0] - half_um, stage[0] + half_um, stage[1] - half_um, stage[1] + half_um):
        col, row = inverse @ (np.array([record.x_um, record.y_um]) - stage) + centre
        if 0 <= col < shape_px and 0 <= row < exported.data_bar_rows[0]:
            crystals.append(PlantedCrystal(float(row), float(col), record.length_um / 2.0 / um_per_px, record.shape))
    return SyntheticImage(image=exported.image, crystals=tuple(crystals), bar_mask=bar,
                          data_bar_rows=exported.data_bar_rows, notes={"um_per_px": um_per_px})
