"""How much the crystal classifier learns: figures of screening sessions run one after another on one label
memory (a learning curve), read from their session folders.

Per session (`session_figures`): targets visited, diffracting, the hit rate (diffracting / visited), the
precision of the diffracting calls (among targets visited with a classifier probability >= 0.5 at the time
of the visit, the share that diffracted; None while there was no classifier), precision and recall against
ground truth from the summary, and the (probability, diffracted) pairs of its visits.
Over sessions (`reliability_bins`): the reliability curve of the probabilities -- in each probability bin,
the mean probability and the share that diffracted; calibrated probabilities lie on the diagonal.

Only `agent/commands` runs the sessions (it wires the simulator); this module reads what they wrote.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.session.journal import JOURNAL_NAME, read_records
from agent.session.records import TargetFinished, TargetsPlanned, TargetsRanked

#: A visit "called diffracting" when the classifier gave it at least this probability.
CALL_THRESHOLD = 0.5


@dataclass(frozen=True)
class SessionFigures:
    """What one session of a learning curve achieved (see module docstring)."""

    folder: str
    specimen: str
    seed: int
    memory_sessions: int
    visited: int
    diffracting: int
    diffracting_per_hour: float | None
    precision: float | None
    precision_unique: float | None
    recall: float | None
    calls: int
    call_precision: float | None
    visits: list[tuple[float | None, bool]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float | None:
        """Diffracting / visited (None without visits)."""
        return self.diffracting / self.visited if self.visited else None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready row (without the per-visit pairs)."""
        return {
            "folder": self.folder,
            "specimen": self.specimen,
            "seed": self.seed,
            "memory_sessions": self.memory_sessions,
            "visited": self.visited,
            "diffracting": self.diffracting,
            "hit_rate": None if self.hit_rate is None else round(self.hit_rate, 3),
            "diffracting_per_hour": self.diffracting_per_hour,
            "precision": self.precision,
            "precision_unique": self.precision_unique,
            "recall": self.recall,
            "calls": self.calls,
            "call_precision": None if self.call_precision is None else round(self.call_precision, 3),
        }


def visits_with_probability(folder: Path) -> list[tuple[float | None, bool]]:
    """(the target's probability when it was visited, whether it diffracted) for every visit of a session,
    in the order they finished; failed and skipped visits are left out."""
    latest: dict[str, float | None] = {}
    visits: list[tuple[float | None, bool]] = []
    for record in read_records(folder / JOURNAL_NAME):
        if isinstance(record, TargetsPlanned | TargetsRanked):
            latest.update({t.target_id: t.p_diffract for t in record.targets})
        elif isinstance(record, TargetFinished) and record.outcome in ("recorded", "no-diffraction", "rejected"):
            visits.append((latest.get(record.target_id), record.outcome == "recorded"))
    return visits


def session_figures(folder: Path, *, specimen: str, seed: int, memory_sessions: int) -> SessionFigures:
    """The figures of the session in `folder` (its journal and summary.json)."""
    summary = json.loads((folder / "summary.json").read_text())
    visits = visits_with_probability(folder)
    called = [diffracted for p, diffracted in visits if p is not None and p >= CALL_THRESHOLD]
    return SessionFigures(
        folder=str(folder),
        specimen=specimen,
        seed=seed,
        memory_sessions=memory_sessions,
        visited=len(visits),
        diffracting=sum(1 for _, diffracted in visits if diffracted),
        diffracting_per_hour=summary.get("diffracting_per_hour"),
        precision=summary.get("precision"),
        precision_unique=summary.get("precision_unique"),
        recall=summary.get("recall"),
        calls=len(called),
        call_precision=sum(called) / len(called) if called else None,
        visits=visits,
    )


def reliability_bins(visits: Sequence[tuple[float | None, bool]], n_bins: int = 5) -> list[dict[str, float]]:
    """The reliability curve of the probabilities: for each of `n_bins` equal-width probability bins holding
    visits, the mean probability, the share that diffracted and the count."""
    rows = []
    for index in range(n_bins):
        low, high = index / n_bins, (index + 1) / n_bins
        inside = [(p, d) for p, d in visits if p is not None and (low <= p < high or (index == n_bins - 1 and p == 1))]
        if inside:
            rows.append(
                {
                    "bin_low": low,
                    "bin_high": high,
                    "mean_probability": round(sum(p for p, _ in inside) / len(inside), 3),
                    "diffracted_share": round(sum(1 for _, d in inside if d) / len(inside), 3),
                    "count": len(inside),
                }
            )
    return rows


def _reliability_svg(bins: Sequence[dict[str, float]], size_px: int = 260) -> str:
    """An SVG reliability diagram: mean probability (x) against diffracted share (y), the diagonal dashed."""
    pad = 30
    span = size_px - 2 * pad

    def xy(p: float, share: float) -> tuple[float, float]:
        return pad + p * span, pad + (1.0 - share) * span

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(b["mean_probability"], b["diffracted_share"]) for b in bins))
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2 + min(6, b["count"] ** 0.5):.1f}" fill="#1f6feb"/>'
        for b in bins
        for x, y in (xy(b["mean_probability"], b["diffracted_share"]),)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size_px}" height="{size_px}" font-size="11">'
        f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad + span}" x2="{pad + span}" y2="{pad}" stroke="#aaa" stroke-dasharray="4 3"/>'
        f'<polyline points="{points}" fill="none" stroke="#1f6feb"/>{dots}'
        f'<text x="{pad}" y="{size_px - 6}">predicted probability</text>'
        f'<text x="4" y="{pad - 10}">diffracted share</text></svg>'
    )


def learning_report_html(result: dict[str, object]) -> str:
    """A self-contained HTML page of a learning curve (`agent.commands.learning_curve`): the sessions' table
    and the reliability diagram."""
    from html import escape

    rows = result.get("rows", [])
    bins = result.get("reliability", [])
    columns = ("specimen", "seed", "memory_sessions", "visited", "diffracting", "hit_rate", "call_precision",
               "calls", "diffracting_per_hour", "precision", "precision_unique", "recall")
    head = "".join(f"<th>{escape(c)}</th>" for c in (*columns, "cold hit_rate", "cold diffracting_per_hour"))
    body = "".join(
        "<tr>"
        + "".join(f"<td>{escape(str(row.get(c, '')))}</td>" for c in columns)
        + f"<td>{escape(str(row['cold'].get('hit_rate')))}</td>"
        + f"<td>{escape(str(row['cold'].get('diffracting_per_hour')))}</td></tr>"
        for row in rows  # type: ignore[union-attr]
    )
    settings = escape(json.dumps(result.get("settings", {})))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>crystal classifier learning curve</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>"
        f"<h1>Crystal classifier: learning curve</h1><p>settings: <code>{settings}</code></p>"
        f"<table><tr>{head}</tr>{body}</table>"
        "<h2>Reliability of the probabilities (sessions with memory)</h2>"
        f"{_reliability_svg(bins) if bins else '<p>no visits with a probability yet</p>'}"  # type: ignore[arg-type]
        "</body></html>"
    )
