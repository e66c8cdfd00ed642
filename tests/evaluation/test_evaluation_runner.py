"""The evaluation runner and `crystal-locator evaluate`, on the real simulator and on a user's
labelled images (a real-world-like image written to disk with a CSV of crystal positions)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tifffile

from agent.cli import main
from agent.evaluation.baselines import DetectorOutput
from agent.evaluation.labelled import LabelsError, labelled_images, read_labels_csv
from agent.evaluation.runner import (
    EvaluationConfig,
    EvaluationError,
    Method,
    baseline_methods,
    check_targets,
    evaluate_images,
    locator_method,
    simulated_images,
)
from agent.evaluation.scoring import Detection
from tests.synthetic_images import make_grid_image

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope

ROW_KEYS = {"specimen", "method", "mode", "precision", "recall", "recall_diffracting", "loc_error_um"}


def _fraction_or_none(value: object) -> bool:
    return value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)


@pytest.fixture(scope="module")
def simulated_frames(simulated_microscope: Callable[..., SimulatedMicroscope]) -> list:
    config = EvaluationConfig(specimens=("protein-plates",), seeds=1, presets=("atlas", "search"), frames_per_seed=1,
                              camera_px=384, ks=(3,))
    microscope = simulated_microscope("protein-plates", seed=0, camera_px=384)
    truth = microscope.ground_truth
    return list(simulated_images(
        microscope, truth, specimen="protein-plates", seed=0, config=config,
        square_centres_um=truth.square_centres_um(), true_matrix=microscope.true_image_to_stage_matrix,
        true_stage_xy_um=microscope.true_stage_xy_um,
    ))


def test_simulated_frames_carry_consistent_truth(simulated_frames: list) -> None:
    assert [f.preset for f in simulated_frames] == ["atlas", "search"]
    atlas, search = simulated_frames
    assert atlas.image.shape == (384, 384) and atlas.image.dtype == np.uint16
    assert atlas.truth.um_per_px == pytest.approx(0.3, rel=0.05)
    assert search.truth.um_per_px == pytest.approx(0.04, rel=0.05)
    assert atlas.truth.bar_mask is not None and 0.05 < atlas.truth.bar_mask.mean() < 0.9  # atlas frames see bars
    assert atlas.truth.n_countable > 0
    # truth is where the specimen really is: dark true-bar pixels, bright film
    image = atlas.image.astype(float)
    assert np.median(image[atlas.truth.bar_mask]) < 0.2 * np.median(image[~atlas.truth.bar_mask])


def test_evaluate_images_rows_and_examples(simulated_frames: list) -> None:
    methods = [baseline_methods()[0], locator_method("grid", 3)]  # LoG: see test_evaluation_baselines
    result = evaluate_images(simulated_frames, methods, config={"test": True})
    assert result.n_images == 2
    assert len(result.rows) == 2 * len(methods)  # per preset x method x mode
    for row in result.rows:
        assert set(row) >= ROW_KEYS
        assert row["specimen"] == "protein-plates"
        for key in ("precision", "recall", "recall_diffracting", "bar_iou"):
            assert _fraction_or_none(row[key]), (key, row)
        assert row["loc_error_um"] is None or row["loc_error_um"] >= 0
    threshold_atlas = next(r for r in result.rows if r["method"] == "threshold-cc" and r["preset"] == "atlas")
    assert threshold_atlas["n_crystals"] > 0 and threshold_atlas["recall"] > 0.3
    assert threshold_atlas["bar_iou"] > 0.8
    assert set(result.examples) == {"protein-plates / atlas", "protein-plates / search"}
    assert len(result.examples["protein-plates / atlas"].detections) == len(methods)
    json.dumps(result.as_dict())  # JSON-ready
    assert any(t["role"] == "default" for t in result.targets)


def test_a_failing_method_is_recorded_and_the_others_still_run(simulated_frames: list) -> None:
    def broken(image: np.ndarray) -> DetectorOutput:
        raise RuntimeError("boom")

    def centre_only(image: np.ndarray) -> DetectorOutput:
        return DetectorOutput(detections=(Detection(image.shape[0] / 2, image.shape[1] / 2),), bar_mask=None)

    result = evaluate_images(simulated_frames[:1], [Method("broken", "image", broken),
                                                   Method("centre", "image", centre_only)])
    broken_row = next(r for r in result.rows if r["method"] == "broken")
    assert broken_row["n_failed"] == 1 and broken_row["n_images"] == 0
    assert "boom" in result.failures[0]
    centre_row = next(r for r in result.rows if r["method"] == "centre")
    assert centre_row["n_detections"] == 1 and centre_row["n_failed"] == 0
    with pytest.raises(EvaluationError):
        evaluate_images([], baseline_methods())
    with pytest.raises(EvaluationError):
        evaluate_images(simulated_frames, [])


def test_unknown_locator_setting_is_a_clear_error() -> None:
    with pytest.raises(EvaluationError, match="unknown locator settings"):
        locator_method("grid", 3, no_such_setting=1)
    with pytest.raises(EvaluationError, match="invalid locator settings"):
        locator_method("grid", 3, grid_rows=0)
    with pytest.raises(EvaluationError, match="invalid locator settings"):
        locator_method("window", 3, preset_settings={"search": {"outline_length_px": 2}})


def test_preset_settings_give_that_preset_its_own_run() -> None:
    assert EvaluationConfig().preset_locator_settings == {"search": {"outline_length_px": 41}}
    method = locator_method("window", 3, preset_settings={"search": {"outline_length_px": 41}}, window_px=31)
    assert set(method.runs_by_preset) == {"search"}
    view = make_grid_image(
        (512, 512), 2, bars=False, n_crystals=1, crystal_size_px=(60.0, 90.0), crystal_contrast=0.08,
        film_grain=0.02, noise_counts=20.0, n_ice=2, n_debris=2,
    )  # fmt: skip
    plate = view.crystals[0]

    def on_plate(output) -> int:
        return sum(
            (d.row_px - plate.row_px) ** 2 + (d.col_px - plate.col_px) ** 2 <= (plate.radius_px + 5) ** 2
            for d in output.detections
        )

    # the faint plate is found by its outline: only with the search preset's settings
    assert on_plate(method.runs_by_preset["search"](view.image)) > on_plate(method.run(view.image))


def test_each_preset_is_run_with_its_own_run(simulated_frames: list) -> None:
    probe = Method(
        name="probe",
        mode="image",
        run=lambda image: DetectorOutput(detections=(), bar_mask=None),
        runs_by_preset={"search": lambda image: DetectorOutput(detections=(Detection(1.0, 1.0),), bar_mask=None)},
    )
    rows = evaluate_images(simulated_frames, [probe]).rows
    assert {r["preset"]: r["n_detections"] for r in rows} == {"atlas": 0, "search": 1}


def test_quick_config_is_small() -> None:
    quick = EvaluationConfig.quick()
    assert quick.seeds == 2 and quick.presets == ("atlas",) and quick.frames_per_seed == 1
    assert quick.camera_px == 1024 and quick.ks == (5,) and quick.modes == ("window",)
    assert len(quick.specimens) == 4
    assert EvaluationConfig.quick(seeds=1).seeds == 1


def test_check_targets_reports_gaps() -> None:
    rows = [
        {"specimen": "protein-plates", "preset": "atlas", "method": "kmeans-k3", "mode": "grid", "k": 3,
         "precision": 0.95, "recall": 0.97},
        {"specimen": "protein-plates", "preset": "atlas", "method": "kmeans-k4", "mode": "grid", "k": 4,
         "precision": 0.5, "recall": 0.99},
        {"specimen": "protein-plates", "preset": "atlas", "method": "log-blob", "mode": "image", "k": None,
         "precision": 0.7, "recall": None},
        {"specimen": "polymer-faint", "preset": "search", "method": "kmeans-k3", "mode": "grid", "k": 3,
         "precision": 1.0, "recall": 1.0},
    ]
    checks = check_targets(rows)
    default = next(c for c in checks if c["role"] == "default")
    assert default["met"] and default["recall_gap"] == pytest.approx(0.02)
    best = next(c for c in checks if c["role"] == "best-locator")
    assert best["method"] == "kmeans-k3"  # k4 misses the precision goal
    baseline = next(c for c in checks if c["role"] == "baseline")
    assert not baseline["met"] and baseline["recall_gap"] is None
    assert all(c["specimen"] == "protein-plates" for c in checks)  # search rows are not target rows


# --------------------------------------------------------------------------------------------------
# a user's labelled images
# --------------------------------------------------------------------------------------------------


def _write_labelled(tmp_path: Path) -> tuple[Path, Path, int]:
    folder = tmp_path / "tiles"
    folder.mkdir()
    bright = make_grid_image((320, 384), seed=11, n_crystals=8)
    dark = make_grid_image((320, 384), seed=12, n_crystals=8, polarity="dark", bit_depth=8)
    tifffile.imwrite(folder / "bright.tif", bright.image)
    tifffile.imwrite(folder / "dark.tif", dark.image)
    lines = ["image,row_px,col_px,radius_px,diffracts"]
    for name, synthetic in (("bright.tif", bright), ("dark.tif", dark)):
        lines += [f"{name},{c.row_px:.2f},{c.col_px:.2f},{c.radius_px:.2f},1" for c in synthetic.crystals]
    csv_path = tmp_path / "crystals.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return folder, csv_path, len(bright.crystals) + len(dark.crystals)


def test_labelled_images_from_csv(tmp_path: Path) -> None:
    folder, csv_path, n = _write_labelled(tmp_path)
    images = list(labelled_images([folder], csv_path, pixel_size_um=0.3))
    assert [i.name for i in images] == ["bright.tif", "dark.tif"]
    assert sum(i.truth.n_countable for i in images) == n
    assert images[1].image.dtype == np.uint8  # stored dtype is kept
    assert images[0].truth.um_per_px == 0.3
    assert all(c.diffracts for i in images for c in i.truth.crystals)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,row,col\nx.tif,1,2\n", "missing column"),
        ("image,row_px,col_px\nbright.tif,one,2\n", "line 2"),
        ("image,row_px,col_px,radius_px\nbright.tif,1,2,-3\n", "radius"),
        ("image,row_px,col_px\nbright.tif,5000,2\n", "outside"),
    ],
)
def test_bad_labels_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    folder, _, _ = _write_labelled(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(LabelsError, match=message):
        list(labelled_images([folder], bad))


def test_labels_csv_tolerates_bom_and_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes("\ufeffimage,row_px,col_px,note\na/b.tif,1,2,hello\nb.tif,3,4,\n".encode())
    labels = read_labels_csv(path)
    assert labels == {"b.tif": [(1.0, 2.0, 0.0, None), (3.0, 4.0, 0.0, None)]}


def test_cli_evaluate_on_labelled_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, csv_path, n = _write_labelled(tmp_path)
    out_json = tmp_path / "eval.json"
    out_html = tmp_path / "eval.html"
    code = main(["evaluate", "--images", str(folder), "--truth", str(csv_path), "--pixel-size-um", "0.3",
                 "--modes", "grid", "--k", "3", "--json", str(out_json), "--html", str(out_html)])
    assert code == 0
    document = json.loads(out_json.read_text())
    rows = document["rows"]
    assert {(r["method"], r["mode"]) for r in rows} == {("kmeans-k3", "grid"), ("threshold-cc", "image"),
                                                         ("log-blob", "image")}
    for row in rows:
        assert set(row) >= ROW_KEYS and row["specimen"] == "user" and row["n_crystals"] == n
    threshold = next(r for r in rows if r["method"] == "threshold-cc")
    assert threshold["recall"] >= 0.75
    assert out_html.read_text().count("<img") >= 3
    assert "threshold-cc" in capsys.readouterr().out


def test_cli_evaluate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, csv_path, _ = _write_labelled(tmp_path)
    assert main(["evaluate", "--images", str(folder)]) == 2
    assert "--truth" in capsys.readouterr().err
    # a corrupt image is skipped with a message; the others are evaluated; the exit code and the JSON say so
    (folder / "corrupt.tif").write_bytes(b"II*\x00garbage")
    out_json = tmp_path / "eval.json"
    code = main(["evaluate", "--images", str(folder), "--truth", str(csv_path), "--no-locator",
                 "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 1 and "skipped corrupt.tif" in captured.err and "1 image(s) could not be read" in captured.out
    document = json.loads(out_json.read_text())
    assert document["rows"] and [s.split(":")[0] for s in document["config"]["skipped_images"]] == ["corrupt.tif"]
    # an output path that is a folder is refused before any work
    assert main(["evaluate", "--json", str(tmp_path), "--no-locator", "--seeds", "1"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["evaluate", "--no-locator", "--no-baselines"]) == 2
    assert main(["evaluate", "--specimens", "no-such-type", "--no-locator", "--seeds", "1"]) == 2
    assert "no-such-type" in capsys.readouterr().err
    assert main(["evaluate", "--json", str(tmp_path / "missing" / "x.json"), "--no-locator"]) == 2
    assert main(["evaluate", "--grid", "20by20", "--seeds", "1"]) == 2
    assert "--grid" in capsys.readouterr().err


def test_cli_evaluate_simulated_small(tmp_path: Path) -> None:
    out_json = tmp_path / "sim.json"
    code = main(["evaluate", "--specimens", "graphite-flakes", "--seeds", "1", "--frames", "1", "--presets", "atlas",
                 "--camera-px", "384", "--modes", "window", "--k", "3", "--window-px", "21", "--stride-px", "6",
                 "--search-outlines", "0", "--json", str(out_json)])
    assert code == 0
    document = json.loads(out_json.read_text())
    assert {r["method"] for r in document["rows"]} == {"kmeans-k3", "threshold-cc", "log-blob"}
    assert document["config"]["camera_px"] == 384
    assert document["config"]["locator_settings"] == {"window_px": 21, "stride_px": 6}
    assert document["config"]["preset_locator_settings"] == {"search": {}}
    assert document["matching"]["tolerance_um"] == 2.0
    assert any(t["specimen"] == "graphite-flakes" for t in document["targets"])
