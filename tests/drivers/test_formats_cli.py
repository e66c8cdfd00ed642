"""`crystal-locator nav ...` and `crystal-locator montage ...` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from agent.cli import main
from drivers.formats.mdoc import montage_metadata, write_mdoc
from drivers.formats.nav import point_item, read_nav, write_nav


@pytest.fixture
def serialem_montage(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    corners = [(r * 90, c * 110) for r in range(2) for c in range(3)]
    with mrcfile.new(tmp_path / "atlas.mrc") as mrc:
        mrc.set_data(rng.integers(0, 4000, (6, 100, 120), dtype=np.uint16))
    stage = [(-100.0 + c * 25.0, 50.0 - r * 20.0) for r, c in corners]
    write_mdoc(tmp_path / "atlas.mrc.mdoc", montage_metadata(corners, (100, 120), 0.2312, stage, "atlas.mrc"))
    return tmp_path / "atlas.mrc.mdoc"


def test_montage_show_text_and_json(serialem_montage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["montage", "show", str(serialem_montage)]) == 0
    text = capsys.readouterr().out
    assert "6 of 120 x 100 px" in text
    assert "231.200 nm/px" in text
    assert "overlap      10 px between columns, 10 px between rows" in text
    assert "stage fit    " in text and "rotation" in text
    assert main(["montage", "show", str(serialem_montage.with_suffix("")), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pieces"] == 6
    assert summary["mosaic_shape_px"] == [190, 340]
    # fixture: stage x = -100 + 25 * corner col px, y = 50 - 20 * corner row px
    np.testing.assert_allclose(summary["stage_fit"]["matrix_um_per_px"], [[25, 0], [0, -20]], atol=1e-9)
    assert summary["stage_fit"]["flipped"] is True
    assert summary["stage_extent_um"] == {"x_min": -100.0, "x_max": -100.0 + 220 * 25.0, "y_min": 50.0 - 90 * 20.0,
                                          "y_max": 50.0}


def test_montage_show_tile_folder_and_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for r in range(2):
        for c in range(2):
            tifffile.imwrite(tmp_path / f"Tile_{r + 1:03d}-{c + 1:03d}.tif", np.full((40, 50), 60 * (r + c), np.uint8))
    assert main(["montage", "show", str(tmp_path), "--pixel-size-um", "0.5"]) == 0
    assert "mosaic       100 x 80 px" in capsys.readouterr().out
    out = tmp_path / "preview" / "p.png"
    assert main(["montage", "preview", str(tmp_path), "--out", str(out), "--max-px", "50"]) == 0
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (50, 40)


@pytest.mark.parametrize(
    "content", ["not an mdoc at all\n", "PixelSpacing = 10\n\n[ZValue = 0]\nPieceCoordinates = x\n"]
)
def test_montage_show_malformed_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    bad = tmp_path / "bad.mrc.mdoc"
    bad.write_text(content)
    assert main(["montage", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crystal-locator: error:") and "bad.mrc.mdoc" in err
    assert "Traceback" not in err
    assert main(["montage", "show", str(tmp_path / "missing")]) == 2


def test_nav_show_lists_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_nav(tmp_path / "t.nav", [point_item("1", 12.5, -3.25, note="crystal one"), point_item("B-2", 0, 1)])
    assert main(["nav", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "crystal one" in out and "B-2" in out and "12.50" in out and "2 points" in out
    assert main(["nav", "show", str(path), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["x_um"] == 12.5 and rows[0]["acquire"] is True and rows[1]["label"] == "B-2"


def test_nav_show_malformed_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.nav"
    bad.write_text("AdocVersion = 2.00\n[Item = 1]\nType = 0\nStageXYZ = 1 2 zz\n")
    assert main(["nav", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.nav" in err and "StageXYZ" in err and "Traceback" not in err


def test_nav_from_targets_csv_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "candidates.csv"
    csv_path.write_text("row_px,col_px,score,x_um,y_um\n10,20,0.9,5.5,-7.25\n30,40,0.4,6,-8\n")
    out = tmp_path / "targets.nav"
    assert main(["nav", "from-targets", str(csv_path), "--out", str(out), "--map-id", "42", "--label-prefix", "c"]) == 0
    items = read_nav(out)
    assert [(i.label, i.stage_xyz_um[:2], i.drawn_id, i.acquire) for i in items] == [
        ("c1", (5.5, -7.25), 42, True),
        ("c2", (6.0, -8.0), 42, True),
    ]
    json_path = tmp_path / "candidates.json"
    json_path.write_text(json.dumps({"candidates": [{"x_um": 1.0, "y_um": 2.0, "score": 0.5}]}))
    assert main(["nav", "from-targets", str(json_path), "--out", str(out), "--no-acquire", "--force"]) == 0
    assert read_nav(out)[0].acquire is False
    json_path.write_text(json.dumps([{"row_px": 1, "col_px": 2}]))
    assert main(["nav", "from-targets", str(json_path), "--out", str(tmp_path / "x.nav")]) == 2
    assert "stage coordinates" in capsys.readouterr().err
    assert not (tmp_path / "x.nav").exists()


def test_montage_show_without_its_stack_shows_the_metadata(serialem_montage: Path) -> None:
    import subprocess
    import sys

    serialem_montage.with_suffix("").unlink()  # the .mrc stack is gone, the .mdoc stays
    command = [sys.executable, "-m", "agent.cli", "montage", "show", str(serialem_montage)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "metadata only: its image stack atlas.mrc is missing" in result.stdout
    assert "pieces       6 of 120 x 100 px" in result.stdout and "231.200 nm/px" in result.stdout
    assert "x -100.00 .. 5400.00 um" in result.stdout
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    summary = json.loads(as_json.stdout)
    assert summary["stack_missing"] is True and summary["pieces"] == 6
    preview = subprocess.run([sys.executable, "-m", "agent.cli", "montage", "preview", str(serialem_montage),
                              "--out", str(serialem_montage.parent / "p.png")], capture_output=True, text=True,
                             timeout=120)
    assert preview.returncode == 2 and "is missing" in preview.stderr  # a picture needs the pixels
