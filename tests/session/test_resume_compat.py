"""A session folder written by release 0.1.0 (before the runner/steps redesign) still resumes.

`tests/session/fixtures/session_v0_1_0/` is what a `kill -9` left of a 0.1.0 session right after its second target
(see `tests/session/fixtures/README.md`). Resumed by today's code through the command line, it must read every old
journal line as a typed record, continue at the third target, never visit the first two again, keep
every file written before the kill, and end with the uninterrupted run's targets and counts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from agent.session.journal import read_journal, read_records
from agent.session.records import SessionStarted, TargetFinished

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = FIXTURES / "session_v0_1_0"


def test_a_journal_of_release_0_1_0_reads_as_typed_records() -> None:
    records = read_records(FIXTURE / "journal.jsonl")
    assert len(records) == len(read_journal(FIXTURE / "journal.jsonl")) == 39
    assert [r.target_id for r in records if isinstance(r, TargetFinished)] == ["T001", "T002"]


def test_a_session_of_release_0_1_0_resumes_to_the_same_targets_and_counts(tmp_path: Path) -> None:
    folder = tmp_path / "session_v0_1_0"
    shutil.copytree(FIXTURE, folder)
    written_before = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    resumed = subprocess.run(
        [sys.executable, "-m", "agent.cli", "screen", "--resume", str(folder), "--labels", str(tmp_path / "labels")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr

    records = read_records(folder / "journal.jsonl")
    resume = [r for r in records if isinstance(r, SessionStarted) and r.event == "resume"]
    assert len(resume) == 1 and resume[0].state == "moving" and resume[0].finished_targets == ["T001", "T002"]
    visits = [r.target_id for r in records if isinstance(r, TargetFinished)]
    assert visits == ["T001", "T002", "T003", "T004"]  # the first two are not visited again
    assert all((folder / path).exists() for path in written_before)

    full = json.loads((FIXTURES / "session_v0_1_0.full_summary.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("state", "targets_found", "targets_visited", "targets_confirmed", "targets_recorded", "faults"):
        assert summary[key] == full[key], key
    for key in ("precision", "recall", "recall_diffracting"):
        assert summary[key] == full[key], key
    cut_rows = json.loads((FIXTURE / "targets.json").read_text())["targets"]
    rows = json.loads((folder / "targets.json").read_text())["targets"]
    assert [(r["target_id"], r["planned_x_um"], r["planned_y_um"]) for r in rows] == [
        (r["target_id"], r["planned_x_um"], r["planned_y_um"]) for r in cut_rows
    ]
    assert [r["outcome"] for r in rows[:2]] == [r["outcome"] for r in cut_rows[:2]]
