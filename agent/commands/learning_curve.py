"""`crystal-locator evaluate --learning N`: a learning curve of the crystal classifier on simulated grids.

Per specimen type, N screening sessions on seeds `--learning-seed`, +1, ... (seeds never used for tuning)
run one after another on one label memory, so session k starts with k-1 sessions of memory; the same
seeds are also run each on an empty memory (cold), in the same run, so that a seed's difficulty is not
taken for learning. Sessions are small (`--learning-squares`, `--learning-max-targets`), or sized by a
microscope-time budget (`--learning-budget-s`: then not every target fits and the ranking decides which
are visited, as in a real session); the instrument is calibrated once before them (`crystal-locator
calibrate`), and every session only checks that calibration.
Each runs as `crystal-locator screen --simulated ... --operator simulated`
in a child process; their folders stay under OUT for inspection.

Prints one row per specimen and session (hit rate = diffracting / visited, precision of the diffracting
calls, diffracting per hour, ground-truth precision and recall) with the cold run's figures beside it, and
the reliability curve of the probabilities over the sessions with memory; `--json` and `--html` write them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.cli import CommandError

#: First seed of the learning curve: far from the seeds tests, benchmarks and tuning use (0-20).
DEFAULT_LEARNING_SEED = 1000


def _screen(out: Path, specimen: str, seed: int, labels: Path, args: argparse.Namespace) -> None:
    """Run one simulated session into `out` (`CommandError` if it fails)."""
    command = [
        sys.executable, "-m", "agent.cli", "screen", "--simulated", "--specimen", specimen, "--seed", str(seed),
        "--operator", "simulated", "--labels", str(labels), "--calibrations", str(out.parent / "calibrations"),
        "--camera-px", str(args.learning_camera_px), "--out", str(out), "--json",
    ]
    if args.learning_budget_s is not None:  # sized by time: the ranking decides which targets are visited
        command += ["--time-budget-s", str(args.learning_budget_s)]
    else:
        command += ["--squares", str(args.learning_squares), "--max-targets", str(args.learning_max_targets)]
    if args.conditions:
        command += ["--conditions", args.conditions]
    _run_child(command, f"session {out}")
    if not (out / "summary.json").exists():
        raise CommandError(f"session {out} failed: it wrote no summary.json")


def _calibrate(store: Path, specimen: str, args: argparse.Namespace) -> None:
    """Measure the simulated instrument's calibration once into `store` (`crystal-locator calibrate`), so that
    every session, with memory or cold, only checks it: no session pays for it and the first is not slower."""
    command = [
        sys.executable, "-m", "agent.cli", "calibrate", "--simulated", "--specimen", specimen,
        "--camera-px", str(args.learning_camera_px), "--calibrations", str(store),
    ]
    _run_child(command, "calibrating the simulated instrument")


def _run_child(command: list[str], what: str) -> None:
    """Run a `crystal-locator` child process; `CommandError` naming `what` with its last lines if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise CommandError(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")


def run_learning_curve(args: argparse.Namespace, specimens: tuple[str, ...]) -> dict[str, Any]:
    """Run the sessions (see module docstring) and return the JSON-ready result."""
    from agent.evaluation.learning import reliability_bins, session_figures

    root = Path(args.learning_out)
    if root.exists() and any(root.iterdir()):
        raise CommandError(f"{root} is not empty; give a new folder for the learning curve's sessions")
    rows: list[dict[str, Any]] = []
    visits_with_memory: list[tuple[float | None, bool]] = []
    for specimen in specimens:
        _calibrate(root / specimen / "calibrations", specimen, args)
        for index in range(args.learning):
            seed = args.learning_seed + index
            learned_dir = root / specimen / f"learning-{seed}"
            cold_dir = root / specimen / f"cold-{seed}"
            print(f"{specimen} seed {seed}: session {index + 1} of {args.learning}", file=sys.stderr, flush=True)
            _screen(learned_dir, specimen, seed, root / specimen / "memory", args)
            _screen(cold_dir, specimen, seed, root / specimen / f"cold-memory-{seed}", args)
            learned = session_figures(learned_dir, specimen=specimen, seed=seed, memory_sessions=index)
            cold = session_figures(cold_dir, specimen=specimen, seed=seed, memory_sessions=0)
            if index > 0:
                visits_with_memory += learned.visits
            rows.append({**learned.as_dict(), "cold": cold.as_dict()})
    return {"rows": rows, "reliability": reliability_bins(visits_with_memory), "settings": _settings(args)}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "sessions": args.learning, "first_seed": args.learning_seed, "conditions": args.conditions or "none",
        "camera_px": args.learning_camera_px,
        **(
            {"time_budget_s": args.learning_budget_s}
            if args.learning_budget_s is not None
            else {"squares": args.learning_squares, "max_targets": args.learning_max_targets}
        ),
    }


def print_learning(result: dict[str, Any]) -> None:
    """The learning curve and the reliability curve as tables."""
    from rich.console import Console
    from rich.table import Table

    def f(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    table = Table(title="learning curve: sessions on one label memory (cold: the same seed, empty memory)")
    for column in ("specimen", "seed", "memory", "visited", "diffracting", "hit rate", "cold hit rate",
                   "call precision", "calls", "diffr/h", "cold diffr/h", "precision", "unique", "recall"):
        table.add_column(column)
    for r in result["rows"]:
        cold = r["cold"]
        table.add_row(r["specimen"], str(r["seed"]), str(r["memory_sessions"]), str(r["visited"]),
                      str(r["diffracting"]), f(r["hit_rate"]), f(cold["hit_rate"]), f(r["call_precision"]),
                      str(r["calls"]), f(r["diffracting_per_hour"]), f(cold["diffracting_per_hour"]),
                      f(r["precision"]), f(r["precision_unique"]), f(r["recall"]))
    reliability = Table(title="reliability of the probabilities (sessions with memory)")
    for column in ("bin", "mean probability", "diffracted share", "visits"):
        reliability.add_column(column)
    for b in result["reliability"]:
        reliability.add_row(f"{b['bin_low']:.1f}-{b['bin_high']:.1f}", f(b["mean_probability"]),
                            f(b["diffracted_share"]), str(b["count"]))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 170))
    console.print(table)
    console.print(reliability)


def write_learning_outputs(result: dict[str, Any], json_path: Path | None, html_path: Path | None) -> None:
    """Write the result as JSON and/or as a self-contained HTML page with the reliability curve."""
    from agent.evaluation.learning import learning_report_html
    from drivers.formats.images import write_atomic

    if json_path is not None:
        write_atomic(json_path, json.dumps(result, indent=2).encode())
        print(f"wrote {json_path}")
    if html_path is not None:
        write_atomic(html_path, learning_report_html(result).encode("utf-8"))
        print(f"wrote {html_path}")
