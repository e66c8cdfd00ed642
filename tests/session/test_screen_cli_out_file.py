"""`screen --out FILE` where FILE is an existing file (or lies below one) is one line, exit code 2, before
any work; the file is left as it was (issue 22)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCREEN = [sys.executable, "-m", "agent.cli", "screen", "--simulated", "--camera-px", "64", "--no-labels"]


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crystal-locator: error:") and "Traceback" not in result.stderr
    return lines[0]


def test_out_an_existing_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "session.txt"
    out.write_text("keep me")
    result = subprocess.run([*_SCREEN, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert _one_error_line(result) == f"crystal-locator: error: --out {out}: is a file, not a session folder"
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.txt"]


def test_out_below_an_existing_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker / "session"
    result = subprocess.run([*_SCREEN, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert f"--out {out}: {blocker} is a file, not a session folder" in _one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
