"""The temscript adapter on temscript's NullMicroscope: units at the edge, presets, camera, errors; the autoloader
mapping on a stand-in for TEM Scripting's AutoLoader object (NullMicroscope has none)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from drivers.base import (
    CassetteSlot,
    GridLoadError,
    InvalidParameterError,
    Microscope,
    MicroscopeError,
    PresetError,
    StageLimitError,
    cassette_slot_count,
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


class TemScriptingAutoLoader:
    """A stand-in for TEM Scripting's `Instrument.AutoLoader` COM object (NullMicroscope has none): the names,
    1-based slots and CassetteSlotStatus codes (0 Unknown, 1 Occupied, 2 Empty, 3 Error) of the TEM Scripting
    manual; `broken` slots make LoadCartridge fail as the COM call would (an exception)."""

    def __init__(self, status: dict[int, int], slots: int = 12, available: bool = True, broken: tuple[int, ...] = ()):
        self.AutoLoaderAvailable = available
        self.NumberOfCassetteSlots = slots
        self._status = status
        self._broken = broken
        self.calls: list[tuple[str, ...]] = []

    def SlotStatus(self, slot: int) -> int:  # noqa: N802 - TEM Scripting's name
        return self._status.get(slot, 0)

    def LoadCartridge(self, slot: int) -> None:  # noqa: N802
        self.calls.append(("LoadCartridge", str(slot)))
        if slot in self._broken:
            raise OSError("COM error 0x8004: cartridge transfer failed")

    def UnloadCartridge(self) -> None:  # noqa: N802
        self.calls.append(("UnloadCartridge",))

    def PerformCassetteInventory(self) -> None:  # noqa: N802
        self.calls.append(("PerformCassetteInventory",))


def _with_autoloader(loader: TemScriptingAutoLoader, **config: object) -> TemscriptMicroscope:
    instrument = create_temscript_microscope("null").instrument
    return TemscriptMicroscope(lambda: instrument, NULL_CONFIG.model_copy(update={"autoloader": True, **config}),
                               autoloader_factory=lambda _instrument: loader)


def test_the_autoloader_is_off_unless_configured(scope: TemscriptMicroscope) -> None:
    assert scope.info().cassette_slots == 0 and cassette_slot_count(scope) == 0
    with pytest.raises(MicroscopeError, match="autoloader is off"):
        scope.load_grid(1)
    with (
        BridgeServer(scope, "tcp://127.0.0.1:0") as server,
        BridgeClient(server.endpoint, timeout_s=5.0) as client,
        pytest.raises(MicroscopeError, match="no autoloader cassette"),
    ):
        client.cassette_slots()  # the adapter has the method, but the capability is off: the bridge says so


def test_autoloader_slots_map_tem_scriptings_slot_status() -> None:
    loader = TemScriptingAutoLoader({1: 1, 2: 2, 3: 1, 4: 3}, slots=6)
    scope = _with_autoloader(loader)
    assert scope.info().cassette_slots == 6 and cassette_slot_count(scope) == 6
    assert [s.state for s in scope.cassette_slots()] == ["occupied", "empty", "occupied", "unknown", "unknown",
                                                         "unknown"]
    assert scope.loaded_slot() is None
    scope.cassette_inventory()
    assert loader.calls == [("PerformCassetteInventory",)]
    assert _with_autoloader(TemScriptingAutoLoader({}, available=False)).info().cassette_slots == 0


def test_load_grid_unloads_then_loads_and_refuses_bad_slots() -> None:
    loader = TemScriptingAutoLoader({1: 1, 2: 2, 3: 1, 5: 1}, slots=6, broken=(5,))
    scope = _with_autoloader(loader)
    scope.load_grid(1)
    assert loader.calls == [("LoadCartridge", "1")] and scope.loaded_slot() == 1
    assert scope.cassette_slots()[0].state == "loaded"
    scope.load_grid(1)  # already there: nothing is sent
    scope.load_grid(3)
    assert loader.calls[1:] == [("UnloadCartridge",), ("LoadCartridge", "3")] and scope.loaded_slot() == 3
    with pytest.raises(GridLoadError, match="slot 2 is empty"):
        scope.load_grid(2)
    for bad in (0, 7, "3", True):
        with pytest.raises(InvalidParameterError):
            scope.load_grid(bad)  # type: ignore[arg-type]
    assert len(loader.calls) == 3 and scope.loaded_slot() == 3  # nothing reached the autoloader
    with pytest.raises(GridLoadError, match="could not load slot 5"):
        scope.load_grid(5)
    assert scope.loaded_slot() is None  # slot 3 went back; 5 did not arrive


def test_autoloader_over_the_bridge_and_a_temscript_without_one() -> None:
    loader = TemScriptingAutoLoader({1: 1, 2: 1})
    scope = _with_autoloader(loader, autoloader_loaded_slot=2)
    with BridgeServer(scope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint, timeout_s=5.0) as client:
        assert client.info().cassette_slots == 12 and client.loaded_slot() == 2
        assert client.cassette_slots()[1] == CassetteSlot(slot=2, state="loaded")
        client.load_grid(1)
        assert loader.calls == [("UnloadCartridge",), ("LoadCartridge", "1")] and client.loaded_slot() == 1
    null_with_autoloader = TemscriptMicroscope(lambda: create_temscript_microscope("null").instrument,
                                               NULL_CONFIG.model_copy(update={"autoloader": True}))
    with pytest.raises(TemscriptUnavailableError, match="autoloader_factory"):
        null_with_autoloader.info()
