"""What a person reads while a session runs and after: the progress lines, the summary's limits and wall time."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.session.outcomes import TargetRecord, TargetResult
from agent.session.progress import TerminalProgress, summary_table
from agent.session.records import SessionStarted, Transition
from agent.session.restore import earlier_wall_s
from agent.session.summary import _limited_by


def test_progress_lines_name_the_clock_the_target_count_and_the_budget_left(capsys: pytest.CaptureFixture) -> None:
    progress = TerminalProgress(Console(file=io.StringIO(), force_terminal=False), budget_s=3600.0)
    progress.on_event("state", {"state": "mapping", "microscope_time_s": 40.0})
    progress.on_event("atlas", {"targets": 7})
    progress.on_event("target", {"target_id": "T001", "outcome": "recorded"})
    progress.on_event("progress", {"targets_found": 7, "targets_visited": 1, "microscope_time_s": 100.0})
    progress.on_event("atlas", {"targets": 5})  # a second round
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[microscope     40.0 s] mapping"
    assert err[1] == "  T001 (1 of 7 planned): recorded  [microscope 100 s, 3500 s of the budget left]"
    assert progress._found == 12


def _target(n: int) -> TargetRecord:
    return TargetRecord(target_id=f"T{n:03d}", order=n, x_um=float(n), y_um=0.0, atlas_col_px=0.0, atlas_row_px=0.0,
                        area_px=1.0, score=1.0, cluster_id=0)


def _result(n: int) -> TargetResult:
    return TargetResult(target_id=f"T{n:03d}", outcome="recorded", x_um=float(n), y_um=0.0, microscope_time_s=1.0)


def test_the_summary_says_what_ended_a_session() -> None:
    targets = [_target(n) for n in range(1, 4)]
    budget = ScreeningPlan(time_budget_s=100.0)
    assert _limited_by("done", budget, targets, {"T001": _result(1)}, 101.0) == (
        "time budget: 2 planned targets not visited"
    )
    assert _limited_by("done", budget, targets, {f"T00{n}": _result(n) for n in range(1, 4)}, 99.0).startswith(
        "time budget: no budget left"
    )
    capped = ScreeningPlan(time_budget_s=None, area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=3))
    assert _limited_by("done", capped, targets, {f"T00{n}": _result(n) for n in range(1, 4)}, 10.0).startswith(
        "max_targets"
    )
    assert _limited_by("done", ScreeningPlan(time_budget_s=None), targets, {}, 5.0) is None
    assert _limited_by("moving", budget, targets, {}, 500.0) is None
    table = summary_table({"session": "s", "state": "done", "limited_by": "max_targets: the cap of 3 targets"})
    rendered = io.StringIO()
    Console(file=rendered, width=200).print(table)
    assert "ended by" in rendered.getvalue() and "the cap of 3 targets" in rendered.getvalue()


def test_wall_time_adds_every_part_of_a_resumed_session_but_not_the_gaps() -> None:
    records = [
        SessionStarted(event="start", session="s", time_utc="2026-12-07T10:00:00+00:00"),
        Transition(state="mapping", time_utc="2026-12-07T10:00:30+00:00"),  # killed after 30 s
        SessionStarted(event="resume", session="s", time_utc="2026-12-07T11:00:00+00:00"),  # an hour later
        Transition(state="moving", time_utc="2026-12-07T11:00:20+00:00"),  # killed again after 20 s
        SessionStarted(event="resume", session="s", time_utc="2026-12-07T12:00:00+00:00"),
    ]
    assert earlier_wall_s(records) == pytest.approx(50.0)
    assert earlier_wall_s([]) == 0.0


def test_without_a_budget_the_time_left_is_estimated_from_the_time_per_target(capsys: pytest.CaptureFixture) -> None:
    progress = TerminalProgress(Console(file=io.StringIO(), force_terminal=False), budget_s=None)
    progress.on_event("atlas", {"targets": 10})
    progress.on_event("target", {"target_id": "T002", "outcome": "rejected", "reason": "ice"})
    progress.on_event("progress", {"targets_found": 10, "targets_visited": 2, "microscope_time_s": 80.0,
                                   "per_target_time_s": 7.5})
    assert capsys.readouterr().err.strip() == (
        "T002 (1 of 10 planned): rejected ice  [microscope 80 s, about 60 s more for the planned targets]"
    )


def test_a_rounds_planned_targets_reach_targets_csv_with_its_record(tmp_path: Path) -> None:
    """The `targets` record is journalled before the session adds the round's targets to its list; the table
    writer writes them at once (a crash before the first outcome still leaves them in targets.csv)."""
    from types import SimpleNamespace

    from agent.config import ScreeningPlan
    from agent.session.records import TargetsPlanned
    from agent.session.writers import TableWriter

    context = SimpleNamespace(targets=[_target(1)], results={}, calibration=None, atlas=None, plan=ScreeningPlan())
    TableWriter(tmp_path, context)(TargetsPlanned(targets=[_target(2), _target(3)], round=2))
    rows = (tmp_path / "targets.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["T001", "T002", "T003"]
