"""Benchmark: rendering simulated frames, against a naive renderer in the same process.

Run by hand: `.venv/bin/python benchmarks/bench_simulator.py [--full]`.

- fast: `simulator.imaging.render` (row blocks on a thread pool, float32, per-square lookup tables,
  objects drawn on small patches / splatted) for 1k, 2k and 4k frames at the atlas preset, plus
  overview and search at 2k, and a whole `SimulatedMicroscope.acquire` (clock, metadata included);
- naive: the textbook renderer: float64 stage coordinates for every pixel, the grid by `np.mod`, and
  every object in the field of view evaluated over the *whole* frame (per-pixel x per-object). It runs
  at 1k (and 2k with `--full`); its 4k time is extrapolated from 2k/1k (pixels x objects scale).

Prints median wall and CPU times and the speed-up ratio. Wall time varies with machine load (other
processes); CPU time (all threads) much less.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from drivers.geometry import image_centre_px
from simulator.imaging import BAR_OD, CameraModel, OpticsErrors, SimPreset, edge_width_um, render, true_matrix
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
    args = parser.parse_args()

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
