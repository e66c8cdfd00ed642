"""Benchmark: diffracting crystals per microscope hour, agent sessions against two raster searches.

Run by hand: `.venv/bin/python benchmarks/bench_session.py [--seeds 5 | --seeds 3 7 11] [--specimens TYPE ...]
[--time-budget-s 3600] [--camera-px 1024] [--clock PROFILE] [--quick] [--json FILE] [-- extra screen options]`.

For every specimen type and seed, on the same simulated grid (specimen type + seed) and the same clock:

- **agent**: a `crystal-locator screen --simulated` session (in-process, through the command's handler; no
  operator, no label memory, the default plan, `--time-budget-s`) with a stored calibration: measured once per
  benchmark run (see `Calibrations`) and passed to every session, which only checks it (a test move per preset);
- **naive**: on a fresh simulated microscope with the same seed, a raster of the area the agent mapped at the
  search preset, the threshold detector on every field and a diffraction snapshot of every detection; a
  snapshot that passes the plan's `min_spots` is a diffracting call (`agent.evaluation.raster.naive_raster`,
  no ground truth; it uses the stored calibration's search matrix and pays no overview, atlas or calibration);
- **oracle**: the same raster given ground truth (issue 20's upper baseline): the naive raster's fields, each
  imaged, and a snapshot of exactly the true crystals in each field (`agent.evaluation.raster.oracle_raster`);
- **tour** (reported, not a target): no search, a stage tour of exactly the true crystals of the mapped area, one
  snapshot each and no image (`agent.evaluation.raster.ground_truth_tour`): the ceiling of one snapshot per
  crystal by stage moves, which needs the answer before the search.

The rasters and the tour stop when the same microscope-time budget is spent (or the area is done). Every search is
scored the same way (`agent.evaluation.throughput`): diffracting crystals = distinct true crystals with a
call that passed `min_spots` (the agent's `recorded` targets), per hour of the search's own microscope time;
precision of the diffracting calls; recall of the diffracting crystals in the mapped area. For the agent also
the time per target against the clock's floor per target (`floor_per_target_s`), and the share of the
session's microscope time paid once (calibration check, overview, atlas, locating: `fixed_time_s`).

Prints a row per run, the means per specimen type, the ratios agent / naive and agent / oracle of the mean
rates, and the targets of issue 20. `--json FILE` writes one row per specimen type and seed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.evaluation.raster import (  # noqa: E402
    RasterRun,
    RasterSettings,
    field_side_um,
    ground_truth_tour,
    naive_raster,
    oracle_raster,
)
from agent.evaluation.throughput import (  # noqa: E402
    DiffractingScore,
    fixed_share,
    mean_step_um,
    per_hour,
    per_item,
    ratio,
    score_diffracting_calls,
    split_session_time,
    state_seconds,
    visit_seconds,
)
from agent.steps.stage_calibration import CalibrationSet  # noqa: E402
from simulator import SPECIMEN_TYPES, create_simulated_microscope, timing  # noqa: E402

log = logging.getLogger("bench_session")

TOLERANCE_UM = 1.0  # a call within 1 um of a crystal's outline is on it (as simulator.scoring)
TARGETS = {"naive": 3.0, "oracle": 1.5, "over_floor": 1.3, "fixed_share": 0.10}  # issue 20


# -- small helpers -------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _r(numerator: Any, denominator: Any) -> str:
    """A ratio for the table: `inf` when only the baseline found nothing."""
    if numerator and denominator == 0:
        return "inf"
    return _f(ratio(numerator, denominator), 2)


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return statistics.fmean(numbers) if numbers else None


# -- the clock's floor per target ------------------------------------------------------------------------------
def floor_per_target_s(
    clock: str | None, search_s: float, diffraction_s: float, move_um: float, camera_px: int
) -> float:
    """The least microscope time (s) one target with a diffraction snapshot can take on the clock profile
    `clock` (default: the simulator's), with `move_um` between targets and `camera_px`-square frames at the
    search preset (binning 1) for both the search image and the snapshot (`simulator.timing`)."""
    frame_mpx = camera_px * camera_px / 1e6
    profile = clock or timing.DEFAULT_PROFILE
    return float(timing.floor_per_target_s(
        profile, search_s, diffraction_s, move_um, search_frame_mpx=frame_mpx, diffraction_frame_mpx=frame_mpx
    ))


# -- calibration, measured once ------------------------------------------------------------------------------
class Calibrations:
    """The calibration every session of the run starts from, measured once (the simulated instrument is the
    same for every grid: its optics errors belong to the instrument, not to the specimen seed).

    With `crystal-locator calibrate` in the tree: calibrated once into a temporary store, and every session
    gets `--calibrations STORE` (it checks the stored calibration, as a user's session would). Without it:
    a short first session (`screen --max-targets 1`, not counted) measures it, and every session gets
    `--calibration FILE`. Never the user's own store.
    """

    def __init__(self, folder: Path, camera_px: int, extra: Sequence[str]) -> None:
        self.folder, self.camera_px, self.extra = folder, camera_px, list(extra)
        self.screen_args: list[str] = []
        self.file: Path | None = None
        self.how = ""
        self.wall_s = 0.0

    def prepare(self) -> None:
        """Measure the calibration (once)."""
        if self.file is not None:
            return
        start = time.perf_counter()
        try:
            from agent.commands import calibrate
        except ImportError:
            out = self.folder / "calibration-session"
            run_agent_session("protein-plates", 0, self.camera_px, out, [*self.extra, "--max-targets", "1"])
            self.file, self.screen_args = out / "calibration.json", ["--calibration", str(out / "calibration.json")]
            self.how = "by a first session, passed as --calibration FILE"
        else:
            store = self.folder / "calibrations"
            parser = argparse.ArgumentParser(prog="bench")
            calibrate.register(parser.add_subparsers(dest="command"))
            args = parser.parse_args(["calibrate", "--simulated", "--camera-px", str(self.camera_px),
                                      "--calibrations", str(store), "--json"])
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                calibrate.run_calibrate(args)
            data = json.loads(output.getvalue())
            self.file, self.screen_args = Path(data["path"]), ["--calibrations", str(store)]
            self.how = f"by `crystal-locator calibrate` ({sum(data.get('time_s', {}).values()):.0f} s of microscope "
            self.how += "time, in no session) into a temporary store, passed as --calibrations DIR"
        self.wall_s = time.perf_counter() - start

    def search_matrix(self, preset: str) -> np.ndarray:
        """The stored image -> stage matrix of `preset` (for the naive raster)."""
        self.prepare()
        assert self.file is not None
        return CalibrationSet.load(self.file).matrix(preset)


# -- the agent ------------------------------------------------------------------------------------------------
def run_agent_session(specimen: str, seed: int, camera_px: int, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One `screen --simulated` session through the command's handler; its folder's files and wall time."""
    from agent.commands import screen

    parser = argparse.ArgumentParser(prog="bench")
    screen.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["screen", "--simulated", "--specimen", specimen, "--seed", str(seed), "--camera-px",
                              str(camera_px), "--out", str(out_dir), "--no-labels", "--operator", "none", "--json",
                              *extra])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    output = io.StringIO()  # the command's summary and progress: the benchmark prints its own table
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = screen.run_screen(args)
    finally:  # the command installs abort handlers for its session; give Ctrl-C back to the benchmark
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if code != 0:
        log.warning("session %s ended with exit code %d:\n%s", out_dir.name, code, output.getvalue()[-2000:])
    journal = []
    for line in (out_dir / "journal.jsonl").read_text().splitlines():
        try:
            journal.append(json.loads(line))
        except ValueError:
            continue
    return {
        "exit_code": code,
        "wall_s": time.perf_counter() - start,
        "summary": json.loads((out_dir / "summary.json").read_text()),
        "targets": json.loads((out_dir / "targets.json").read_text())["targets"],
        "plan": json.loads((out_dir / "plan.json").read_text()),
        "journal": journal,
    }


def mapped_boxes(journal: list[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
    """The stage boxes (x_min, x_max, y_min, y_max um) the session mapped (its `mapping` `done` records)."""
    boxes = [tuple(r["box_um"]) for r in journal if r.get("type") == "mapping" and r.get("event") == "done"]
    return [b for i, b in enumerate(boxes) if b not in boxes[:i]]  # type: ignore[misc]


def agent_figures(
    session: dict[str, Any], score: DiffractingScore, clock: str | None, camera_px: int
) -> dict[str, Any]:
    """Throughput and time split of one agent session (summary fields when present, else the journal)."""
    summary, plan = session["summary"], session["plan"]
    total_s = float(summary["microscope_time_s"])
    visited = [t for t in session["targets"] if t["outcome"] != "pending"]
    if summary.get("fixed_time_s") and "per_target_time_s" in summary:
        fixed, per_target_s, source = dict(summary["fixed_time_s"]), summary["per_target_time_s"], "summary"
    else:
        fixed, per_target_s = split_session_time(state_seconds(session["journal"], total_s), len(visited))
        source = "journal"
    snapshot_visits = [seconds for outcome, seconds in visit_seconds(session["journal"])
                       if outcome in ("recorded", "no-diffraction")]
    move_um = mean_step_um([(t["x_um"], t["y_um"]) for t in sorted(visited, key=lambda t: t["order"])]) or 0.0
    floor_s = floor_per_target_s(clock, plan["exposures"]["search_s"], plan["exposures"]["diffraction_s"], move_um,
                                 camera_px)
    return {
        "agent_microscope_time_s": total_s,
        "agent_targets_visited": len(visited),
        "agent_recorded": score.calls,
        "agent_diffracting": score.crystals,
        "agent_diffracting_per_hour": per_hour(score.crystals, total_s),
        "agent_time_per_diffracting_s": per_item(total_s, score.crystals),
        "agent_precision": score.precision,
        "agent_recall": score.recall,
        "agent_summary_diffracting_per_hour": summary.get("diffracting_per_hour"),
        "per_target_time_s": per_target_s,
        "floor_per_target_s": floor_s,
        "mean_move_um": move_um,
        "per_target_over_floor": ratio(per_target_s, floor_s),
        "snapshot_visit_time_s": _mean(snapshot_visits),
        "snapshot_visit_over_floor": ratio(_mean(snapshot_visits), floor_s),
        "fixed_time_s": fixed,
        "fixed_share": fixed_share(fixed, total_s),
        "time_split_source": source,
        "agent_wall_s": session["wall_s"],
    }


def crystal_at_function(truth: Any) -> Callable[[float, float], int]:
    """`crystal_at(x_um, y_um)`: the id of the crystal under (x, y) (within `TOLERANCE_UM` of its outline)
    whose centre is nearest, -1 for none. Nearest rather than `Specimen.crystal_id_xy`'s highest id, so that a
    call on the centre of a crystal that overlaps another counts for the crystal aimed at."""

    def crystal_at(x_um: float, y_um: float) -> int:
        ids = truth.crystals_near(x_um, y_um, TOLERANCE_UM)
        if len(ids) == 0:
            return -1
        inside = truth.crystal_distance_um(ids, np.full(len(ids), x_um), np.full(len(ids), y_um)) >= -TOLERANCE_UM
        ids = ids[inside]
        if len(ids) == 0:
            return -1
        distance = np.hypot(truth.crystals["x_um"][ids] - x_um, truth.crystals["y_um"][ids] - y_um)
        return int(ids[int(np.argmin(distance))])

    return crystal_at


# -- the rasters ----------------------------------------------------------------------------------------------
def raster_settings(plan: dict[str, Any], budget_s: float) -> RasterSettings:
    """The rasters' settings from the agent's plan (the same exposures, preset and diffraction threshold)."""
    return RasterSettings(
        preset=plan["presets"]["search"],
        search_exposure_s=plan["exposures"]["search_s"],
        diffraction_exposure_s=plan["exposures"]["diffraction_s"],
        min_spots=plan["confirm"]["min_spots"],
        min_size_um=plan["confirm"]["min_size_um"],
        budget_s=budget_s,
    )


def fresh_microscope(specimen: str, seed: int, camera_px: int, clock: str | None) -> Any:
    """A new simulated microscope on the same grid and clock as the agent's session."""
    kwargs: dict[str, Any] = {"camera_shape_px": (camera_px, camera_px)}
    if clock:
        kwargs["clock_profile"] = clock
    return create_simulated_microscope(specimen_type=specimen, seed=seed, **kwargs)


def raster_figures(name: str, run: RasterRun, score: DiffractingScore, wall_s: float) -> dict[str, Any]:
    """One raster's row fields, prefixed with `name`."""
    return {
        f"{name}_microscope_time_s": run.microscope_time_s,
        f"{name}_snapshots": len(run.snapshots),
        f"{name}_tiles": run.tiles,
        f"{name}_tiles_planned": run.tiles_planned,
        f"{name}_detections": run.detections,
        f"{name}_out_of_time": run.out_of_time,
        f"{name}_recorded": score.calls,
        f"{name}_diffracting": score.crystals,
        f"{name}_diffracting_per_hour": per_hour(score.crystals, run.microscope_time_s),
        f"{name}_time_per_diffracting_s": per_item(run.microscope_time_s, score.crystals),
        f"{name}_precision": score.precision,
        f"{name}_recall": score.recall,
        f"{name}_wall_s": wall_s,
    }


def run_one(
    specimen: str, seed: int, args: argparse.Namespace, folder: Path, calibrations: Calibrations, extra: list[str]
) -> dict[str, Any]:
    """Agent, naive, oracle and tour on one grid; the JSON row."""
    calibrations.prepare()
    screen_extra = [*extra, "--time-budget-s", str(args.time_budget_s), *calibrations.screen_args]
    if args.clock:
        screen_extra += ["--clock", args.clock]
    session = run_agent_session(specimen, seed, args.camera_px, folder / f"{specimen}-{seed}", screen_extra)
    truth = fresh_microscope(specimen, seed, args.camera_px, args.clock).ground_truth
    boxes = mapped_boxes(session["journal"])
    in_area = {c.id: c for box in boxes for c in truth.crystals_in_box(*box)}
    diffracting_ids = [i for i, c in in_area.items() if c.diffracts]

    crystal_at = crystal_at_function(truth)
    recorded = [(t["x_um"], t["y_um"]) for t in session["targets"] if t["outcome"] == "recorded"]
    row: dict[str, Any] = {"specimen": specimen, "seed": seed, "mapped_boxes_um": boxes,
                           "crystals_in_area": len(in_area), "diffracting_in_area": len(diffracting_ids)}
    row.update(agent_figures(session, score_diffracting_calls(recorded, crystal_at, diffracting_ids), args.clock,
                             args.camera_px))
    if args.no_baselines or not boxes:
        return row
    settings = raster_settings(session["plan"], args.time_budget_s)
    search_matrix = calibrations.search_matrix(settings.preset)
    start = time.perf_counter()
    naive = naive_raster(fresh_microscope(specimen, seed, args.camera_px, args.clock), boxes, search_matrix,
                         args.camera_px, settings)
    row.update(raster_figures("naive", naive, score_diffracting_calls(naive.calls_xy_um, crystal_at,
                                                                      diffracting_ids), time.perf_counter() - start))
    crystals_xy_um = [(c.x_um, c.y_um) for c in in_area.values()]
    start = time.perf_counter()
    oracle = oracle_raster(fresh_microscope(specimen, seed, args.camera_px, args.clock), boxes, search_matrix,
                           args.camera_px, crystals_xy_um, settings)
    row.update(raster_figures("oracle", oracle, score_diffracting_calls(oracle.calls_xy_um, crystal_at,
                                                                        diffracting_ids), time.perf_counter() - start))
    start = time.perf_counter()
    band_um = field_side_um(search_matrix, args.camera_px)
    tour = ground_truth_tour(fresh_microscope(specimen, seed, args.camera_px, args.clock), crystals_xy_um, band_um,
                             settings)
    row.update(raster_figures("tour", tour, score_diffracting_calls(tour.calls_xy_um, crystal_at, diffracting_ids),
                              time.perf_counter() - start))
    for name in ("naive", "oracle", "tour"):
        row[f"ratio_{name}"] = ratio(row["agent_diffracting_per_hour"], row[f"{name}_diffracting_per_hour"])
    return row


# -- output ---------------------------------------------------------------------------------------------------
HEADER = (f"{'specimen':>16} {'seed':>4} | {'agent diff/h':>12} {'s/diff':>7} {'prec':>5} {'rec':>5} {'s/tgt':>6} "
          f"{'floor':>5} {'xfl':>5} {'fixed':>6} {'wall':>5} | {'naive d/h':>9} {'prec':>5} {'rec':>5} "
          f"{'snaps':>5} | {'oracle d/h':>10} {'rec':>5} | {'tour d/h':>8} | {'a/n':>5} {'a/o':>5} {'a/t':>5}")


def print_row(row: dict[str, Any]) -> None:
    """One run as a table row."""
    g = row.get
    print(f"{row['specimen']:>16} {row['seed']:>4} | {_f(g('agent_diffracting_per_hour')):>12} "
          f"{_f(g('agent_time_per_diffracting_s')):>7} {_f(g('agent_precision'), 2):>5} {_f(g('agent_recall'), 2):>5} "
          f"{_f(g('per_target_time_s')):>6} {_f(g('floor_per_target_s')):>5} {_f(g('per_target_over_floor'), 2):>5} "
          f"{_f(100 * g('fixed_share') if g('fixed_share') is not None else None):>5}% {_f(g('agent_wall_s'), 0):>5} | "
          f"{_f(g('naive_diffracting_per_hour')):>9} {_f(g('naive_precision'), 2):>5} {_f(g('naive_recall'), 2):>5} "
          f"{g('naive_snapshots', '-'):>5} | {_f(g('oracle_diffracting_per_hour')):>10} "
          f"{_f(g('oracle_recall'), 2):>5} | {_f(g('tour_diffracting_per_hour')):>8} | "
          f"{_r(g('agent_diffracting_per_hour'), g('naive_diffracting_per_hour')):>5} "
          f"{_r(g('agent_diffracting_per_hour'), g('oracle_diffracting_per_hour')):>5} "
          f"{_r(g('agent_diffracting_per_hour'), g('tour_diffracting_per_hour')):>5}", flush=True)


def specimen_means(rows: list[dict[str, Any]], specimens: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Means per specimen type of the rows' figures, and the ratios of the mean rates."""
    keys = ("agent_diffracting_per_hour", "naive_diffracting_per_hour", "oracle_diffracting_per_hour",
            "tour_diffracting_per_hour",
            "agent_time_per_diffracting_s", "agent_precision", "agent_recall", "naive_precision", "naive_recall",
            "oracle_recall", "per_target_time_s", "floor_per_target_s", "per_target_over_floor",
            "snapshot_visit_time_s", "snapshot_visit_over_floor", "fixed_share",
            "agent_wall_s", "naive_wall_s", "oracle_wall_s", "tour_wall_s")
    means = {}
    for specimen in specimens:
        mine = [r for r in rows if r["specimen"] == specimen]
        m = {key: _mean([r.get(key) for r in mine]) for key in keys}
        for name in ("naive", "oracle", "tour"):  # inf when only the baseline found nothing (the target is met)
            agent, baseline = m["agent_diffracting_per_hour"], m[f"{name}_diffracting_per_hour"]
            m[f"ratio_{name}"] = math.inf if agent and baseline == 0 else ratio(agent, baseline)
        means[specimen] = m
    return means


def print_means(means: dict[str, dict[str, float | None]]) -> None:
    """Means per specimen type and the targets of issue 20, met or not."""
    print("\nmeans per specimen type (ratios: of the mean rates)")
    for specimen, m in means.items():
        print(f"{specimen:>16}: agent {_f(m['agent_diffracting_per_hour'])} diffracting/h "
              f"({_f(m['agent_time_per_diffracting_s'])} s each, precision {_f(m['agent_precision'], 2)}, recall "
              f"{_f(m['agent_recall'], 2)}), per target {_f(m['per_target_time_s'])} s = "
              f"{_f(m['per_target_over_floor'], 2)} x floor ({_f(m['snapshot_visit_over_floor'], 2)} x for visits with "
              f"a snapshot), fixed {_f(100 * (m['fixed_share'] or 0))} % | naive "
              f"{_f(m['naive_diffracting_per_hour'])}/h (precision {_f(m['naive_precision'], 2)}) | oracle "
              f"{_f(m['oracle_diffracting_per_hour'])}/h | tour {_f(m['tour_diffracting_per_hour'])}/h | agent/naive "
              f"{_r(m['agent_diffracting_per_hour'], m['naive_diffracting_per_hour'])}, agent/oracle "
              f"{_r(m['agent_diffracting_per_hour'], m['oracle_diffracting_per_hour'])}, agent/tour "
              f"{_r(m['agent_diffracting_per_hour'], m['tour_diffracting_per_hour'])} (not a target)")
    print("\ntargets of issue 20 (every specimen type):")
    checks = [("agent/naive >= 3", "ratio_naive", lambda v: v >= TARGETS["naive"]),
              ("agent/oracle >= 1.5", "ratio_oracle", lambda v: v >= TARGETS["oracle"]),
              ("per target <= 1.3 x floor", "per_target_over_floor", lambda v: v <= TARGETS["over_floor"]),
              ("  (visits with a snapshot)", "snapshot_visit_over_floor", lambda v: v <= TARGETS["over_floor"]),
              ("fixed <= 10 %", "fixed_share", lambda v: v <= TARGETS["fixed_share"])]
    for label, key, ok in checks:
        values = {s: m[key] for s, m in means.items()}
        met = all(v is not None and ok(v) for v in values.values())
        print(f"  {label:<28} {'met' if met else 'NOT met'}: "
              + ", ".join(f"{s} {_f(v, 2)}" for s, v in values.items()))


def git_commit() -> str:
    """The tree's commit, with `+dirty` when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[5],
                        help="N: seeds 0..N-1 (default 5); several numbers: those seeds")
    parser.add_argument("--specimens", nargs="+", default=list(SPECIMEN_TYPES))
    parser.add_argument("--time-budget-s", type=float, default=3600.0, help="microscope seconds per search")
    parser.add_argument("--camera-px", type=int, default=1024)
    parser.add_argument("--clock", help="clock profile (`screen --clock`; default: the simulator's default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0 only, a 900-s budget")
    parser.add_argument("--no-baselines", action="store_true", help="skip the rasters and the tour")
    parser.add_argument("--out", type=Path, help="keep the session folders here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write one row per specimen type and seed as JSON")
    parser.add_argument("screen_args", nargs=argparse.REMAINDER, help="after --: extra `screen` options")
    args = parser.parse_args(argv)
    args.seed_list = list(range(args.seeds[0])) if len(args.seeds) == 1 else list(args.seeds)
    if args.quick:
        args.seed_list = args.seed_list[:1]
        args.time_budget_s = min(args.time_budget_s, 900.0)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    extra = [a for a in args.screen_args if a != "--"]
    commit, started = git_commit(), time.perf_counter()
    print(f"commit {commit}, seeds {args.seed_list}, budget {args.time_budget_s:.0f} s, camera {args.camera_px} px")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-session-") as tmp:
        folder = args.out or Path(tmp)
        calibrations = Calibrations(folder, args.camera_px, [*extra, *(["--clock", args.clock] if args.clock else [])])
        calibrations.prepare()
        print(f"calibration: measured once {calibrations.how}")
        print(HEADER)
        for specimen in args.specimens:
            for seed in args.seed_list:
                row = run_one(specimen, seed, args, folder, calibrations, extra)
                row["commit"] = commit
                rows.append(row)
                print_row(row)
    means = specimen_means(rows, args.specimens)
    print_means(means)
    print(f"\nwall time {time.perf_counter() - started:.0f} s (calibration {calibrations.wall_s:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
