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
        ("--squares-per-round", "0", "--squares-per-round 0: Input should be greater than or equal to 1"),
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


def test_a_budget_too_small_for_one_target_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "session"
    command = [sys.executable, "-m", "agent.cli", "screen", "--simulated", "--camera-px", "64", "--no-labels"]
    result = subprocess.run([*command, "--time-budget-s", "1", "--out", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("crystal-locator: error: time_budget_s 1 s is less than the exposures")
    assert "no target could be reached" in result.stderr and not out.exists()


@pytest.mark.parametrize("option", ["--plan", "--calibration"])
def test_a_binary_file_as_plan_or_calibration_is_one_line(option: str, tmp_path: Path) -> None:
    binary = tmp_path / ("plan.toml" if option == "--plan" else "calibration.json")
    binary.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "session"
    command = [sys.executable, "-m", "agent.cli", "screen", "--simulated", "--camera-px", "64", "--no-labels"]
    result = subprocess.run([*command, option, str(binary), "--out", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(binary) in result.stderr
    assert not out.exists()
