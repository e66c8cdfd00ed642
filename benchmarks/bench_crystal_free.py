"""False candidates on crystal-free images, and crystals found on the same images with crystals, for the default
locator and the threshold detector (`agent.evaluation.baselines.threshold_components`) run in the same process.

Run by hand: `.venv/bin/python benchmarks/bench_crystal_free.py [--size 2048] [--seeds 2]`.

Images are the real-world-like synthetic grids of `tests.synthetic_images` (bars, uneven illumination, readout
artefacts, a data bar), one hard condition each: plain film, ice balls and debris, dark field, an 8-bit export,
a 2x2 montage with mis-stitched tiles, a mottled film, a torn-film hole. The issue-21 target is at most 2
candidates per crystal-free 4096^2 image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.evaluation.baselines import threshold_components
from agent.locate.analysis import LocateSettings, analyse
from agent.locate.targets import find_candidates
from tests.synthetic_images import make_grid_image

CONDITIONS: dict[str, dict[str, object]] = {
    "plain": {"n_ice": 0, "n_debris": 0},
    "ice+debris": {"n_ice": 8, "n_debris": 6},
    "dark field": {"polarity": "dark"},
    "8-bit": {"bit_depth": 8},
    "montage seams": {"tile_seams": True},
    "mottled film": {"film_grain": 0.03},
    "film hole": {"torn_film_hole": True},
}


def _points(image, method: str) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """(row, col) px of every detection of `method` ("locator" or "threshold") on `image`."""
    if method == "threshold":
        return [(d.row_px, d.col_px) for d in threshold_components(image).detections]
    settings = LocateSettings()
    analysis = analyse(image, settings)
    return [(c.row_px, c.col_px) for c in find_candidates(analysis, analysis.suggested_crystal_clusters, settings,
                                                          image=image)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    size = args.size
    grid = {"bar_pitch_px": 300 * size / 768, "bar_width_px": 70 * size / 768}
    print(f"{'condition':14s} {'method':9s} {'false/image':>11s} {'crystals found':>15s}")
    totals = {"locator": 0, "threshold": 0}
    for name, conditions in CONDITIONS.items():
        for method in ("locator", "threshold"):
            false, found, planted = 0, 0, 0
            for seed in range(args.seeds):
                empty = make_grid_image((size, size), seed, n_crystals=0, **grid, **conditions)  # type: ignore[arg-type]
                false += len(_points(empty.image, method))
                scene = make_grid_image((size, size), seed, **grid, **conditions)  # type: ignore[arg-type]
                on_crystal = scene.crystal_mask(3)
                hits = [p for p in _points(scene.image, method) if on_crystal[int(p[0]), int(p[1])]]
                found += sum(
                    any((c.row_px - r) ** 2 + (c.col_px - k) ** 2 <= (c.radius_px + 3) ** 2 for r, k in hits)
                    for c in scene.crystals
                )
                planted += len(scene.crystals)
            totals[method] += false
            print(f"{name:14s} {method:9s} {false / args.seeds:11.1f} {found:7d} / {planted:<6d}", flush=True)
    n_images = args.seeds * len(CONDITIONS)
    ratio = totals["threshold"] / max(totals["locator"], 1)
    print(f"false candidates per crystal-free image: locator {totals['locator'] / n_images:.1f}, threshold "
          f"{totals['threshold'] / n_images:.1f} (threshold / locator {ratio:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
