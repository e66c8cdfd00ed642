"""`crystal-locator simulate snapshot|specimen`: files written, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from drivers.formats.images import read_frame_tiff, read_image


def test_snapshot_writes_tiff_with_metadata_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap.tif"
    code = main(["simulate", "snapshot", "--specimen", "graphite-flakes", "--preset", "atlas", "--x-um", "100",
                 "--y-um", "-50", "--seed", "3", "--exposure-s", "0.4", "--camera-px", "256", "--out", str(out),
                 "--png"])
    assert code == 0
    frame = read_frame_tiff(out)
    assert frame.shape_px == (256, 256)
    assert frame.metadata.preset == "atlas" and frame.metadata.exposure_s == 0.4
    assert frame.metadata.stage.x_um == 100.0 and frame.metadata.stage.y_um == -50.0
    assert frame.metadata.extra["specimen"] == "graphite-flakes"
    preview = read_image(tmp_path / "snap.png").array
    assert preview.dtype == np.uint8 and preview.shape == (256, 256) and preview.max() > preview.min()
    assert "wrote" in capsys.readouterr().out
    # the same seed writes the same pixels
    again = tmp_path / "again.tif"
    main(["simulate", "snapshot", "--specimen", "graphite-flakes", "--x-um", "100", "--y-um", "-50", "--seed", "3",
          "--exposure-s", "0.4", "--camera-px", "256", "--out", str(again)])
    np.testing.assert_array_equal(read_frame_tiff(again).image, frame.image)


def test_snapshot_diffraction(tmp_path: Path) -> None:
    out = tmp_path / "diff.tif"
    assert main(["simulate", "snapshot", "--preset", "exposure", "--camera-px", "128", "--diffraction",
                 "--out", str(out)]) == 0
    assert read_frame_tiff(out).metadata.kind == "diffraction"


def test_specimen_writes_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "truth.json"
    assert main(["simulate", "specimen", "--specimen", "polymer-faint", "--seed", "2", "--out", str(out)]) == 0
    truth = json.loads(out.read_text())
    assert truth["specimen_type"] == "polymer-faint" and truth["seed"] == 2 and len(truth["crystals"]) > 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--specimen", "diamonds"], "unknown specimen type"),
        (["--preset", "ultra"], "unknown preset"),
        (["--x-um", "5000"], "outside the stage limits"),
        (["--exposure-s", "-1"], "--exposure-s"),
        (["--camera-px", "3"], "--camera-px"),
        (["--tiles", "/nonexistent/tiles"], ""),
    ],
)
def test_snapshot_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                   message: str) -> None:
    out = tmp_path / "x.tif"
    code = main(["simulate", "snapshot", "--camera-px", "64", *args, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("crystal-locator: error:") and message in err
    assert not out.exists()


def test_specimen_unknown_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "specimen", "--specimen", "nope", "--out", str(tmp_path / "t.json")]) == 2
    assert "unknown specimen type" in capsys.readouterr().err


def test_unwritable_output_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "a-folder.tif"
    folder.mkdir()  # the output path is a directory
    assert main(["simulate", "snapshot", "--camera-px", "32", "--out", str(folder)]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["simulate", "specimen", "--out", str(folder)]) == 2
    assert "cannot write" in capsys.readouterr().err
