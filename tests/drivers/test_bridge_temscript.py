"""The temscript adapter on temscript's NullMicroscope: units at the edge, presets, camera, errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from drivers.base import (
    InvalidParameterError,
    Microscope,
    PresetError,
    StageLimitError,
)
from drivers.temscript_adapter import (
    NULL_CONFIG,
    TemscriptConfig,
    TemscriptMicroscope,
    TemscriptUnavailableError,
    create_temscript_microscope,
)
from drivers.zmq_bridge import BridgeClient, BridgeServer

pytest.importorskip("temscript")


@pytest.fixture
def scope() -> TemscriptMicroscope:
    return create_temscript_microscope("null")


def test_adapter_implements_the_microscope_protocol(scope: TemscriptMicroscope) -> None:
    assert isinstance(scope, Microscope)
    info = scope.info()
    assert info.camera_shape_px == (2048, 2048)
    assert [p.name for p in info.presets] == ["atlas", "search", "exposure"]
    assert info.simulated


def test_stage_limits_are_converted_from_metres_and_radians(scope: TemscriptMicroscope) -> None:
    limits = scope.stage_limits()
    assert limits.x_max_um == pytest.approx(1000.0)  # NullMicroscope: 1 mm
    assert limits.z_min_um == pytest.approx(-300.0)
    assert limits.alpha_max_deg == pytest.approx(30.0)  # pi/6 rad


def test_moves_reach_the_instrument_in_metres_and_radians(scope: TemscriptMicroscope) -> None:
    scope.move_stage(x_um=123.5, y_um=-40.0, alpha_deg=12.0)
    raw = scope.instrument.get_stage_position()
    assert raw["x"] == pytest.approx(123.5e-6)
    assert raw["y"] == pytest.approx(-40.0e-6)
    assert raw["a"] == pytest.approx(math.radians(12.0))
    position = scope.get_stage()
    assert position.x_um == pytest.approx(123.5) and position.alpha_deg == pytest.approx(12.0)
    scope.move_stage(z_um=5.0)  # other axes keep their value
    assert scope.get_stage().x_um == pytest.approx(123.5)
    assert scope.instrument.get_stage_position()["z"] == pytest.approx(5e-6)


def test_out_of_range_target_raises_before_anything_moves(scope: TemscriptMicroscope) -> None:
    scope.move_stage(x_um=10.0)
    with pytest.raises(StageLimitError, match="alpha"):
        scope.move_stage(x_um=20.0, alpha_deg=45.0)
    assert scope.get_stage().x_um == pytest.approx(10.0)


def test_background_move_and_wait(scope: TemscriptMicroscope) -> None:
    scope.move_stage(y_um=250.0, wait=False)
    scope.wait_for_stage(timeout_s=5.0)
    assert not scope.is_stage_moving()
    assert scope.get_stage().y_um == pytest.approx(250.0)
    scope.stop_stage()  # nothing moves: harmless


def test_presets_set_magnification_index_and_defocus() -> None:
    config = NULL_CONFIG.model_copy(
        update={"presets": (*NULL_CONFIG.presets[:2], NULL_CONFIG.presets[2].model_copy(update={"defocus_um": -2.0}))}
    )
    scope = TemscriptMicroscope(lambda: create_temscript_microscope("null").instrument, config)
    scope.set_preset("search")
    assert scope.instrument.get_magnification_index() == 10
    assert scope.get_preset() == "search"
    scope.set_preset("exposure")
    assert scope.instrument.get_defocus() == pytest.approx(-2.0e-6)
    with pytest.raises(PresetError, match="atlas, search, exposure"):
        scope.set_preset("nonsense")


def test_preset_is_inferred_from_the_instrument_before_any_set(scope: TemscriptMicroscope) -> None:
    scope.instrument.set_magnification_index(20)
    assert scope.get_preset() == "exposure"
    scope.instrument.set_magnification_index(33)
    assert scope.get_preset() == ""
    with pytest.raises(PresetError, match="set_preset"):
        scope.acquire(0.01)


def test_acquire_returns_binned_uint16_frames_with_metadata(scope: TemscriptMicroscope) -> None:
    scope.set_preset("atlas")
    scope.move_stage(x_um=-75.0)
    frame = scope.acquire(0.01)
    assert frame.image.dtype == np.uint16 and frame.shape_px == (512, 512)
    assert frame.metadata.preset == "atlas" and frame.metadata.binning == 4
    assert frame.metadata.stage.x_um == pytest.approx(-75.0)
    assert scope.instrument.get_camera_param("CCD")["exposure(s)"] == pytest.approx(0.01)
    with pytest.raises(InvalidParameterError):
        scope.acquire(-1.0)


def test_diffraction_returns_to_imaging(scope: TemscriptMicroscope) -> None:
    scope.set_preset("exposure")
    frame = scope.acquire_diffraction(0.01)
    assert frame.metadata.kind == "diffraction"
    assert scope.instrument.get_projection_mode() == "IMAGING"
    assert scope.instrument.get_magnification_index() == 20
    scope.set_preset("search")
    with pytest.raises(PresetError, match="diffraction_index"):
        scope.acquire_diffraction(0.01)


def test_config_file_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "scope.json"
    good.write_text(json.dumps(NULL_CONFIG.model_dump(mode="json")))
    assert TemscriptConfig.from_file(good) == NULL_CONFIG
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"presets": [{"name": "a", "magnification_index": -1}]}))
    with pytest.raises(InvalidParameterError, match=r"bad\.json"):
        TemscriptConfig.from_file(bad)


def test_missing_temscript_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "temscript", None)
    with pytest.raises(TemscriptUnavailableError, match=r"crystal-locator\[temscript\]"):
        create_temscript_microscope("null")


def test_adapter_serves_over_the_bridge(scope: TemscriptMicroscope) -> None:
    with BridgeServer(scope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint, timeout_s=5.0) as client:
        assert client.server_info is not None and client.server_info.camera_shape_px == (2048, 2048)
        client.set_preset("search")
        client.move_stage(x_um=42.0)
        assert scope.instrument.get_stage_position()["x"] == pytest.approx(42e-6)
        frame = client.acquire(0.01)
        assert frame.shape_px == (1024, 1024) and frame.metadata.preset == "search"
