"""`crystal-locator report` on a folder that holds no session (no journal, no summary) is refused: one line
naming the folder, exit code 2, no report written (issue 22)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "agent.cli", "report", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_on_an_empty_folder_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "empty-session"
    folder.mkdir()
    result = _report(str(folder))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crystal-locator: error:") and str(folder) in lines[0]
    assert "not a session folder" in lines[0]
    assert list(folder.iterdir()) == []


def test_report_with_out_on_an_empty_folder_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a session")
    out = tmp_path / "r.html"
    result = _report(str(folder), "--out", str(out))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and str(folder) in result.stderr
    assert not out.exists()
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_report_on_a_crashed_session_with_only_a_journal_still_works(tmp_path: Path) -> None:
    folder = tmp_path / "crashed"
    folder.mkdir()
    (folder / "journal.jsonl").write_text('{"seq": 1, "type": "transition", "state": "calibrating"}\n')
    result = _report(str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "report.html").is_file()
