"""`crystal-locator locate`: outputs, stage coordinates, montages and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from agent.cli import main
from drivers.base import Frame, FrameMetadata, StagePosition
from drivers.formats.images import write_frame_tiff
from drivers.geometry import pixel_to_stage_um
from tests.synthetic_images import make_grid_image


@pytest.fixture(scope="module")
def scene():
    return make_grid_image((384, 384), 31, n_crystals=6)


def _frame_tiff(path: Path, image: np.ndarray) -> Path:
    metadata = FrameMetadata(
        preset="atlas",
        magnification=47.0,
        pixel_size_um=0.3,
        stage=StagePosition(x_um=120.0, y_um=-40.0),
        exposure_s=0.5,
        time_s=1.0,
    )
    return write_frame_tiff(path, Frame(image=image, metadata=metadata))


def test_locate_writes_every_output_with_stage_positions(tmp_path: Path, scene, capsys) -> None:
    tiff = _frame_tiff(tmp_path / "atlas.tif", scene.image)
    calibration = tmp_path / "calibration.json"
    matrix = [[0.29, 0.03], [-0.03, 0.29]]
    calibration.write_text(json.dumps({"presets": {"atlas": {"matrix_um_per_px": matrix}}}))
    out = tmp_path / "out"
    code = main(
        ["locate", str(tiff), "--window", "15", "--stride", "4", "--calibration", str(calibration), "--out", str(out)]
    )
    assert code == 0
    for name in ("heatmap.png", "gallery.png", "bar_mask.png", "clusters.json", "candidates.json", "candidates.csv"):
        assert (out / name).is_file(), name
    heat = np.asarray(Image.open(out / "heatmap.png").convert("RGB"))
    assert heat.shape == (384, 384, 3)
    mask = np.asarray(Image.open(out / "bar_mask.png"))
    assert set(np.unique(mask)) <= {0, 255} and (mask == 255).mean() > 0.2
    clusters = json.loads((out / "clusters.json").read_text())
    assert clusters["chosen_by"].startswith("default rule")
    assert len(clusters["clusters"]) == 5 and {"n_cells", "mean_features"} <= set(clusters["clusters"][0])
    payload = json.loads((out / "candidates.json").read_text())
    assert payload["matrix_source"] == "calibration" and payload["candidates"]
    first = payload["candidates"][0]
    expected = pixel_to_stage_um(
        np.array([first["col_px"], first["row_px"]]), (384, 384), (120.0, -40.0), np.array(matrix)
    )
    assert first["x_um"] == pytest.approx(expected[0]) and first["y_um"] == pytest.approx(expected[1])
    rows = list(csv.DictReader((out / "candidates.csv").open()))
    assert len(rows) == len(payload["candidates"]) and float(rows[0]["x_um"]) == pytest.approx(expected[0])
    assert "candidates" in capsys.readouterr().out


def test_uncalibrated_frames_warn_and_plain_images_have_no_stage(tmp_path: Path, scene, capsys) -> None:
    tiff = _frame_tiff(tmp_path / "atlas.tif", scene.image)
    assert main(["locate", str(tiff), "--grid", "24x24", "--out", str(tmp_path / "a")]) == 0
    assert "uncalibrated" in capsys.readouterr().out
    payload = json.loads((tmp_path / "a" / "candidates.json").read_text())
    assert payload["matrix_source"] == "uncalibrated"
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, scene.image)
    assert (
        main(
            [
                "locate",
                str(plain),
                "--grid",
                "24x24",
                "--k",
                "4",
                "--crystal-cluster",
                "1",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    payload = json.loads((tmp_path / "b" / "candidates.json").read_text())
    assert all(c["x_um"] is None for c in payload["candidates"])
    assert all(c["cluster_id"] == 1 for c in payload["candidates"])
    assert json.loads((tmp_path / "b" / "clusters.json").read_text())["chosen_by"] == "--crystal-cluster"


def test_reference_patch_ranks_by_similarity(tmp_path: Path, scene) -> None:
    npy = tmp_path / "image.npy"
    np.save(npy, scene.image)
    crystal = scene.crystals[0]
    ref = f"{crystal.row_px:.0f},{crystal.col_px:.0f}"
    assert (
        main(["locate", str(npy), "--window", "15", "--stride", "4", "--reference", ref, "--out", str(tmp_path / "o")])
        == 0
    )
    assert (tmp_path / "o" / "similarity.png").is_file()
    payload = json.loads((tmp_path / "o" / "candidates.json").read_text())
    best = payload["candidates"][0]
    assert any(np.hypot(best["row_px"] - c.row_px, best["col_px"] - c.col_px) < 20 for c in scene.crystals)


def test_montage_folder_is_read_as_one_image(tmp_path: Path, scene) -> None:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for r in range(2):
        for c in range(2):
            tifffile.imwrite(
                tiles / f"Tile_{r + 1:03d}-{c + 1:03d}.tif",
                scene.image[r * 192 : (r + 1) * 192, c * 192 : (c + 1) * 192],
            )
    assert main(["locate", str(tiles), "--grid", "16x16", "--out", str(tmp_path / "m")]) == 0
    clusters = json.loads((tmp_path / "m" / "clusters.json").read_text())
    assert clusters["image_shape"] == [384, 384]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "501"], "larger than the image"),
        (["--window", "16"], "odd"),
        (["--grid", "2x2", "--k", "9", "--bar-filter", "none"], "larger than the number"),
        (["--grid", "abc"], "--grid"),
        (["--grid", "10x10", "--crystal-cluster", "7"], "unknown cluster"),
        (["--grid", "10x10", "--reference", "nope"], "ROW,COL"),
        (["--window", "31", "--outlines", "5"], "outline_length_px"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path: Path, scene, capsys, args: list[str], message: str) -> None:
    npy = tmp_path / "image.npy"
    np.save(npy, scene.image)
    assert main(["locate", str(npy), *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_outlines_option_finds_a_faint_plate_by_its_edges(tmp_path: Path, capsys) -> None:
    view = make_grid_image(
        (512, 512), 2, bars=False, n_crystals=1, crystal_size_px=(60.0, 90.0), crystal_contrast=0.08,
        film_grain=0.02, noise_counts=20.0, n_ice=2, n_debris=2,
    )  # fmt: skip
    npy = tmp_path / "search.npy"
    np.save(npy, view.image)
    out = tmp_path / "out"
    assert main(["locate", str(npy), "--window", "31", "--stride", "8", "--outlines", "41", "--out", str(out)]) == 0
    clusters = json.loads((out / "clusters.json").read_text())
    outlined = clusters["outline_cluster"]
    assert outlined == len(clusters["clusters"]) - 1 and outlined in clusters["crystal_clusters"]
    assert clusters["feature_names"][-1] == "straight_edge" and "outlined cluster" in clusters["chosen_by"]
    assert len(view.crystals) == 1
    plate = view.crystals[0]
    candidates = json.loads((out / "candidates.json").read_text())["candidates"]
    from_outline = [c for c in candidates if c["cluster_id"] == outlined]
    assert from_outline
    for c in from_outline:
        assert (c["row_px"] - plate.row_px) ** 2 + (c["col_px"] - plate.col_px) ** 2 <= (plate.radius_px + 5) ** 2


def test_unreadable_files_and_wrong_dtypes_are_refused(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    assert main(["locate", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "broken.tif" in capsys.readouterr().err
    assert main(["locate", str(tmp_path / "missing.tif")]) == 2
    assert "no such file" in capsys.readouterr().err
    boolean = tmp_path / "mask.npy"
    np.save(boolean, np.zeros((64, 64), dtype=bool))
    assert main(["locate", str(boolean), "--out", str(tmp_path / "o")]) == 2
    assert "pixel type" in capsys.readouterr().err
    assert not (tmp_path / "o" / "candidates.json").exists()
