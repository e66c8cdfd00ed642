"""Benchmark: prompts per session as label memory fills, and how precise the labels it gives are.

Run by hand: `.venv/bin/python benchmarks/bench_labels.py [--sessions 4] [--specimens TYPE ...]
[--camera-px 1024] [--squares 1] [--max-targets 2] [--json FILE]` (about 10 minutes at 1024 px under
load; `--camera-px 512` takes 4, but a 512 px atlas frame shows about one grid square, often without
crystals, and its clusters do not recur across seeds: see `docs/label-memory.md` for both figures).

For every specimen type: a fresh label-memory folder (temporary), then `--sessions` simulated screening
sessions of that type with seeds 1, 2, ... sharing it, each with the simulated operator answering prompts
over ZeroMQ (as `screen --simulated --operator simulated --labels DIR` runs them: `ScreeningSession` in
process, with an `OperatorChannel` on 127.0.0.1 and an `agent.prompts.PolicyOperator` answering with a
`simulator.operator.SimulatedAnswerPolicy`), then one
session of a different specimen type (the next one in the list) on the same memory, which must be asked
about again.

Per session it reports the prompts asked (`summary.json` `prompts`), where each cluster's label came
from (label memory, the operator, a fallback), and the target precision against ground truth from the
summary. Precision of crystal-cluster labels is measured against ground truth the way the simulated
operator judges a cluster: the fraction of the cluster's sample positions (the prompt's
`sample_xy_um`, typical cells of the cluster) that lie on a true crystal, with the operator's
tolerance; a cluster is "crystal" when that fraction reaches the operator's `min_hit_fraction`.

- `cluster precision`: of the clusters labelled crystal by memory (auto) / by the operator, the
  fraction the operator's criterion calls crystal (the operator's own is 1 by construction, unless
  it makes mistakes; with `--error-rate` it does);
- `sample precision`: the mean, over the clusters labelled crystal, of the fraction of their sample
  positions on a crystal (what the operator looks at);
- `cell precision`: of ALL cells of the clusters labelled crystal, the fraction on a true crystal
  (what targets are drawn from; pooled over the sessions of a type).

Replay (`replay_orders`): the sessions' clusters are also replayed offline in every order (24 for four
sessions), each answered as the simulated operator would; it reports the mean prompts per session
position and how many confident memory labels disagreed with the operator. One live run sees one order,
in which a single mixed cluster decides whether a session asks.

"Auto" counts the labels memory gave with enough confidence to skip asking (`label-memory`); fallback
labels (nobody answered) are counted apart and should not occur with the simulated operator.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan  # noqa: E402
from agent.prompts import LabelMemory, OperatorChannel, PolicyOperator  # noqa: E402
from agent.session.screening import ScreeningSession  # noqa: E402
from agent.steps.label import sample_xy_um  # noqa: E402
from simulator import SPECIMEN_TYPES, create_simulated_microscope  # noqa: E402
from simulator.operator import SimulatedAnswerPolicy  # noqa: E402
from simulator.scoring import score_session  # noqa: E402


def run_session(
    specimen: str,
    seed: int,
    labels_dir: Path,
    out_dir: Path,
    *,
    camera_px: int,
    squares: int,
    max_targets: int,
    error_rate: float,
) -> dict[str, Any]:
    """One simulated screening session with the simulated operator and the shared label memory."""
    microscope = create_simulated_microscope(specimen_type=specimen, seed=seed, camera_shape_px=(camera_px,) * 2)
    truth = microscope.ground_truth
    plan = ScreeningPlan(
        specimen=specimen,
        seed=seed,
        area=AreaPlan(squares=squares),
        targeting=TargetingPlan(max_targets=max_targets),
    )
    memory = LabelMemory(labels_dir)
    policy = SimulatedAnswerPolicy(truth, seed=seed, error_rate=error_rate)
    start = time.perf_counter()
    with (
        OperatorChannel("tcp://127.0.0.1:0") as channel,
        PolicyOperator(channel.prompt_endpoint, policy),
    ):
        session = ScreeningSession(
            microscope,
            plan,
            out_dir,
            labels=memory,
            operator=channel,
            truth_scorer=lambda targets, results, box: score_session(truth, list(results.values()), box),
        )
        session.run()
    wall_s = time.perf_counter() - start
    summary = json.loads((out_dir / "summary.json").read_text())
    return {
        "specimen": specimen,
        "seed": seed,
        "wall_s": wall_s,
        "prompts": summary.get("prompts"),
        "target_precision": summary.get("precision"),
        "targets_found": summary.get("targets_found"),
        "clusters": _judge_clusters(session, truth, policy),
        "operator_mistakes": sum(len(d.mistakes) for d in policy.decisions),
        "preset": plan.presets.atlas,
        "feature_names": list(session.analysis.feature_names) if session.analysis is not None else [],
        "centroids": session.analysis.normalised_centroids().tolist() if session.analysis is not None else [],
    }


def _judge_clusters(session: ScreeningSession, truth: Any, policy: SimulatedAnswerPolicy) -> list[dict[str, Any]]:
    """Per cluster: its label, where it came from, and ground truth as the simulated operator sees it."""
    analysis, atlas, decision = session.analysis, session.atlas, session.decision
    if analysis is None or atlas is None or decision is None:
        return []
    labels = np.asarray(analysis.label_grid).ravel()
    cell_xy = atlas.pixel_to_stage_um(np.asarray(analysis.cell_centres_px, dtype=np.float64))
    on_crystal = truth.crystal_id_xy(cell_xy[:, 0], cell_xy[:, 1], tolerance_um=policy.tolerance_um) >= 0
    rows = []
    for cluster in analysis.clusters:
        cid = int(cluster.cluster_id)
        samples = np.asarray(sample_xy_um(session.ctx, cluster), dtype=np.float64).reshape(-1, 2)
        hits = truth.crystal_id_xy(samples[:, 0], samples[:, 1], tolerance_um=policy.tolerance_um) >= 0
        members = labels == cid
        sample_fraction = float(np.mean(hits)) if len(hits) else 0.0
        rows.append(
            {
                "cluster_id": cid,
                "n_cells": int(members.sum()),
                "labelled_crystal": cid in decision.crystal_clusters,
                "mixed": cid in decision.mixed_clusters,
                "source": decision.sources.get(cid, "?"),
                "confidence": decision.confidences.get(cid),
                "sample_fraction": sample_fraction,
                "truly_crystal": sample_fraction >= policy.min_hit_fraction,
                "cells_on_crystal": int(on_crystal[members].sum()),
            }
        )
    return rows


def _group(source: str) -> str:
    if source == "label-memory":
        return "auto"
    if source.startswith("label-memory:mixed"):
        return "mixed"
    if source == "operator":
        return "operator"
    return "fallback"


def precision_by_group(sessions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Cluster and cell precision of crystal labels, per label origin (auto / operator / fallback / mixed:
    for mixed clusters, "crystal" means that targets were drawn from them, after the crystal clusters')."""
    result: dict[str, dict[str, Any]] = {}
    for group in ("auto", "operator", "fallback", "mixed"):
        labelled = [c for s in sessions for c in s["clusters"] if _group(c["source"]) == group]
        crystal = [c for c in labelled if c["labelled_crystal"] or c.get("mixed")]
        cells = sum(c["n_cells"] for c in crystal)
        result[group] = {
            "labelled": len(labelled),
            "crystal": len(crystal),
            "cluster_precision": (sum(c["truly_crystal"] for c in crystal) / len(crystal)) if crystal else None,
            "sample_precision": (sum(c["sample_fraction"] for c in crystal) / len(crystal)) if crystal else None,
            "cell_precision": (sum(c["cells_on_crystal"] for c in crystal) / cells) if cells else None,
            # clusters the operator's criterion calls crystal that got "not crystal" (missed)
            "missed": sum(1 for c in labelled if c["truly_crystal"] and c not in crystal),
        }
    return result


def replay_orders(sessions: list[dict[str, Any]], max_orders: int = 24) -> dict[str, Any]:
    """Offline replay of the memory on the sessions' clusters in every order (a seeded sample of
    `max_orders` when there are more).

    Each session is labelled from a fresh memory holding the sessions before it in that order, all answered
    as the simulated operator would answer them (`truly_crystal`, also for clusters memory labelled in the
    live run); a session asks when any cluster is below the default confidence threshold. One live run sees
    one order, in which one mixed cluster decides whether a session asks; the replay averages that out.
    Returns the mean prompts per session position, and how many confident labels disagreed with the
    operator (`wrong`), of how many (`auto`, `auto_crystal`); clusters memory called mixed (`mixed`; not
    asked under the default `mixed="last"`) are counted apart, with how many the operator would have
    called crystal (`mixed_crystal`).
    """
    from agent.prompts import DEFAULT_CONFIDENCE_THRESHOLD

    usable = [s for s in sessions if s["centroids"]]
    if math.factorial(len(usable)) <= max_orders:
        orders = list(itertools.permutations(range(len(usable))))
    else:  # a seeded sample of orders (the first permutations would all start with session 0)
        rng = np.random.default_rng(0)
        orders = [tuple(int(i) for i in rng.permutation(len(usable))) for _ in range(max_orders)]
    prompts = np.zeros(len(usable))
    auto = auto_crystal = wrong = mixed = mixed_crystal = 0
    for order in orders:
        with tempfile.TemporaryDirectory(prefix="bench-labels-replay-") as tmp:
            memory = LabelMemory(Path(tmp))
            for position, index in enumerate(order):
                session = usable[index]
                answers = [bool(c["truly_crystal"]) for c in session["clusters"]]
                centroids = np.asarray(session["centroids"], dtype=np.float64)
                names, specimen, preset = session["feature_names"], session["specimen"], session["preset"]
                suggestions = memory.suggest(centroids, names, specimen, preset)
                confident = [s.confidence >= DEFAULT_CONFIDENCE_THRESHOLD or s.mixed for s in suggestions]
                prompts[position] += not all(confident)
                for sure, suggestion, answer in zip(confident, suggestions, answers, strict=True):
                    if sure and suggestion.mixed:
                        mixed += 1
                        mixed_crystal += answer
                    elif sure:
                        auto += 1
                        auto_crystal += suggestion.is_crystal
                        wrong += suggestion.is_crystal != answer
                memory.record_clusters(
                    centroids, names, answers, specimen=specimen, preset=preset, session=f"replay-{index}",
                    source="simulated",
                )
    return {
        "orders": len(orders),
        "prompts_by_position": (prompts / max(1, len(orders))).round(2).tolist(),
        "auto": auto,
        "auto_crystal": auto_crystal,
        "wrong": wrong,
        "mixed": mixed,
        "mixed_crystal": mixed_crystal,
    }


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4, help="sessions per specimen type on one memory")
    parser.add_argument("--specimens", nargs="+", default=list(SPECIMEN_TYPES))
    parser.add_argument("--camera-px", type=int, default=1024)
    parser.add_argument("--squares", type=int, default=1)
    parser.add_argument("--max-targets", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--error-rate", type=float, default=0.0, help="simulated operator's mistake rate")
    parser.add_argument("--out", type=Path, help="keep session folders and memories here (default: temporary)")
    parser.add_argument("--json", type=Path, help="write every session as JSON")
    args = parser.parse_args()
    console = Console(width=240)

    results: list[dict[str, Any]] = []
    session = functools.partial(
        run_session,
        camera_px=args.camera_px,
        squares=args.squares,
        max_targets=args.max_targets,
        error_rate=args.error_rate,
    )
    with tempfile.TemporaryDirectory(prefix="bench-labels-") as tmp:
        base = args.out or Path(tmp)
        for index, specimen in enumerate(args.specimens):
            labels_dir = base / f"labels-{specimen}"
            sessions = []
            for n in range(args.sessions):
                seed = args.first_seed + n
                row = session(specimen, seed, labels_dir, base / f"{specimen}-s{seed}")
                sources = [c["source"] for c in row["clusters"]]
                console.print(
                    f"{specimen} seed {seed}: {row['prompts']} prompt(s), labels "
                    f"{sources.count('label-memory')} memory / {sources.count('operator')} operator, "
                    f"target precision {_f(row['target_precision'])}, {row['wall_s']:.1f} s"
                )
                sessions.append(row)
            others = [s for s in SPECIMEN_TYPES if s != specimen]
            new_type = others[index % len(others)]
            new_seed = args.first_seed + args.sessions
            new = session(new_type, new_seed, labels_dir, base / f"{specimen}-then-{new_type}-s{new_seed}")
            console.print(f"{specimen} memory, new type {new_type} seed {new_seed}: {new['prompts']} prompt(s)")
            results.append(
                {
                    "specimen": specimen,
                    "sessions": sessions,
                    "new_type": new,
                    "precision": precision_by_group(sessions),
                    "replay": replay_orders(sessions),
                }
            )

    table = Table(title=f"label memory: {args.sessions} sessions per type, then a new type ({args.camera_px} px)")
    table.add_column("specimen")
    table.add_column("prompts / session")
    table.add_column("new type: prompts")
    table.add_column("auto: n / crystal")
    table.add_column("auto prec (cluster / sample / cell)")
    table.add_column("operator: n / crystal")
    table.add_column("operator prec (cluster / sample / cell)")
    table.add_column("missed auto / op")
    table.add_column("mixed: n / operator's crystal")
    table.add_column("target prec")
    table.add_column("replay: prompts by position / wrong of auto, mixed")
    for entry in results:
        p = entry["precision"]
        auto, op = p["auto"], p["operator"]
        target = [s["target_precision"] for s in entry["sessions"] if s["target_precision"] is not None]
        mixed_crystal = sum(c["truly_crystal"] for s in entry["sessions"] for c in s["clusters"] if c.get("mixed"))
        table.add_row(
            entry["specimen"],
            ",".join(str(s["prompts"]) for s in entry["sessions"]),
            f"{entry['new_type']['prompts']} ({entry['new_type']['specimen']})",
            f"{auto['labelled']} / {auto['crystal']}",
            f"{_f(auto['cluster_precision'])} / {_f(auto['sample_precision'])} / {_f(auto['cell_precision'])}",
            f"{op['labelled']} / {op['crystal']}",
            f"{_f(op['cluster_precision'])} / {_f(op['sample_precision'])} / {_f(op['cell_precision'])}",
            f"{auto['missed']} / {op['missed']}",
            f"{p['mixed']['labelled']} / {mixed_crystal}",
            ",".join(_f(t) for t in target) or "-",
            f"{','.join(_f(v) for v in entry['replay']['prompts_by_position'])} / "
            f"{entry['replay']['wrong']} of {entry['replay']['auto']}, mixed {entry['replay']['mixed']}",
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
