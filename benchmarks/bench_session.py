"""Benchmark: whole simulated screening sessions, against a naive raster search in the same process.

Run by hand: `.venv/bin/python benchmarks/bench_session.py [--seeds 2] [--specimens TYPE ...] [--camera-px 1024]`.

For every specimen type and seed:

- **agent**: a full `crystal-locator screen --simulated` session (in-process, through the `screen`
  command's own handler; no operator, no label memory, the default plan) into a temporary folder;
  figures from its `summary.json` (microscope time on the simulator's virtual clock, precision and
  recall of diffracting crystals against ground truth, computed by `simulator.scoring`) and the wall
  time of the run;
- **naive raster** (the baseline): on a fresh simulated microscope with the same seed, tile the area
  the agent mapped at the `search` preset (no atlas), run the threshold + connected-components detector
  (`agent.evaluation.baselines`) on every tile and take a diffraction snapshot of every detection, as a
  person or a simple script would. A detection counts as a confirmed crystal only if ground truth says
  it is on one (an oracle: the baseline gets perfect confirmation for free), so its figures are an
  upper bound for a naive search. At most `--max-tiles` tiles (a seeded random subset) are visited;
  rates per hour do not depend on the area covered.

Prints one row per run, the means per specimen type and the ratio agent / naive of true crystals
confirmed per hour of microscope time (the agent's confirmed targets x their precision against ground
truth, since the agent's own confirmation can be wrong). The 2018 study's figures for reference: ~30 min
per crystal by hand, ~2 min per crystal automated.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.evaluation.baselines import threshold_components  # noqa: E402
from drivers.geometry import pixel_to_stage_um  # noqa: E402
from simulator import SPECIMEN_TYPES, create_simulated_microscope  # noqa: E402


def run_agent_session(specimen: str, seed: int, camera_px: int, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One `screen --simulated` session through the command's handler; its summary plus wall time."""
    from agent.commands import screen

    parser = argparse.ArgumentParser(prog="bench")
    screen.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["screen", "--simulated", "--specimen", specimen, "--seed", str(seed), "--camera-px",
                              str(camera_px), "--out", str(out_dir), "--no-labels", "--operator", "none", "--json",
                              *extra])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    start = time.perf_counter()
    try:
        code = screen.run_screen(args)
    finally:  # the command installs abort handlers for its session; give Ctrl-C back to the benchmark
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    wall_s = time.perf_counter() - start
    summary = json.loads((out_dir / "summary.json").read_text())
    box = None
    for line in (out_dir / "journal.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("type") == "mapping" and entry.get("box_um"):
            box = tuple(entry["box_um"])
    return {"exit_code": code, "wall_s": wall_s, "box_um": box, **summary}


def run_naive_raster(
    specimen: str, seed: int, camera_px: int, box_um: tuple[float, float, float, float], max_tiles: int,
    exposure_s: float = 0.5, diffraction_s: float = 1.0,
) -> dict[str, Any]:
    """Raster search of `box_um` at `search`: detect on every tile, diffraction snapshot of every detection."""
    microscope = create_simulated_microscope(specimen_type=specimen, seed=seed,
                                             camera_shape_px=(camera_px, camera_px))
    truth = microscope.ground_truth
    microscope.set_preset("search")
    matrix = microscope.true_image_to_stage_matrix("search")
    field_um = camera_px * float(np.sqrt(abs(np.linalg.det(matrix))))
    x0, x1, y0, y1 = box_um
    xs = np.arange(x0 + field_um / 2, x1, field_um)
    ys = np.arange(y0 + field_um / 2, y1, field_um)
    tiles = [(float(x), float(y)) for y in ys for x in xs]
    rng = np.random.default_rng([seed, 42])
    if len(tiles) > max_tiles:
        tiles = [tiles[i] for i in sorted(rng.choice(len(tiles), size=max_tiles, replace=False))]
    start_clock = microscope.microscope_time_s()
    start = time.perf_counter()
    found: set[int] = set()
    found_diffracting: set[int] = set()
    detections = 0
    true_positive = 0
    for x, y in tiles:
        microscope.move_stage(x_um=x, y_um=y)
        frame = microscope.acquire(exposure_s)
        stage = microscope.true_stage_xy_um()
        for det in threshold_components(frame.image).detections:
            detections += 1
            xy = pixel_to_stage_um(np.array([det.col_px, det.row_px]), frame.shape_px, stage, matrix)
            microscope.move_stage(x_um=float(xy[0]), y_um=float(xy[1]))
            microscope.acquire_diffraction(diffraction_s)
            crystal = int(truth.crystal_id_xy(np.array([xy[0]]), np.array([xy[1]]), tolerance_um=1.0)[0])
            if crystal >= 0:
                true_positive += 1
                found.add(crystal)
                if truth.crystal_truth()[crystal].diffracts:
                    found_diffracting.add(crystal)
    clock_s = microscope.microscope_time_s() - start_clock
    confirmed = len(found)
    return {
        "tiles": len(tiles), "detections": detections, "confirmed": confirmed,
        "confirmed_diffracting": len(found_diffracting),
        "microscope_time_s": clock_s, "wall_s": time.perf_counter() - start,
        "confirmed_per_hour": 3600.0 * confirmed / clock_s if clock_s > 0 else None,
        "time_per_confirmed_s": clock_s / confirmed if confirmed else None,
        "precision": true_positive / detections if detections else None,
    }


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return statistics.fmean(numbers) if numbers else None


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--specimens", nargs="+", default=list(SPECIMEN_TYPES))
    parser.add_argument("--camera-px", type=int, default=1024)
    parser.add_argument("--max-tiles", type=int, default=16, help="naive raster: tiles visited at most")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive raster search")
    parser.add_argument("--out", type=Path, help="keep the session folders here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write every row as JSON")
    parser.add_argument("screen_args", nargs=argparse.REMAINDER, help="after --: extra `screen` options")
    args = parser.parse_args()
    extra = [a for a in args.screen_args if a != "--"]

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-session-") as tmp:
        base = args.out or Path(tmp)
        print(f"{'specimen':>16} {'seed':>4} | {'agent: conf/h':>13} {'true/h':>6} {'s/conf':>7} {'prec':>5} "
              f"{'rec_diff':>8} {'wall s':>7} | {'naive: conf/h':>13} {'s/conf':>7} {'prec':>5} | {'ratio':>6}")
        for specimen in args.specimens:
            for seed in range(args.seeds):
                agent = run_agent_session(specimen, seed, args.camera_px, base / f"{specimen}-{seed}", extra)
                naive = None
                if not args.no_baseline and agent.get("box_um"):
                    naive = run_naive_raster(specimen, seed, args.camera_px, agent["box_um"], args.max_tiles)
                # crystals per hour that really are crystals: the agent's confirmed targets x their precision
                # against ground truth (the naive search's are oracle-checked already)
                if agent.get("confirmed_per_hour") is not None and agent.get("precision") is not None:
                    agent["true_per_hour"] = agent["confirmed_per_hour"] * agent["precision"]
                ratio = None
                if naive and agent.get("true_per_hour") is not None and naive.get("confirmed_per_hour"):
                    ratio = agent["true_per_hour"] / naive["confirmed_per_hour"]
                rows.append({"specimen": specimen, "seed": seed, "agent": agent, "naive": naive, "ratio": ratio})
                n = naive or {}
                print(f"{specimen:>16} {seed:>4} | {_f(agent.get('confirmed_per_hour')):>13} "
                      f"{_f(agent.get('true_per_hour')):>6} "
                      f"{_f(agent.get('time_per_confirmed_s')):>7} {_f(agent.get('precision'), 2):>5} "
                      f"{_f(agent.get('recall_diffracting'), 2):>8} {_f(agent['wall_s']):>7} | "
                      f"{_f(n.get('confirmed_per_hour')):>13} {_f(n.get('time_per_confirmed_s')):>7} "
                      f"{_f(n.get('precision'), 2):>5} | {_f(ratio, 2):>6}", flush=True)
    print("\nmeans per specimen type")
    for specimen in args.specimens:
        mine = [r for r in rows if r["specimen"] == specimen]
        agent_rows = [r["agent"] for r in mine]
        naive_rows = [r["naive"] for r in mine if r["naive"]]
        print(f"{specimen:>16}: agent {_f(_mean([a.get('confirmed_per_hour') for a in agent_rows]))} confirmed/h "
              f"({_f(_mean([a.get('true_per_hour') for a in agent_rows]))} on true crystals), "
              f"{_f(_mean([a.get('time_per_confirmed_s') for a in agent_rows]))} s/confirmed, precision "
              f"{_f(_mean([a.get('precision') for a in agent_rows]), 2)}, recall of diffracting "
              f"{_f(_mean([a.get('recall_diffracting') for a in agent_rows]), 2)}, wall "
              f"{_f(_mean([a.get('wall_s') for a in agent_rows]))} s | naive "
              f"{_f(_mean([n.get('confirmed_per_hour') for n in naive_rows]))} confirmed/h | ratio "
              f"{_f(_mean([r['ratio'] for r in mine]), 2)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
