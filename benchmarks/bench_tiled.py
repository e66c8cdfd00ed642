"""Peak memory and time of tiled features over large memory-mapped SerialEM montages.

Run by hand (not part of the test suite):

    .venv/bin/python benchmarks/bench_tiled.py [--sizes 8192 16384] [--keep DIR]

For each size it writes a synthetic montage (uint16 `.mrc` stack + `.mdoc`, 2240 px pieces with
256 px overlap) to a temporary folder, then measures with `tracemalloc` (numpy allocations; the
memory-mapped stack's pages are file cache and not counted):

- tiled sliding-window features (window 31, stride 16 for 16k / 8 for 8k), with and without
  keeping the output (`iter_window_tiles` consumed on the fly);
- tiled grid features (64 x 64 cells);
- the naive baseline in the same process: `montage.to_array()` then the whole-image function.

and prints peak MiB, seconds and the ratios naive / tiled.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.locate.features import grid_features, window_features
from agent.locate.tiled import iter_window_tiles, tiled_grid_features, tiled_window_features
from drivers.formats.mdoc import montage_metadata, write_mdoc
from drivers.formats.montage import open_montage

PIECE_PX = 2240
OVERLAP_PX = 256


def make_montage(folder: Path, target_px: int, seed: int = 0) -> Path:
    """Write a montage of about `target_px` a side; returns the `.mdoc` path."""
    step = PIECE_PX - OVERLAP_PX
    n = max(1, round((target_px - PIECE_PX) / step) + 1)
    rng = np.random.default_rng(seed)
    texture = rng.poisson(2000, (PIECE_PX, PIECE_PX)).astype(np.uint16)
    corners = [(r * step, c * step) for r in range(n) for c in range(n)]
    stack = folder / f"bench{target_px}.mrc"
    with mrcfile.new_mmap(stack, shape=(n * n, PIECE_PX, PIECE_PX), mrc_mode=6, overwrite=True) as mrc:
        for z in range(n * n):
            piece = np.roll(texture, shift=(z * 37, z * 91), axis=(0, 1))
            piece[z % 7 :: 97] = 30  # a few dark lines, like grid bars
            mrc.data[z] = piece
    path = folder / f"bench{target_px}.mrc.mdoc"
    write_mdoc(path, montage_metadata(corners, (PIECE_PX, PIECE_PX), 0.2, image_file=stack.name))
    return path


def measure(function: Callable[[], Any]) -> tuple[float, float, Any]:
    """(peak MiB traced, seconds, result) of one call."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        result = function()
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20, seconds, result


def consume_tiles(montage: Any, window_px: int, stride_px: int) -> float:
    """Stream the tiles without keeping them (e.g. to cluster on the fly); returns the mean of `mean`."""
    total, count = 0.0, 0
    for tile in iter_window_tiles(montage, window_px, stride_px):
        total += float(tile.features[..., 0].sum())
        count += tile.features.shape[0] * tile.features.shape[1]
    return total / count


def run(size_px: int, folder: Path, naive: bool) -> None:
    mdoc = make_montage(folder, size_px)
    window_px, stride_px = 31, (16 if size_px > 12000 else 8)
    with open_montage(mdoc) as montage:
        rows, cols = montage.shape_px
        print(f"\n== montage {cols} x {rows} px uint16 ({rows * cols * 2 / 2**20:.0f} MiB), "
              f"{len(montage.pieces)} pieces; window {window_px}, stride {stride_px}")
        peak, secs, (feats, _) = measure(lambda: tiled_window_features(montage, window_px, stride_px))
        out_mib = feats.nbytes / 2**20
        print(f"tiled window features : peak {peak:8.1f} MiB (output {out_mib:.1f} MiB)  {secs:7.2f} s")
        peak_s, secs_s, _ = measure(lambda: consume_tiles(montage, window_px, stride_px))
        print(f"streamed window tiles : peak {peak_s:8.1f} MiB                  {secs_s:7.2f} s")
        peak_g, secs_g, _ = measure(lambda: tiled_grid_features(montage, 64, 64))
        print(f"tiled grid 64x64      : peak {peak_g:8.1f} MiB                  {secs_g:7.2f} s")
        if naive:
            def whole_window() -> Any:
                image = montage.to_array()
                return window_features(image, window_px, stride_px)

            def whole_grid() -> Any:
                return grid_features(montage.to_array(), 64, 64)

            peak_n, secs_n, (whole, _) = measure(whole_window)
            print(f"naive window (whole)  : peak {peak_n:8.1f} MiB                  {secs_n:7.2f} s")
            peak_ng, secs_ng, _ = measure(whole_grid)
            print(f"naive grid (whole)    : peak {peak_ng:8.1f} MiB                  {secs_ng:7.2f} s")
            same = np.allclose(whole[..., :3], feats[..., :3], rtol=1e-9, atol=1e-6)
            print(f"ratios naive/tiled: window memory {peak_n / peak:.1f}x (streamed {peak_n / peak_s:.1f}x), "
                  f"time {secs_n / secs:.2f}x; grid memory {peak_ng / peak_g:.1f}x, time {secs_ng / secs_g:.2f}x; "
                  f"low-order features equal: {same}")
            del whole
        del feats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384], help="mosaic sides, pixels")
    parser.add_argument("--no-naive", action="store_true", help="skip the whole-image baseline")
    parser.add_argument("--keep", type=Path, default=None, help="write the montages here and keep them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            run(size, args.keep, not args.no_naive)
        return 0
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench_tiled_") as tmp:
            run(size, Path(tmp), not args.no_naive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
