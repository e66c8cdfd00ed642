"""Benchmark: rendering simulated frames, against a naive renderer in the same process.

Run by hand: `.venv/bin/python benchmarks/bench_simulator.py [--full] [--diffraction-only] [--repeats 3]`.

- fast: `simulator.imaging.render` (row blocks on a thread pool, float32, per-square lookup tables,
  objects drawn on small patches / splatted) for 1k, 2k and 4k frames at the atlas preset, plus
  overview and search at 2k, and a whole `SimulatedMicroscope.acquire` (clock, metadata included);
- naive: the textbook renderer: float64 stage coordinates for every pixel, the grid by `np.mod`, and
  every object in the field of view evaluated over the *whole* frame (per-pixel x per-object). It runs
  at 1k (and 2k with `--full`); its 4k time is extrapolated from 2k/1k (pixels x objects scale).

- diffraction: `simulator.diffraction.render_diffraction` + `agent.steps.diffraction_score.score_diffraction`
  of 1024x1024 patterns (crystals of the four specimen types, search preset) against the same model computed
  the plain way (every array per call, scipy's rank filters, a full sort per radius bin: the code before the
  geometry cache and the exact fast paths), alternating in the same process; it checks that both give the
  same uint16 frames and the same scores.

Prints median wall and CPU times and the speed-up ratio. Wall time varies with machine load (other
processes); CPU time (all threads) much less.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from agent.steps.diffraction_score import DiffractionScore, score_diffraction
from drivers.geometry import image_centre_px
from simulator import diffraction
from simulator.imaging import (
    BAR_OD,
    CameraModel,
    OpticsErrors,
    SimPreset,
    edge_width_um,
    electrons_to_counts,
    render,
    true_matrix,
)
from simulator.microscope import SimulatedMicroscope, default_presets
from simulator.shapes import crystal_distance_um
from simulator.specimen import FILM_OD_PER_NM, Specimen, generate_specimen


def naive_render(spec: Specimen, xy: tuple[float, float], preset: SimPreset, shape: tuple[int, int],
                 errors: OpticsErrors, rng: np.random.Generator, exposure_s: float) -> np.ndarray:
    """Straightforward reference renderer (same model, no blocking, no patches, float64)."""
    a = true_matrix(preset, errors)
    edge = edge_width_um(preset, a)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    centre = image_centre_px(shape)
    x = xy[0] + a[0, 0] * (cols - centre[0]) + a[0, 1] * (rows - centre[1])
    y = xy[1] + a[1, 0] * (cols - centre[0]) + a[1, 1] * (rows - centre[1])
    u, v = spec.mesh_coordinates(x, y)
    bar = np.clip(spec.bar_distance_um(u, v) / edge + 0.5, 0, 1)
    film = spec.film_mask_xy(x, y) * spec.film_thickness_nm_xy(x, y) * FILM_OD_PER_NM
    od = film * (1 - bar) + BAR_OD * bar
    c = spec.crystals
    half = np.hypot(shape[0], shape[1]) * np.sqrt(abs(np.linalg.det(a))) / 2
    for i in spec.crystals_near(xy[0], xy[1], half):
        d = crystal_distance_um(x - c["x_um"][i], y - c["y_um"][i], max(c["length_um"][i], edge),
                                max(c["width_um"][i], edge), c["angle_deg"][i], c["shape"][i])
        od += np.clip(d / edge + 0.5, 0, 1) * -np.log1p(-c["contrast"][i])
    electrons = np.exp(-od) * preset.dose_e_per_px_s * exposure_s
    counts = 100 + 2 * rng.poisson(electrons) + rng.normal(0, 3, shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def plain_diffraction(spec: Specimen, xy: tuple[float, float], preset: SimPreset, camera: CameraModel,
                      rng: np.random.Generator, exposure_s: float) -> np.ndarray:
    """`render_diffraction` with every array computed for the call (no geometry cache)."""
    rows, cols = camera.frame_shape(preset.optics.binning)
    cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    scale = diffraction.px_per_inverse_angstrom(preset)
    r_px = np.hypot(np.arange(rows, dtype=np.float32)[:, None] - cr, np.arange(cols, dtype=np.float32)[None, :] - cc)
    g = r_px / np.float32(scale)
    electrons = np.zeros((rows, cols), dtype=np.float32)
    contents = diffraction.beam_contents(spec, xy[0], xy[1], preset.beam_diameter_um)
    electrons += np.float32(2000.0 * (1.0 - float(contents["bar"]))) * np.exp(-r_px / np.float32(25.0))
    film = float(contents["film"]) * float(contents["film_thickness_nm"]) / 20.0
    ice = float(contents["ice"]) * 3.0
    for centre, width, weight in ((1 / 2.1, 0.06, film), (1 / 1.2, 0.1, 0.5 * film), (1 / 3.7, 0.05, ice),
                                  (1 / 2.25, 0.06, 0.6 * ice)):
        if weight > 0:
            electrons += np.float32(25.0 * weight) * np.exp(-(((g - np.float32(centre)) / np.float32(width)) ** 2))
    for cid, fraction in contents["crystals"].items():
        diffraction._add_bragg_spots(electrons, spec, cid, fraction, scale, (cr, cc))
    electrons[diffraction._beam_stop_mask((rows, cols))] = 0.0
    electrons *= np.float32(exposure_s)
    return electrons_to_counts(electrons, camera, rng)


def plain_score(image: np.ndarray, threshold_sigma: float = 6.0) -> DiffractionScore:
    """`score_diffraction` of a frame of at most 2047 px with scipy's filters and a full sort per radius bin."""
    data = np.array(image, dtype=np.float32)
    median = ndimage.median_filter(data, size=3)
    excess = data - median
    spread = 1.4826 * float(np.median(np.abs(excess - np.median(excess)))) or 1.0
    hot = (excess > 5.0 * spread) & (excess > 0.75 * np.maximum(data - ndimage.minimum_filter(data, size=5), 1e-6))
    data[hot] = median[hot]
    rows, cols = data.shape
    smoothed = ndimage.gaussian_filter(data, 1.0)
    centre_row, centre_col = np.unravel_index(int(np.argmax(ndimage.gaussian_filter(data, 4.0))), data.shape)
    yy, xx = np.mgrid[:rows, :cols]
    radius = np.hypot(yy - centre_row, xx - centre_col)
    bins = radius.astype(np.int64).ravel()
    counts = np.bincount(bins)
    valid, middle = counts > 0, np.concatenate([[0], np.cumsum(counts)[:-1]]) + (counts - 1) // 2

    def per_bin_median(x: np.ndarray) -> np.ndarray:
        medians = np.zeros(counts.size)
        order = np.argsort(bins + (x - x.min()) / ((x.max() - x.min()) or 1.0) * 0.5, kind="stable")
        medians[valid] = x[order][middle[valid]]
        return medians

    values = smoothed.ravel().astype(np.float64)
    medians = per_bin_median(values)
    sigma = np.maximum(1.4826 * per_bin_median(np.abs(values - medians[bins])), np.sqrt(np.maximum(medians, 0.0))
                       * 0.5 + 1e-6)
    background, noise = medians[bins].reshape(rows, cols), sigma[bins].reshape(rows, cols)
    residual = smoothed - background
    outside_beam = radius > 0.06 * min(rows, cols)
    separation = max(3, min(rows, cols) // 100)
    peaks = (residual == ndimage.maximum_filter(residual, size=2 * separation + 1)) & outside_beam
    spot_rows, spot_cols = np.nonzero(peaks & (residual > threshold_sigma * noise))
    if len(spot_rows) > 500:
        strongest = np.argsort(residual[spot_rows, spot_cols])[::-1][:500]
        spot_rows, spot_cols = spot_rows[strongest], spot_cols[strongest]
    heights = residual[spot_rows, spot_cols]
    mean_background = float(np.mean(background[outside_beam])) or 1.0
    return DiffractionScore(
        n_spots=len(spot_rows),
        signal_to_background=float(np.mean(heights)) / abs(mean_background) if len(heights) else 0.0,
        spots_col_row_px=tuple((float(c), float(r)) for r, c in zip(spot_rows, spot_cols, strict=True)),
        noise_sigma=float(np.median(noise[outside_beam])),
    )


def bench_diffraction(repeats: int) -> None:
    """Render + score of 1k diffraction patterns, fast against plain, alternating; checks they agree."""
    camera = CameraModel(shape_px=(1024, 1024))
    preset = {p.name: p for p in default_presets((1024, 1024))}["search"]
    cases = []
    for specimen_type in ("graphite-flakes", "asbestos-fibres", "protein-plates", "polymer-faint"):
        spec = generate_specimen(specimen_type, 0)
        cases += [(spec, (float(spec.crystals["x_um"][i]), float(spec.crystals["y_um"][i]))) for i in range(2)]
    times: dict[str, list[float]] = {"fast": [], "plain": []}
    same = True
    for _ in range(repeats):
        for seed, (spec, xy) in enumerate(cases):
            start = time.perf_counter()
            frame = diffraction.render_diffraction(spec, xy, preset, camera, np.random.default_rng(seed),
                                                   exposure_s=1.0)
            score = score_diffraction(frame)
            times["fast"].append(time.perf_counter() - start)
            start = time.perf_counter()
            plain_frame = plain_diffraction(spec, xy, preset, camera, np.random.default_rng(seed), 1.0)
            plain = plain_score(plain_frame)
            times["plain"].append(time.perf_counter() - start)
            same &= np.array_equal(frame, plain_frame) and score == plain
    fast, slow = statistics.median(times["fast"]), statistics.median(times["plain"])
    print(f"diffraction 1024x1024 (render + score, median of {len(times['fast'])}): fast {fast:.3f} s, "
          f"plain {slow:.3f} s, speed-up {slow / fast:.1f}x; same frames and scores: {same}")


def median_time_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time (s) of `fn` over `repeats` calls after one warm-up call."""
    return median_times_s(fn, repeats)[0]


def median_times_s(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `fn`; CPU time counts every thread and is less load-dependent."""
    fn()  # warm up
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="also run the naive renderer at 2k (slow)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--diffraction-only", action="store_true", help="only the diffraction case")
    args = parser.parse_args()
    bench_diffraction(args.repeats)
    if args.diffraction_only:
        return

    spec = generate_specimen("protein-plates", 1)
    presets = {p.name: p for p in default_presets((2048, 2048))}
    errors = OpticsErrors(rotation_deg=3.0, scale_error=0.02, illumination_centre=(0.1, -0.1),
                          illumination_falloff=0.2)
    square = spec.square_centres_um()[40]
    xy = (float(square[0]) + 20.0, float(square[1]) - 10.0)
    print(f"specimen protein-plates: {spec.crystal_count} crystals; stage at ({xy[0]:.0f}, {xy[1]:.0f}) um")
    print(f"{'frame':>12} {'preset':>9} {'fast (s)':>9} {'cpu (s)':>8} {'naive (s)':>10} {'speed-up':>9}")
    naive_times: dict[int, float] = {}
    for size in (1024, 2048, 4096):
        camera = CameraModel(shape_px=(size, size))
        for name in ("atlas",) + (("overview", "search") if size == 2048 else ()):
            preset = presets[name]
            rng = np.random.default_rng(0)
            where = (0.0, 0.0) if name == "overview" else xy
            fast, fast_cpu = median_times_s(
                lambda: render(spec, where, preset, camera, errors, rng, exposure_s=0.5),  # noqa: B023
                args.repeats,
            )
            naive_txt, ratio_txt = "-", "-"
            if name == "atlas":
                if size == 1024 or (size == 2048 and args.full):
                    naive = median_time_s(
                        lambda: naive_render(spec, xy, preset, (size, size), errors, rng, 0.5),  # noqa: B023
                        1,
                    )
                    naive_times[size] = naive
                    naive_txt = f"{naive:.2f}"
                else:
                    base = max(k for k in naive_times) if naive_times else None
                    if base is not None:
                        # pixels x objects in view both scale with the frame area
                        naive = naive_times[base] * (size / base) ** 4
                        naive_txt = f"~{naive:.0f} (extrap.)"
                if naive_txt != "-":
                    ratio_txt = f"{float(naive_txt.strip('~').split()[0]) / fast:.0f}x"
            print(f"{size:>5}x{size:<6} {name:>9} {fast:>9.3f} {fast_cpu:>8.3f} {naive_txt:>10} {ratio_txt:>9}")
    scope = SimulatedMicroscope(spec, seed=1)
    scope.move_stage(x_um=xy[0], y_um=xy[1])
    acquire = median_time_s(lambda: scope.acquire(0.5), args.repeats)
    print(f"SimulatedMicroscope.acquire (2k atlas, wall time incl. metadata): {acquire:.3f} s")
    t0 = scope.microscope_time_s()
    scope.move_stage(x_um=xy[0] + 125.0)
    print(f"a 125-um stage step costs {scope.microscope_time_s() - t0:.2f} s of microscope time")


if __name__ == "__main__":
    main()
