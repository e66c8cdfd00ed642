"""`nav from-targets --out` refuses to replace an existing navigator unless `--force` (issue 22)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_from_targets_refuses_existing_nav_unless_force(tmp_path: Path) -> None:
    targets = tmp_path / "targets.csv"
    targets.write_text("x_um,y_um\n5.5,-7.25\n6,-8\n")
    out = tmp_path / "existing.nav"
    out.write_text("AdocVersion = 2.00\n# the user's own navigator\n")
    before = out.read_bytes()

    refused = _run("nav", "from-targets", str(targets), "--out", str(out), cwd=tmp_path)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("crystal-locator: error:") and "existing.nav" in lines[0] and "--force" in lines[0]
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.nav", "targets.csv"]

    forced = _run("nav", "from-targets", str(targets), "--out", str(out), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "wrote 2 points" in forced.stdout
    assert out.read_bytes() != before and b"StageXYZ" in out.read_bytes()


def test_from_targets_new_file_needs_no_force_and_help_names_force(tmp_path: Path) -> None:
    targets = tmp_path / "targets.json"
    targets.write_text('[{"x_um": 1.0, "y_um": 2.0}]')
    out = tmp_path / "new.nav"
    done = _run("nav", "from-targets", str(targets), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    helped = _run("nav", "from-targets", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--force" in helped.stdout
