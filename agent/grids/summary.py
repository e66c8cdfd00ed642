"""A multi-grid run's numbers and its overview page: `run_summary.json` and `index.html` in the run folder.

Throughput counts what a user counts (as a session's summary does): diffracting crystals per hour of the run's
microscope time, grid exchanges, atlas passes and screening included. A screened grid counts its screening
session's diffracting crystals only: that session maps the same squares first and finds the atlas pass's probed
crystals again (the grid was reloaded in between: new positions of the same crystals). A grid that was not
screened counts its atlas pass's diffracting probes (their stage positions hold for that load only). Beside the
rate, the same per hour without the grid exchanges (`diffracting_per_hour_without_exchange`): the figure to
compare with single-grid sessions, which pay no exchange.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.grids.records import (
    GridAssessed,
    GridLoaded,
    GridScreening,
    GridSkipped,
    GridsRanked,
    RunFinished,
    RunStarted,
    spent_s,
)
from agent.report import html_page, html_table, image_file_png, png_data_uri
from drivers.formats.images import write_atomic

RUN_SUMMARY_NAME = "run_summary.json"
OVERVIEW_NAME = "index.html"

_FROZEN = ConfigDict(frozen=True)

GridStatus = Literal["skipped", "assessed", "screening", "screened"]


class GridRow(BaseModel):
    """One cassette slot in the run: what happened to it and what it gave."""

    model_config = _FROZEN

    slot: int
    label: str = ""
    status: GridStatus
    reason: str = Field(default="", description="why it was skipped")
    rank: int | None = Field(default=None, description="1 = the grid most worth screening; None: not ranked")
    score: float | None = None
    thick_ice: bool = False
    assessment: dict[str, Any] = Field(default_factory=dict)
    load_s: float = Field(default=0.0, description="microscope seconds of grid exchange for this grid, all loads")
    atlas_folder: str | None = None
    screen_folder: str | None = None
    screen_budget_s: float | None = None
    diffracting_crystals: int = Field(
        default=0, description="found on this grid: by its screening session, else by its atlas pass's probes"
    )
    targets_visited: int = Field(default=0, description="by its screening session")
    screen_time_s: float = 0.0
    diffracting_per_hour: float | None = Field(default=None, description="of its screening session alone")


class RunSummary(BaseModel):
    """A multi-grid run: per-grid rows (slot order) and totals."""

    model_config = _FROZEN

    state: str
    reason: str = ""
    ranking_rule: str = ""
    grids: list[GridRow]
    run_time_s: float = Field(description="microscope seconds of the whole run (exchanges, atlas passes, screening)")
    exchange_time_s: float
    atlas_pass_time_s: float
    screening_time_s: float
    diffracting_crystals: int
    diffracting_per_hour: float | None = None
    diffracting_per_hour_without_exchange: float | None = None
    grids_assessed: int = 0
    grids_screened: int = 0
    wall_time_s: float = 0.0


def _per_hour(count: int, seconds: float) -> float | None:
    return round(count * 3600.0 / seconds, 3) if seconds > 0 else None


def _rows(records: Sequence[Any]) -> list[GridRow]:
    ranking = next((r for r in reversed(records) if isinstance(r, GridsRanked)), None)
    slots = sorted({r.slot for r in records if hasattr(r, "slot")})
    rows = []
    for slot in slots:
        mine = [r for r in records if getattr(r, "slot", None) == slot]
        assessed = next((r for r in mine if isinstance(r, GridAssessed)), None)
        skipped = next((r for r in mine if isinstance(r, GridSkipped)), None)
        started = next((r for r in mine if isinstance(r, GridScreening) and r.event == "start"), None)
        done = next((r for r in mine if isinstance(r, GridScreening) and r.event == "done"), None)
        summary = (done.summary or {}) if done is not None else {}
        status: GridStatus = "screened" if done else "screening" if started else "assessed" if assessed else "skipped"
        rank = ranking.order.index(slot) + 1 if ranking is not None and slot in ranking.order else None
        assessment = dict(assessed.assessment) if assessed is not None else {}
        screen_s = float(summary.get("microscope_time_s") or 0.0)
        screened = int(summary.get("diffracting_crystals") or 0)
        diffracting = screened if done is not None else int(assessment.get("probe_diffracting") or 0)
        rows.append(
            GridRow(
                slot=slot,
                label=str(assessment.get("label") or (skipped.label if skipped is not None else "")),
                status=status,
                reason=skipped.reason if skipped is not None and status == "skipped" else done.reason if done else "",
                rank=rank,
                score=ranking.scores.get(str(slot)) if ranking is not None else None,
                thick_ice=bool(ranking is not None and slot in ranking.thick_ice),
                assessment=assessment,
                load_s=round(sum(r.load_s for r in mine if isinstance(r, (GridLoaded, GridSkipped))), 3),
                atlas_folder=assessed.folder if assessed is not None else None,
                screen_folder=started.folder if started is not None else None,
                screen_budget_s=started.budget_s if started is not None else None,
                diffracting_crystals=diffracting,
                targets_visited=int(summary.get("targets_visited") or 0),
                screen_time_s=round(screen_s, 3),
                diffracting_per_hour=_per_hour(screened, screen_s),
            )
        )
    return rows


def _wall_time_s(records: Sequence[Any]) -> float:
    """Real seconds the run ran, over its parts: each part from its `run` record to its last record (a part cut
    by a kill -9 counts up to the last line it wrote)."""
    total = 0.0
    start = last = None
    for record in [*records, None]:
        if record is None or isinstance(record, RunStarted):
            if start is not None and last is not None:
                total += max(0.0, (last - start).total_seconds())
            start = last = _utc(record) if record is not None else None
        else:
            last = _utc(record) or last
    return total


def _utc(record: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(record.time_utc) if record.time_utc else None
    except ValueError:
        return None


def summarise_run(run_dir: Path, records: Sequence[Any], rule: str) -> RunSummary:
    """The run's summary from its journal records (`run_dir` is where its grid folders are)."""
    rows = _rows(records)
    finished = next((r for r in reversed(records) if isinstance(r, RunFinished)), None)
    run_s = spent_s(list(records))
    exchange_s = sum(r.load_s for r in records if isinstance(r, (GridLoaded, GridSkipped)))
    atlas_s = sum(float(r.assessment.get("atlas_pass_s") or 0.0) for r in records if isinstance(r, GridAssessed))
    screen_s = sum(row.screen_time_s for row in rows)
    diffracting = sum(row.diffracting_crystals for row in rows)
    return RunSummary(
        state=finished.state if finished is not None else "running",
        reason=finished.reason if finished is not None else "",
        ranking_rule=rule,
        grids=rows,
        run_time_s=round(run_s, 3),
        exchange_time_s=round(exchange_s, 3),
        atlas_pass_time_s=round(atlas_s, 3),
        screening_time_s=round(screen_s, 3),
        diffracting_crystals=diffracting,
        diffracting_per_hour=_per_hour(diffracting, run_s),
        diffracting_per_hour_without_exchange=_per_hour(diffracting, run_s - exchange_s),
        grids_assessed=sum(1 for r in records if isinstance(r, GridAssessed)),
        grids_screened=sum(1 for row in rows if row.status == "screened"),
        wall_time_s=round(_wall_time_s(records), 3),
    )


def write_run_outputs(run_dir: Path, summary: RunSummary) -> Path:
    """`run_summary.json` and the overview page `index.html` (linking the grid sessions' reports, which each
    session's end wrote); returns the page's path."""
    write_atomic(run_dir / RUN_SUMMARY_NAME, json.dumps(summary.model_dump(mode="json"), indent=2).encode())
    page = run_dir / OVERVIEW_NAME
    write_atomic(page, overview_html(run_dir, summary).encode())
    return page


def _link(run_dir: Path, folder: str | None, text: str) -> str:
    if not folder:
        return "-"
    target = f"{folder}/report.html"
    if not (run_dir / target).exists():
        return html.escape(folder)
    return f'<a href="{html.escape(target, quote=True)}">{html.escape(text)}</a>'


def _grid_table(run_dir: Path, summary: RunSummary) -> str:
    head = ("slot", "grid", "status", "rank", "score /h", "typical squares", "targets", "probes", "hit rate",
            "film counts/s", "thick ice", "diffracting", "screening /h", "atlas pass", "screening", "note")
    rows = []
    for row in sorted(summary.grids, key=lambda r: (r.rank is None, r.rank or 0, r.slot)):
        a = row.assessment
        probes = f"{a.get('probe_diffracting')}/{a.get('probed')}" if a else None
        cells = [row.slot, row.label or "-", row.status, row.rank, row.score, a.get("typical_squares"),
                 a.get("targets"), probes, a.get("hit_rate"), a.get("film_level_per_s"), row.thick_ice,
                 row.diffracting_crystals, row.diffracting_per_hour]
        text = "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>" for v in cells)
        text += f"<td>{_link(run_dir, row.atlas_folder, 'report')}</td>"
        text += f"<td>{_link(run_dir, row.screen_folder, 'report')}</td>"
        text += f'<td class="t">{html.escape(row.reason)}</td>'
        rows.append(f'<tr class="{"ok" if row.status == "screened" else "fail" if row.status == "skipped" else ""}">'
                    f"{text}</tr>")
    header = "".join(f'<th class="t">{html.escape(h)}</th>' for h in head)
    return f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def overview_html(run_dir: Path, summary: RunSummary) -> str:
    """The run's overview page: totals, the grids in rank order with links to their reports, how they were
    ranked, and each assessed grid's atlas heat map."""
    totals = html_table(
        ("state", "run time s", "grid exchange s", "atlas passes s", "screening s", "diffracting", "per hour",
         "per hour without exchange", "grids assessed", "grids screened"),
        [(summary.state, summary.run_time_s, summary.exchange_time_s, summary.atlas_pass_time_s,
          summary.screening_time_s, summary.diffracting_crystals, summary.diffracting_per_hour,
          summary.diffracting_per_hour_without_exchange, summary.grids_assessed, summary.grids_screened)],
    )
    figures = []
    for row in summary.grids:
        if row.atlas_folder:
            png = image_file_png(run_dir / row.atlas_folder / "atlas" / "heatmap.png", max_side_px=360)
            if png is not None:
                figures.append(f'<figure><img src="{png_data_uri(png)}" alt="slot {row.slot} atlas" width="320">'
                               f"<figcaption>slot {row.slot} {html.escape(row.label)}</figcaption></figure>")
    sections = [
        f"<h2>Totals</h2>{totals}"
        + (f'<p class="note">{html.escape(summary.reason)}</p>' if summary.reason else ""),
        f"<h2>Grids, best first</h2>{_grid_table(run_dir, summary)}"
        f'<p class="muted">How grids are ranked: {html.escape(summary.ranking_rule)}</p>',
        "<h2>Atlas passes</h2>" + ("".join(figures) or '<p class="muted">no atlas yet</p>'),
    ]
    return html_page(f"Multi-grid run {run_dir.resolve().name}", sections)
