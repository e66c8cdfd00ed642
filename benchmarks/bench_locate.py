"""Speed of the locator against naive per-patch baselines run in the same process.

Run by hand: `.venv/bin/python benchmarks/bench_locate.py [--size 4096] [--repeats 3] [--only heatmap]`.

Measures (median of --repeats):
- `crystal-locator locate IMAGE` end to end with the default settings, in a subprocess (process start and
  imports included, until every output file is written), on a SIZE^2 uint16 TIFF of the simulator's
  atlas (grid bars, crystals, ice, uneven film; `--end-to-end-image FILE` to use another), as a multiple
  of `ndimage.uniform_filter(image as float64, 31)` timed in this process alternately with it (the
  target, issue 21: at most 10 passes), with the CPU time of the runs and the load average (on a shared
  machine the wall time swings with other jobs; the CPU time much less);
- grid features, SIZE^2 uint16, 20x20 and 40x40 grids, vs a per-patch Python loop (numpy + scipy.stats
  per patch, as the 2018 code did);
- sliding-window features, window 31, stride 1 (every pixel), plus clustering all windows (fit on a
  sample, label all), vs the per-window loop timed on a sample of windows and extrapolated;
- heat map PNG (cluster map blended over the image + legend + candidate marks, encoded; wall and CPU
  time), vs drawing every patch with Pillow and alpha compositing;
- outlines (faint crystals by straight edges, `agent.locate.outlines`) on a 2048^2 frame with 41-px
  lines, vs spatial convolution with each direction's line-and-derivative kernel (timed on a 512^2
  crop and scaled by area);
- peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.locate.analysis import LocateSettings, analyse
from agent.locate.cluster import fit_clusters
from agent.locate.features import FEATURE_NAMES, grid_edges_px, grid_features, window_features
from agent.locate.outlines import EDGE_SIGMA_PX, N_ORIENTATIONS, find_outlines, straight_edge_response
from agent.locate.render import heatmap_png, heatmap_rgb
from agent.locate.targets import find_candidates
from drivers.formats.images import encode_png


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median wall time (s) of `function` over `repeats` runs."""
    return timed_wall_cpu(function, repeats)[0]


def timed_wall_cpu(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (s, all threads) of `function` over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return statistics.median(walls), statistics.median(cpus)


def naive_patch_stats(patch: np.ndarray) -> list[float]:
    """The 2018 way: one patch at a time with numpy and scipy.stats."""
    from scipy import stats

    x = patch.astype(np.float64).ravel()
    mean, std = x.mean(), x.std()
    values, counts = np.unique(x, return_counts=True)
    gx = np.diff(patch.astype(np.float64), axis=1) ** 2
    return [
        mean,
        std,
        std / mean if mean else 0.0,
        float(stats.skew(x)),
        float(stats.kurtosis(x)),
        float(values[np.argmax(counts)]),
        float(x.max() - x.min()),
        float(gx.mean()),
    ]


def naive_grid(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    er, ec = grid_edges_px(image.shape[0], rows), grid_edges_px(image.shape[1], cols)
    return np.array(
        [naive_patch_stats(image[er[i] : er[i + 1], ec[j] : ec[j + 1]]) for i in range(rows) for j in range(cols)]
    )


def naive_heatmap(image: np.ndarray, labels: np.ndarray) -> bytes:
    """Per-patch drawing: one translucent rectangle per cell, composited with Pillow."""
    import io

    from PIL import Image, ImageDraw

    low, high = np.percentile(image[::8, ::8], [0.5, 99.5])
    gray = np.clip((image - low) / max(high - low, 1) * 255, 0, 255).astype(np.uint8)
    base = Image.fromarray(gray).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    rows, cols = labels.shape
    er, ec = grid_edges_px(image.shape[0], rows), grid_edges_px(image.shape[1], cols)
    colours = [(31, 119, 180, 115), (255, 127, 14, 115), (214, 39, 40, 180), (40, 40, 40, 160)]
    for i in range(rows):
        for j in range(cols):
            draw.rectangle((ec[j], er[i], ec[j + 1] - 1, er[i + 1] - 1), fill=colours[labels[i, j] % 4])
    out = io.BytesIO()
    Image.alpha_composite(base, overlay).convert("RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def make_image(size: int, seed: int = 0) -> np.ndarray:
    """A uint16 test image: film with noise, a few dark plates, two grid bars."""
    rng = np.random.default_rng(seed)
    image = rng.normal(30000, 600, (size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(60):
        r, c = rng.integers(0, size, 2)
        image[(yy - r) ** 2 + (xx - c) ** 2 < (size / 200) ** 2] *= 0.6
    image[:, size // 3 : size // 3 + size // 40] = 300
    image[size // 2 : size // 2 + size // 40, :] = 300
    return np.clip(image, 0, 65535).astype(np.uint16)


PARTS = ("end-to-end", "grid", "window", "heatmap", "analyse", "outlines")
ROOT = Path(__file__).resolve().parents[1]


def simulated_atlas_tiff(size: int, folder: Path) -> Path:
    """A SIZE^2 atlas frame of the simulated protein-plates grid (seed 0, stage at the origin), written by
    `crystal-locator simulate snapshot` into `folder`."""
    path = folder / f"atlas-{size}.tif"
    command = [sys.executable, "-m", "agent.cli", "simulate", "snapshot", "--camera-px", str(size)]
    command += ["--preset", "atlas", "--out", str(path)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    return path


def run_locate(image_path: Path, out_dir: Path) -> float:
    """Wall time (s) of `python -m agent.cli locate IMAGE --out DIR` in a fresh process."""
    return run_locate_wall_cpu(image_path, out_dir)[0]


def run_locate_wall_cpu(image_path: Path, out_dir: Path) -> tuple[float, float]:
    """Wall time and CPU time (s; user + system of the child, all its threads) of `python -m agent.cli locate
    IMAGE --out DIR` in a fresh process."""
    start, before = time.perf_counter(), os.times()
    subprocess.run(
        [sys.executable, "-m", "agent.cli", "locate", str(image_path), "--out", str(out_dir)],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return time.perf_counter() - start, cpu


def bench_end_to_end(size: int, repeats: int, image_path: Path | None) -> None:
    """The locate command end to end vs uniform_filter(31) passes, each locate run between two passes."""
    from scipy import ndimage

    from drivers.formats.images import read_image

    with tempfile.TemporaryDirectory() as folder:
        path = image_path or simulated_atlas_tiff(size, Path(folder))
        data = read_image(path).array.astype(np.float64)
        ndimage.uniform_filter(data, 31)  # warm-up
        run_locate(path, Path(folder) / "warm-up")  # warm-up: page cache, bytecode
        passes, runs, cpus = [], [], []
        for i in range(repeats):
            passes.append(timed(lambda: ndimage.uniform_filter(data, 31), 1))
            wall, cpu = run_locate_wall_cpu(path, Path(folder) / f"out-{i}")
            runs.append(wall)
            cpus.append(cpu)
        passes.append(timed(lambda: ndimage.uniform_filter(data, 31), 1))
    one_pass, locate = statistics.median(passes), statistics.median(runs)
    print(
        f"locate end to end = {locate / one_pass:.1f} uniform_filter(31) passes; target <= 10 "
        f"({data.shape[0]}x{data.shape[1]}, default settings: {locate:.2f} s, one pass {one_pass * 1e3:.0f} ms; "
        f"runs {', '.join(f'{r:.2f}' for r in runs)} s; CPU of the runs, median {statistics.median(cpus):.2f} s; "
        f"load average {os.getloadavg()[0]:.1f})"
    )


def bench_grid(image: np.ndarray, repeats: int) -> None:
    for grid in (20, 40):
        fast = timed(lambda grid=grid: grid_features(image, grid, grid), repeats)
        naive = timed(lambda grid=grid: naive_grid(image, grid, grid), 1)
        print(
            f"grid features {grid}x{grid}: {fast * 1e3:.1f} ms "
            f"(naive per-patch loop {naive * 1e3:.0f} ms, {naive / fast:.0f}x)"
        )


def bench_window(image: np.ndarray, repeats: int) -> None:
    size = image.shape[0]
    out = np.empty((size, size, len(FEATURE_NAMES)), dtype=np.float64)
    out.fill(0.0)  # first touch outside the timing
    window = timed(lambda: window_features(image, 31, 1, out=out), repeats)
    features = out.reshape(-1, out.shape[-1])

    def cluster_all() -> None:
        model = fit_clusters(features, 3, seed=0)
        model.predict(features)

    clustering = timed(cluster_all, repeats)

    def cluster_all_uncapped() -> None:
        model = fit_clusters(features, 3, seed=0, outlier_cap_sigma=None)
        model.predict(features)

    uncapped = timed(cluster_all_uncapped, 1)
    rng = np.random.default_rng(1)
    sample = 2000
    centres = rng.integers(15, size - 15, (sample, 2))
    start = time.perf_counter()
    for r, c in centres:
        naive_patch_stats(image[r - 15 : r + 16, c - 15 : c + 16])
    per_window = (time.perf_counter() - start) / sample
    naive_total = per_window * size * size
    total = window + clustering
    print(
        f"window features 31 px, stride 1 ({size * size / 1e6:.1f} M windows): {window:.2f} s + clustering all "
        f"{clustering:.2f} s = {total:.2f} s (naive per-window loop ~{naive_total / 60:.0f} min extrapolated "
        f"from {sample} windows, {naive_total / total:.0f}x)"
    )
    print(f"  clustering without the outlier cap: {uncapped:.2f} s (the cap costs {clustering / uncapped:.2f}x)")
    whole = timed(lambda: window_features(image, 31, 1), 1)
    print(f"  window features with a fresh output array (page faults included): {whole:.2f} s")


def bench_heatmap(image: np.ndarray, repeats: int) -> None:
    """`heatmap_png` as the `locate` command calls it (crystal clusters, candidate marks, legend)."""
    size = image.shape[0]
    analysis = analyse(image, LocateSettings(mode="grid", grid_rows=40, grid_cols=40))
    crystal = analysis.suggested_crystal_clusters
    candidates = find_candidates(analysis, crystal)
    png = heatmap_png(image, analysis, candidates, crystal)  # warm-up (imports, font)
    heat, heat_cpu = timed_wall_cpu(lambda: heatmap_png(image, analysis, candidates, crystal), repeats)
    heat_rgb = timed(lambda: encode_png(heatmap_rgb(image, analysis, candidates, crystal)), 1)
    naive_heat = timed(lambda: naive_heatmap(image, np.where(analysis.label_grid < 0, 3, analysis.label_grid)), 1)
    print(
        f"heat map PNG {size}x{size} (40x40 cells, {len(candidates)} candidates, {len(png) / 2**20:.1f} MiB): "
        f"{heat * 1e3:.0f} ms wall, {heat_cpu * 1e3:.0f} ms CPU "
        f"(per-patch drawing {naive_heat * 1e3:.0f} ms, {naive_heat / heat:.1f}x; "
        f"RGB array + encode_png {heat_rgb * 1e3:.0f} ms)"
    )


def bench_analyse(image: np.ndarray) -> None:
    full = timed(lambda: analyse(image, LocateSettings(mode="grid", grid_rows=20, grid_cols=20)), 1)
    print(f"analyse() end to end, 20x20 grid incl. bar filter and clean-up: {full:.2f} s")
    settings = LocateSettings(mode="window", window_px=15, stride_px=4)  # the screening plan's atlas setting
    analysis = analyse(image, settings)
    crystal = analysis.suggested_crystal_clusters
    regions = timed(lambda: find_candidates(analysis, crystal, settings), 1)
    objects = timed(lambda: find_candidates(analysis, crystal, settings, image=image), 1)
    count = len(find_candidates(analysis, crystal, settings, image=image))
    print(
        f"candidates, window 15 / stride 4: one per object (pixel-level objects, watershed split, round-ice "
        f"filter) {objects:.2f} s for {count} candidates; one per region {regions * 1e3:.0f} ms "
        f"({objects / max(regions, 1e-9):.0f}x)"
    )


def naive_straight_edge(image: np.ndarray, length_px: int) -> np.ndarray:
    """The straight-edge response by spatial convolution: per direction, a kernel that averages the
    Gaussian derivative across the direction along a line of `length_px` (sampled every pixel)."""
    from scipy import ndimage

    half = length_px // 2 + int(4 * EDGE_SIGMA_PX) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    data = image.astype(np.float64)
    best = np.zeros(data.shape)
    for i in range(N_ORIENTATIONS):
        theta = np.pi * i / N_ORIENTATIONS
        across = xx * np.cos(theta) + yy * np.sin(theta)
        along = -xx * np.sin(theta) + yy * np.cos(theta)
        kernel = -across / EDGE_SIGMA_PX**2 * np.exp(-0.5 * (across / EDGE_SIGMA_PX) ** 2)
        kernel *= np.abs(along) <= length_px / 2
        kernel /= np.sqrt(2 * np.pi) * EDGE_SIGMA_PX * length_px
        np.maximum(best, np.abs(ndimage.convolve(data, kernel, mode="reflect")), out=best)
    return best


def bench_outlines(image: np.ndarray, repeats: int) -> None:
    frame = np.ascontiguousarray(image[:2048, :2048])
    mask = np.zeros(frame.shape, dtype=bool)
    response = timed(lambda: straight_edge_response(frame, 41), repeats)
    whole = timed(lambda: find_outlines(frame, mask, 41), repeats)
    crop = frame[:512, :512]
    naive = timed(lambda: naive_straight_edge(crop, 41), 1) * frame.size / crop.size
    print(
        f"outlines, {frame.shape[0]}x{frame.shape[1]}, 41-px lines x {N_ORIENTATIONS} directions: response "
        f"{response:.2f} s (spatial convolution ~{naive:.1f} s, extrapolated: {naive / response:.0f}x), "
        f"find_outlines end to end {whole:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="run only these parts")
    parser.add_argument("--end-to-end-image", type=Path, default=None,
                        help="image for the end-to-end part (default: a simulated SIZE^2 atlas frame)")
    args = parser.parse_args()
    size, repeats = args.size, args.repeats
    if "end-to-end" in args.only:
        bench_end_to_end(size, repeats, args.end_to_end_image)
    if set(args.only) == {"end-to-end"}:
        return
    image = make_image(size)
    print(f"image {size}x{size} uint16; {len(FEATURE_NAMES)} features; median of {repeats}")
    if "grid" in args.only:
        bench_grid(image, repeats)
    if "window" in args.only:
        bench_window(image, repeats)
    if "heatmap" in args.only:
        bench_heatmap(image, repeats)
    if "analyse" in args.only:
        bench_analyse(image)
    if "outlines" in args.only:
        bench_outlines(image, repeats)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
