"""Out-of-range numbers on the `screen` command line get one line naming the option, exit code 2, and no
session folder (as the same values in a plan file do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--squares", "-2", "--squares -2: Input should be greater than or equal to 1"),
        ("--squares", "0", "--squares 0: Input should be greater than or equal to 1"),
        ("--max-targets", "-1", "--max-targets -1: Input should be greater than or equal to 1"),
        ("--time-budget-s", "-5", "--time-budget-s -5.0: Input should be greater than 0"),
    ],
)
def test_an_out_of_range_option_is_one_line_and_creates_nothing(
    option: str, value: str, message: str, tmp_path: Path
) -> None:
    out = tmp_path / "session"
    command = [sys.executable, "-m", "agent.cli", "screen", "--simulated", "--camera-px", "64", "--no-labels"]
    result = subprocess.run([*command, option, value, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"crystal-locator: error: {message}"
    assert not out.exists()
