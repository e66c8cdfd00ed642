"""Benchmark: label-memory suggestions as the memory grows to hundreds of sessions.

Run by hand: `.venv/bin/python benchmarks/bench_label_memory.py [--sessions 50 200 500] [--repeats 3]`.

A facility screening one specimen type every day has hundreds of sessions in its memory within a year, and
every new session asks for suggestions once, in a fresh process: the held-out check (every answered
session predicted from the others) is computed from scratch then. For each memory size this prints the
time of that first `LabelMemory.suggest` (held-out check included) and, as the baseline in the same
process, the held-out check computed the straightforward way: the votes recomputed from the other sessions
for each held-out session (`_votes_and_voters` per session), which costs the number of sessions squared.
Both must give the same verdicts; the script checks that.

Memories are synthetic: five cluster kinds per session with 15 % feature jitter, one of them answered
crystal, one answered either way (a mixed kind).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.prompts import LabelMemory
from agent.prompts.label_votes import CALIBRATION_CONFIDENCE

NAMES = tuple(f"feature_{i}" for i in range(9))


def fill(memory: LabelMemory, n_sessions: int, seed: int = 0) -> np.ndarray:
    """`n_sessions` sessions of five clusters each; returns the five kinds' centroids."""
    rng = np.random.default_rng(seed)
    kinds = rng.normal(size=(5, len(NAMES))) * 5.0
    for session in range(n_sessions):
        vectors = kinds * (1.0 + 0.15 * rng.standard_normal(kinds.shape))
        labels = [False, False, False, True, bool(rng.random() < 0.5)]
        memory.record_clusters(vectors, NAMES, labels, specimen="p", preset="atlas", session=f"s{session}")
    return kinds


def held_out_by_recomputing(memory: LabelMemory) -> dict[str, tuple[bool, bool]]:
    """The baseline: for each session, the votes recomputed from all the other sessions' records."""
    records = memory.list_records()
    verdicts = {}
    for session in sorted({r.session for r in records}):
        mine = [r for r in records if r.session == session]
        others = [r for r in records if r.session != session]
        votes, _ = memory._votes_and_voters(np.array([r.feature_vector for r in mine]), NAMES, others)
        for record, vote in zip(mine, votes, strict=True):
            if vote.n_support and vote.confidence >= CALIBRATION_CONFIDENCE:
                verdicts[record.id] = (vote.is_crystal, vote.is_crystal == record.is_crystal)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'sessions':>8} {'records':>8} {'first suggest s':>16} {'baseline s':>11} {'ratio':>7}")
    for n_sessions in args.sessions:
        with tempfile.TemporaryDirectory(prefix="bench-label-memory-") as tmp:
            kinds = fill(LabelMemory(Path(tmp)), n_sessions)
            times = []
            for _ in range(args.repeats):
                memory = LabelMemory(Path(tmp))  # a fresh process's view: nothing cached
                start = time.perf_counter()
                memory.suggest(kinds, NAMES, "p", "atlas")
                times.append(time.perf_counter() - start)
            memory = LabelMemory(Path(tmp))
            start = time.perf_counter()
            baseline = held_out_by_recomputing(memory)
            baseline_s = time.perf_counter() - start
            if baseline != memory.held_out_verdicts("p", "atlas"):
                raise SystemExit("the held-out verdicts differ from the baseline's")
            first_s = statistics.median(times)
            ratio = baseline_s / first_s
            print(f"{n_sessions:>8} {5 * n_sessions:>8} {first_s:>16.3f} {baseline_s:>11.3f} {ratio:>6.1f}x")


if __name__ == "__main__":
    main()
