"""Calibration once per instrument: the store (file format, refusals, never overwriting), the cheap check a
session makes of each stored preset, measuring again where it fails, `--recalibrate`, and the commands.

Everything is real: the simulator (512 px camera: calibration below 448 px fails at the search preset),
files in tmp folders, the session's own journal. One `crystal-locator calibrate` run (module fixture) makes
the store the session tests start from; the sessions run only their calibrating step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.cli import main
from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.session.journal import read_journal
from agent.session.screening import ScreeningSession, SessionError
from agent.steps.calibration_store import CalibrationStore, CalibrationStoreError
from agent.steps.stage_calibration import CALIBRATION_NAME, CalibrationSet, PresetCalibration
from simulator import create_simulated_microscope
from simulator.microscope import SimulatedMicroscope

CAMERA_PX = 512
PRESETS = ("overview", "atlas", "search")
FIXTURE_CALIBRATION = Path(__file__).parents[1] / "session" / "fixtures" / "session_v0_1_0" / CALIBRATION_NAME


def _microscope(seed: int = 2, **options: Any) -> SimulatedMicroscope:
    return create_simulated_microscope("protein-plates", seed=seed, camera_shape_px=(CAMERA_PX, CAMERA_PX), **options)


def _preset(
    name: str, matrix: np.ndarray, pixel_size_um: float, measured_utc: str = "2026-01-01T00:00:00+00:00"
) -> PresetCalibration:
    return PresetCalibration.from_matrix(
        name,
        matrix,
        pixel_size_um,
        residual_px=0.5,
        shift_um=10.0,
        stage_xy_um=(0.0, 0.0),
        measured_utc=measured_utc,
    )


def _rotated(matrix: np.ndarray, angle_deg: float) -> np.ndarray:
    angle = np.radians(angle_deg)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ matrix


def _calibrating(folder: Path, store: CalibrationStore, seed: int = 2, **kwargs: Any) -> list[dict[str, Any]]:
    """A session on a fresh microscope (specimen `seed`) runs its calibrating step; its journal records."""
    microscope = _microscope(seed)
    plan = kwargs.pop("plan", None) or ScreeningPlan(
        specimen="protein-plates", seed=seed, area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=1)
    )
    session = ScreeningSession(microscope, plan, folder, calibration_store=store, **kwargs)
    session.engine.run_step("calibrating")
    session.recorder.close()
    return read_journal(folder / "journal.jsonl")


def _checks(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["preset"]: r for r in records if r["type"] == "calibration_check"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`crystal-locator calibrate --simulated` (instrument 0, specimen seed 1): the store it wrote."""
    folder = tmp_path_factory.mktemp("store")
    assert main(["calibrate", "--simulated", "--seed", "1", "--camera-px", str(CAMERA_PX), "--calibrations",
                 str(folder), "--json"]) == 0
    return folder


def _copy(stored: Path, tmp_path: Path) -> CalibrationStore:
    shutil.copytree(stored, tmp_path / "store")
    return CalibrationStore(tmp_path / "store")


# the store ----------------------------------------------------------------------------------------------


def test_the_store_round_trips_with_format_version_and_date(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path / "calibrations")
    matrix = _microscope().true_image_to_stage_matrix("atlas")
    calibration = CalibrationSet(instrument="simulated-tem", presets={"atlas": _preset("atlas", matrix, 0.3)})
    old_umask = os.umask(0o022)
    try:
        path = store.save(calibration)
    finally:
        os.umask(old_umask)
    assert path == tmp_path / "calibrations" / "simulated-tem.json"
    data = json.loads(path.read_text())
    assert data["format_version"] == 1 and data["instrument"] == "simulated-tem"
    assert data["saved_utc"].startswith("20") and data["presets"]["atlas"]["measured_utc"].startswith("2026")
    assert path.stat().st_mode & 0o777 == 0o644  # colleagues read it (the umask's mode, not mkstemp's 0600)
    loaded = store.load("simulated-tem")
    assert loaded is not None
    np.testing.assert_allclose(loaded.matrix("atlas"), matrix)
    assert store.load("simulated-tem-4") is None  # nothing stored for that instrument yet
    assert CalibrationSet.load(FIXTURE_CALIBRATION).format_version == 1  # release 0.1.0's files: version 1


def test_saving_merges_presets_and_follows_a_private_umask(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path)
    store.save(CalibrationSet(instrument="tem", presets={"atlas": _preset("atlas", np.eye(2) * 0.3, 0.3)}))
    old_umask = os.umask(0o077)
    try:
        search = _preset("search", np.eye(2) * 0.04, 0.04)
        path = store.save(CalibrationSet(instrument="tem", presets={"search": search}))
    finally:
        os.umask(old_umask)
    assert sorted(CalibrationSet.load(path).presets) == ["atlas", "search"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_another_instruments_calibration_is_refused_and_kept(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path)
    foreign = CalibrationSet(instrument="krios-2", presets={"atlas": _preset("atlas", np.eye(2) * 0.3, 0.3)})
    foreign.save(store.path("simulated-tem"))
    before = store.path("simulated-tem").read_bytes()
    with pytest.raises(CalibrationStoreError, match=r"instrument 'krios-2', not of this microscope 'simulated-tem'"):
        store.load("simulated-tem")
    with pytest.raises(SessionError, match="krios-2"):
        ScreeningSession(_microscope(), ScreeningPlan(), tmp_path / "session", calibration_store=store)
    assert store.path("simulated-tem").read_bytes() == before


def test_a_corrupt_store_file_is_reported_kept_and_set_aside_only_by_a_new_calibration(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path)
    path = store.path("simulated-tem")
    path.write_text('{"instrument": "simulated-tem", "presets": {"atlas": 3')
    with pytest.raises(CalibrationStoreError) as error:
        store.load("simulated-tem")
    assert str(path) in str(error.value) and "--recalibrate" in str(error.value) and "kept" in str(error.value)
    assert path.read_text().endswith(": 3")
    fresh = CalibrationSet(instrument="simulated-tem", presets={"atlas": _preset("atlas", np.eye(2) * 0.3, 0.3)})
    store.save(fresh)  # what --recalibrate and `calibrate` do: the corrupt file is moved aside, not overwritten
    aside = sorted(tmp_path.glob("simulated-tem.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().endswith(": 3")
    assert store.load("simulated-tem") is not None


@pytest.mark.parametrize(
    "matrix", [[[0.0, 0.0], [0.0, 0.0]], [[0.3, 0.3], [0.3, 0.3]], [[float("nan"), 0.0], [0.0, 0.3]]]
)
def test_a_stored_matrix_that_cannot_map_pixels_to_the_stage_is_refused_as_corrupt(
    tmp_path: Path, matrix: list[list[float]]
) -> None:
    store = CalibrationStore(tmp_path)
    path = store.path("simulated-tem")
    stored = CalibrationSet(instrument="simulated-tem", presets={"atlas": _preset("atlas", np.eye(2) * 0.3, 0.3)})
    data = json.loads(stored.model_dump_json())
    data["presets"]["atlas"]["matrix_um_per_px"] = matrix
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationStoreError, match=r"singular|not finite"):
        store.load("simulated-tem")
    assert json.loads(path.read_text())["presets"]["atlas"]["matrix_um_per_px"] is not None  # kept as it was


def test_a_file_of_an_unknown_format_version_is_refused_naming_file_and_version(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path)
    path = store.path("simulated-tem")
    path.write_text(json.dumps({"format_version": 7, "instrument": "simulated-tem", "presets": {}}))
    with pytest.raises(CalibrationStoreError, match=r"simulated-tem\.json: calibration format version 7"):
        store.load("simulated-tem")


# the command and a session's check ----------------------------------------------------------------------


def test_calibrate_command_measures_every_preset_of_the_default_plan(stored: Path) -> None:
    calibration = CalibrationStore(stored).load("simulated-tem")
    assert calibration is not None and sorted(calibration.presets) == sorted(PRESETS)
    truth = _microscope()  # another grid in the same instrument: the same true matrices
    for name in PRESETS:  # within 3 %: the stage's repeat error is ~4 px at search magnification (512 px)
        true = truth.true_image_to_stage_matrix(name)
        assert np.abs(calibration.matrix(name) - true).max() < 0.03 * np.abs(true).max()


def test_a_warm_session_checks_each_preset_and_measures_nothing(stored: Path, tmp_path: Path) -> None:
    store = _copy(stored, tmp_path)
    before = store.path("simulated-tem").read_bytes()
    records = _calibrating(tmp_path / "session", store, seed=3)
    checks = _checks(records)
    assert sorted(checks) == sorted(PRESETS)
    for check in checks.values():
        assert check["result"] == "ok"
        assert 0.0 <= check["error_px"] <= check["tolerance_px"]
        assert 0.0 < check["time_s"] < 30.0  # one move, two frames (and the overview/atlas frame for the site)
    assert not [r for r in records if r["type"] == "calibration"]
    assert store.path("simulated-tem").read_bytes() == before
    session_calibration = CalibrationSet.load(tmp_path / "session" / CALIBRATION_NAME)
    assert sorted(session_calibration.presets) == sorted(PRESETS)  # what a resume starts from


def test_a_stored_matrix_rotated_by_10_degrees_fails_its_check_and_is_measured_again(
    stored: Path, tmp_path: Path
) -> None:
    store = _copy(stored, tmp_path)
    calibration = store.load("simulated-tem")
    assert calibration is not None
    wrong = _preset("search", _rotated(calibration.matrix("search"), 10.0), 0.04)
    calibration.with_preset(wrong).save(store.path("simulated-tem"))
    records = _calibrating(tmp_path / "session", store)
    checks = _checks(records)
    assert checks["overview"]["result"] == checks["atlas"]["result"] == "ok"
    assert checks["search"]["result"] == "failed"
    assert checks["search"]["error_px"] > checks["search"]["tolerance_px"]
    assert [r["preset"] for r in records if r["type"] == "calibration"] == ["search"]
    restored = store.load("simulated-tem")
    assert restored is not None
    true = _microscope().true_image_to_stage_matrix("search")
    assert np.abs(restored.matrix("search") - true).max() < 0.03 * np.abs(true).max()


def test_recalibrate_measures_every_preset_and_stores_it(stored: Path, tmp_path: Path) -> None:
    store = _copy(stored, tmp_path)
    records = _calibrating(tmp_path / "session", store, recalibrate=True)
    checks = _checks(records)
    assert sorted(checks) == sorted(PRESETS)
    assert all(c["result"] == "measured" and "--recalibrate" in c["reason"] for c in checks.values())
    measured = {r["preset"]: r["measured_utc"] for r in records if r["type"] == "calibration"}
    calibration = store.load("simulated-tem")
    assert calibration is not None
    assert {name: calibration.presets[name].measured_utc for name in measured} == measured


def test_without_a_store_a_library_session_measures_and_stores_nothing(tmp_path: Path, calibration_store: Path) -> None:
    session = ScreeningSession(_microscope(), ScreeningPlan(), tmp_path / "session")
    assert session.ctx.stored_calibration is None and not session.ctx.recalibrate
    session.recorder.close()
    assert not calibration_store.exists()


# the screen command's refusals ---------------------------------------------------------------------------


def _screen(tmp_path: Path, *extra: str) -> list[str]:
    return ["screen", "--simulated", "--camera-px", "64", "--no-labels", "--out", str(tmp_path / "session"), *extra]


def test_screen_refuses_a_calibration_file_of_another_instrument(
    stored: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_screen(tmp_path, "--instrument-seed", "5", "--calibration", str(stored / "simulated-tem.json"))) == 2
    message = capsys.readouterr().err
    assert "instrument 'simulated-tem', not of this microscope 'simulated-tem-5'" in message
    assert not (tmp_path / "session" / "journal.jsonl").exists()


def test_screen_reports_a_corrupt_store_and_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "calibrations"
    folder.mkdir()
    (folder / "simulated-tem.json").write_text("not json")
    assert main(_screen(tmp_path, "--calibrations", str(folder))) == 2
    message = capsys.readouterr().err
    assert "simulated-tem.json" in message and "kept" in message
    assert (folder / "simulated-tem.json").read_text() == "not json"
    assert not (tmp_path / "session" / "journal.jsonl").exists()


def test_calibrate_refuses_a_store_it_cannot_write_before_it_measures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "a-file-not-a-folder"
    blocked.write_text("")
    assert main(["calibrate", "--simulated", "--camera-px", "64", "--calibrations", str(blocked)]) == 2
    assert "cannot write the calibration store" in capsys.readouterr().err


def test_session_outputs_follow_the_umask_and_a_private_write_stays_private(tmp_path: Path) -> None:
    from drivers.formats.images import write_atomic

    old_umask = os.umask(0o022)
    try:
        shared = write_atomic(tmp_path / "summary.json", b"{}")
        secret = write_atomic(tmp_path / "token", b"x", private=True)
        os.umask(0o027)
        group_only = write_atomic(tmp_path / "targets.csv", b"a\n")
    finally:
        os.umask(old_umask)
    assert shared.stat().st_mode & 0o777 == 0o644
    assert group_only.stat().st_mode & 0o777 == 0o640
    assert secret.stat().st_mode & 0o777 == 0o600
