"""Behaviour check of issue 19: do simulated screening sessions give the same results on two code trees?

Run by hand (each session takes ~40 s of wall time; the 24 sessions ~10 min with `--jobs 2` on an idle
2-core machine, ~20 min under load):

    # record the figures of a tree (default: the repo this script lives in)
    .venv/bin/python benchmarks/compare_behaviour.py --save benchmarks/behaviour_baseline.json
    # compare the current tree with saved figures
    .venv/bin/python benchmarks/compare_behaviour.py --against benchmarks/behaviour_baseline.json
    # run two trees in one go (e.g. a `git worktree` of the old commit) and compare
    .venv/bin/python benchmarks/compare_behaviour.py --baseline-tree /path/to/old/checkout

For every specimen type (`simulator.specimen.SPECIMEN_TYPES`) x seeds 1, 2, 3 x operator `none` and
`simulated`, it runs

    python -m agent.cli screen --simulated --specimen S --seed N --operator OP --labels <empty dir> --out <dir> --json

as a subprocess with `PYTHONPATH` set to the code tree (so the tree's `agent`, `drivers` and `simulator`
are imported, not the installed ones), in a temporary working folder, with `--squares 1 --max-targets 12`
(the default plan until issue 20 sized sessions by a one-hour budget), a fresh empty label memory and an
empty calibration store per run. `behaviour_baseline.json` holds commit 7f47293's figures (stop 23: the
locator's flattening, seams, soft contamination and film level); a change of behaviour needs a new baseline
before it can check a refactor. It collects from each session folder:

- `summary.json`: every key except `wall_time_s` and `session` must be equal (floats compared exactly;
  the summary rounds them already);
- `targets.csv`: must be byte-equal;
- the number of journal lines per record `type`: differences are reported, but do not change the verdict
  (the refactor may add or rename journal records).

Prints one row per run (MATCH / DIFF with the differing keys), a final line `N match, M differ`, and exits
with code 1 if any run differs or fails.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# The four types of simulator.specimen.SPECIMEN_TYPES (at 117d3de), fixed here so that every tree runs the same set.
SPECIMENS = ("graphite-flakes", "asbestos-fibres", "protein-plates", "polymer-faint")
SEEDS = (1, 2, 3)
OPERATORS = ("none", "simulated")
IGNORED_KEYS = frozenset({"wall_time_s", "session"})


@dataclass(frozen=True)
class RunSpec:
    """One screening session to run: specimen type, seed and who answers prompts."""

    specimen: str
    seed: int
    operator: str

    @property
    def name(self) -> str:
        """Key of the run in saved files and name of its session folder."""
        return f"{self.specimen}-s{self.seed}-{self.operator}"


def run_session(tree: Path, spec: RunSpec, work_dir: Path) -> dict[str, Any]:
    """Run one `screen --simulated` session of `tree` as a subprocess; its results as a JSON-able dict.

    The dict has `summary` (summary.json), `targets_csv` (text), `journal_counts` (lines per record type),
    `wall_s` (wall time of the subprocess, s) and, if the command failed, `error` (end of its stderr).
    """
    run_dir = work_dir / spec.name
    labels_dir = run_dir / "labels"
    labels_dir.mkdir(parents=True)
    out_dir = run_dir / spec.name
    options = {"--specimen": spec.specimen, "--seed": str(spec.seed), "--operator": spec.operator}
    options |= {"--labels": str(labels_dir), "--out": str(out_dir)}
    # the small session the default plan was until issue 20 (one square, 12 targets): default plans are now sized
    # by a one-hour budget, far too long for a behaviour check
    options |= {"--squares": "1", "--max-targets": "12"}
    command = [sys.executable, "-m", "agent.cli", "screen", "--simulated", "--json", *itertools.chain(*options.items())]
    # an empty data folder per run: a calibration stored by one session must not change the next one
    data = {"XDG_DATA_HOME": str(run_dir / "data"), "CRYSTAL_LOCATOR_CALIBRATIONS": str(run_dir / "calibrations")}
    env = {**os.environ, "PYTHONPATH": str(tree), **data}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {"wall_s": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0 or not (out_dir / "summary.json").exists():
        result["error"] = f"exit code {proc.returncode}: {proc.stderr[-2000:]}"
        return result
    result["summary"] = json.loads((out_dir / "summary.json").read_text())
    result["targets_csv"] = (out_dir / "targets.csv").read_text() if (out_dir / "targets.csv").exists() else None
    journal_lines = (out_dir / "journal.jsonl").read_text().splitlines()
    counts = collections.Counter(json.loads(line)["type"] for line in journal_lines if line.strip())
    result["journal_counts"] = dict(sorted(counts.items()))
    return result


def run_all(trees: list[Path], specs: list[RunSpec], jobs: int) -> list[dict[str, dict[str, Any]]]:
    """Run every spec on every tree (`jobs` subprocesses at a time); per tree, results keyed by run name."""
    with tempfile.TemporaryDirectory(prefix="compare-behaviour-") as tmp:
        tasks = [(index, tree, spec) for index, tree in enumerate(trees) for spec in specs]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda t: run_session(t[1], t[2], Path(tmp) / f"tree{t[0]}"), tasks))
    per_tree: list[dict[str, dict[str, Any]]] = [{} for _ in trees]
    for (index, _, spec), result in zip(tasks, results, strict=True):
        per_tree[index][spec.name] = result
    return per_tree


def check_tree(tree: Path) -> None:
    """Exit with a message unless `python -m agent.cli` with `PYTHONPATH=tree` imports `agent` from `tree`."""
    code = "import agent, pathlib; print(pathlib.Path(agent.__file__).resolve().parents[1])"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=False
    )
    imported_from = proc.stdout.strip()
    if proc.returncode != 0 or Path(imported_from) != tree:
        sys.exit(f"{tree}: not a code tree (agent imported from {imported_from or 'nowhere'}: {proc.stderr[-300:]})")


def git_commit(tree: Path) -> dict[str, Any]:
    """The tree's git commit and whether it has uncommitted changes (None if not a git checkout)."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def last_line(text: str) -> str:
    """The last non-empty line of `text` (the exception line of a traceback)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "?"


def differences(result: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """What makes `result` differ from `reference`: summary keys (with both values) and `targets.csv`."""
    for side, name in ((result, "this tree"), (reference, "reference")):
        if "error" in side:
            return [f"{name} failed: {last_line(side['error'])}"]
    summary, ref_summary = result["summary"], reference["summary"]
    keys = sorted((summary.keys() | ref_summary.keys()) - IGNORED_KEYS)
    diffs = [
        f"{key}: {ref_summary.get(key)!r} -> {summary.get(key)!r}"
        for key in keys
        if summary.get(key, "<missing>") != ref_summary.get(key, "<missing>")
    ]
    if result["targets_csv"] != reference["targets_csv"]:
        diffs.append("targets.csv")
    return diffs


def journal_note(result: dict[str, Any], reference: dict[str, Any]) -> str | None:
    """A line on journal record counts that differ (informative only), or None."""
    counts, ref_counts = result.get("journal_counts") or {}, reference.get("journal_counts") or {}
    changed = [
        f"{kind} {ref_counts.get(kind, 0)} -> {counts.get(kind, 0)}"
        for kind in sorted(counts.keys() | ref_counts.keys())
        if counts.get(kind, 0) != ref_counts.get(kind, 0)
    ]
    return "journal record counts: " + ", ".join(changed) if changed else None


def table_row(spec: RunSpec, result: dict[str, Any], verdict: str) -> str:
    """One printed row: the run, its main figures and the verdict."""
    s = result.get("summary") or {}
    counts = "/".join(
        str(s.get(key, "-")) for key in ("targets_found", "targets_visited", "targets_confirmed", "targets_recorded")
    )
    return (
        f"{spec.specimen:<16} {spec.seed:>4} {spec.operator:<9} {counts:>11} {s.get('prompts', '-')!s:>7} "
        f"{s.get('microscope_time_s', '-')!s:>9} {s.get('precision', '-')!s:>9} {s.get('recall', '-')!s:>7}  "
        f"{verdict}"
    )


def report(specs: list[RunSpec], results: dict[str, Any], references: dict[str, Any] | None) -> int:
    """Print the table (and the verdicts if there are references); the number of runs that differ or failed."""
    print(
        f"{'specimen':<16} {'seed':>4} {'operator':<9} {'f/v/c/r':>11} {'prompts':>7} {'micro_s':>9} "
        f"{'precision':>9} {'recall':>7}  verdict"
    )
    n_match = n_differ = 0
    for spec in specs:
        result = results[spec.name]
        reference = None if references is None else references.get(spec.name)
        note = None
        if references is None:
            diffs = [f"failed: {last_line(result['error'])}"] if "error" in result else []
            verdict = "FAILED " + diffs[0] if diffs else f"(ran in {result['wall_s']} s)"
        elif reference is None:
            diffs, verdict = ["no reference"], "DIFF no reference run"
        else:
            diffs = differences(result, reference)
            verdict = "DIFF " + "; ".join(diffs) if diffs else "MATCH"
            note = journal_note(result, reference)
        print(table_row(spec, result, verdict))
        if note:
            print(f"{'':<32}{note}")
        n_differ += bool(diffs)
        n_match += not diffs
    print(f"{n_match} match, {n_differ} differ" if references is not None else f"{n_match} ran, {n_differ} failed")
    return n_differ


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="code tree to run (default: this repo)")
    parser.add_argument("--save", type=Path, metavar="FILE", help="write the tree's results (and commit) as JSON")
    parser.add_argument("--against", type=Path, metavar="FILE", help="compare with results saved by --save")
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR", help="also run this tree and compare with it")
    parser.add_argument("--jobs", type=int, default=2, help="sessions run at the same time (default 2)")
    parser.add_argument("--specimens", nargs="+", default=list(SPECIMENS), choices=SPECIMENS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    args = parser.parse_args(argv)
    if args.against is not None and args.baseline_tree is not None:
        parser.error("give --against or --baseline-tree, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sessions, save and/or compare; exit code 1 if any run differs or failed."""
    args = parse_args(argv)
    specs = [RunSpec(sp, seed, op) for sp in args.specimens for seed in args.seeds for op in args.operators]
    trees = [args.tree.resolve()] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
    references: dict[str, Any] | None = None
    if args.against is not None:
        saved = json.loads(args.against.read_text())
        references = saved["runs"]
        print(f"reference: {args.against} (commit {saved.get('commit')}, dirty {saved.get('dirty')})")
    for label, tree in zip(("tree", "baseline tree"), trees, strict=False):
        check_tree(tree)
        print(f"{label}: {tree} {git_commit(tree)}")
    start = time.perf_counter()
    per_tree = run_all(trees, specs, args.jobs)
    print(f"{len(specs) * len(trees)} sessions in {time.perf_counter() - start:.0f} s wall ({args.jobs} jobs)")
    if args.baseline_tree is not None:
        references = per_tree[1]
    if args.save is not None:
        saved_runs = {name: {k: v for k, v in result.items() if k != "wall_s"} for name, result in per_tree[0].items()}
        payload = {"tree": str(trees[0]), **git_commit(trees[0]), "runs": saved_runs}
        args.save.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        print(f"saved: {args.save}")
    return 1 if report(specs, per_tree[0], references) else 0


if __name__ == "__main__":
    sys.exit(main())
