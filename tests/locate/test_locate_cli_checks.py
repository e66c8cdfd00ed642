"""`crystal-locator locate` checks its --reference pixels and its --out folder before the analysis runs: one
line, exit code 2, nothing written (issue 22)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _locate(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "agent.cli", "locate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crystal-locator: error:")
    return lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.npy"
    np.save(path, np.random.default_rng(0).normal(100.0, 10.0, (96, 128)).astype(np.float32))
    return path


@pytest.mark.parametrize("reference", ["99999,5", "5,128", "-1,5", "nan,5"])
def test_a_reference_outside_the_image_is_refused(image: Path, tmp_path: Path, reference: str) -> None:
    out = tmp_path / "out"
    line = _one_error_line(_locate(str(image), "--grid", "8x8", f"--reference={reference}", "--out", str(out)))
    assert f"--reference {reference}: outside the image (96 rows x 128 columns" in line
    assert not out.exists()


def test_a_reference_inside_the_image_still_runs(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _locate(str(image), "--grid", "8x8", "--reference", "95,127", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "similarity.png").is_file()


def test_out_an_existing_file_is_refused_before_the_analysis(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    line = _one_error_line(_locate(str(image), "--grid", "8x8", "--out", str(out)))
    assert f"--out {out}: is a file, not a folder" in line
    assert out.read_text() == "keep me"
    # checked first: even an image that does not exist is not looked at
    line = _one_error_line(_locate(str(tmp_path / "missing.tif"), "--out", str(out)))
    assert "is a file, not a folder" in line


def test_out_below_an_existing_file_is_refused(image: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    line = _one_error_line(_locate(str(image), "--grid", "8x8", "--out", str(blocker / "sub")))
    assert f"{blocker} is a file, not a folder" in line


@pytest.fixture
def atlas_frame(tmp_path: Path) -> Path:
    """A simulated atlas frame whose TIFF metadata names its preset and stage position."""
    from drivers.formats.images import write_frame_tiff
    from simulator import create_simulated_microscope

    scope = create_simulated_microscope("protein-plates", 0, camera_shape_px=(128, 128))
    scope.set_preset("atlas")
    return write_frame_tiff(tmp_path / "atlas.tif", scope.acquire(0.5))


def test_a_calibration_without_the_images_preset_is_refused_unless_allowed(atlas_frame: Path, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.json"
    calibration.write_text('{"presets": {"search": {"matrix_um_per_px": [[0.04, 0], [0, 0.04]]}}}')
    out = tmp_path / "out"
    line = _one_error_line(_locate(str(atlas_frame), "--grid", "8x8", "--calibration", str(calibration),
                                   "--out", str(out)))
    assert "no preset 'atlas'" in line and "it has: search" in line and "--allow-uncalibrated" in line
    assert not out.exists()
    allowed = _locate(str(atlas_frame), "--grid", "8x8", "--calibration", str(calibration), "--allow-uncalibrated",
                      "--out", str(out))
    assert allowed.returncode == 0, allowed.stderr


def test_a_binary_file_as_calibration_gets_one_line(atlas_frame: Path, tmp_path: Path) -> None:
    binary = tmp_path / "calibration.json"
    binary.write_bytes(bytes(range(256)) * 8)
    line = _one_error_line(_locate(str(atlas_frame), "--grid", "8x8", "--calibration", str(binary),
                                   "--out", str(tmp_path / "out")))
    assert "cannot read calibration JSON" in line


def test_a_corrupt_tiff_gets_one_line_that_says_what_tifffile_saw(tmp_path: Path) -> None:
    """tifffile logs a warning before it gives up; that warning used to be printed as a line of its own above the
    error. It is folded into the one error line."""
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    line = _one_error_line(_locate(str(bad), "--out", str(tmp_path / "out")))
    assert "bad.tif: TIFF has no pages (tifffile: " in line and "invalid offset" in line
    assert not (tmp_path / "out").exists()
