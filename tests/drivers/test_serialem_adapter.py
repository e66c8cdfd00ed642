"""The SerialEM driver over the SerialEM emulator (`simulator.serialem_emulator`) and the real simulator behind it:
every protocol method with its units and errors, the image-shift and cassette capabilities, Low Dose presets,
the emulator's argument checking, an unreachable SerialEM, and reads that do not wait for a long command."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.base import (
    CASSETTE_METHODS,
    IMAGE_SHIFT_METHODS,
    MICROSCOPE_METHODS,
    AcquisitionError,
    AcquisitionTimeout,
    GridLoadError,
    InvalidParameterError,
    MicroscopeError,
    PresetError,
    StageLimitError,
    StageLimits,
    StageMoveError,
)
from drivers.serialem_adapter import SerialEMConfig, SerialEMMicroscope, connect_serialem
from simulator import create_simulated_microscope
from simulator.cassette import create_cassette_microscope
from simulator.faults import FaultPlan
from simulator.microscope import SimulatedMicroscope
from simulator.serialem_emulator import SEMerror, SEMmoduleError, make_serialem_module

CAMERA_PX = 128


def _driver(sim: Any, **config: Any) -> tuple[SerialEMMicroscope, Any]:
    module = make_serialem_module(sim)
    return SerialEMMicroscope(module, module.emulator.config(**config)), module


@pytest.fixture
def sim() -> SimulatedMicroscope:
    return create_simulated_microscope("protein-plates", seed=1, camera_shape_px=(CAMERA_PX, CAMERA_PX))


def test_the_driver_has_every_method_of_the_protocol_and_its_capabilities(sim: SimulatedMicroscope) -> None:
    driver, _ = _driver(sim)
    for name in (*MICROSCOPE_METHODS, *IMAGE_SHIFT_METHODS, *CASSETTE_METHODS):
        assert callable(getattr(driver, name)), name
    info, truth = driver.info(), sim.info()
    assert info.camera_shape_px == truth.camera_shape_px == (CAMERA_PX, CAMERA_PX)
    assert info.presets == truth.presets and info.stage_limits == truth.stage_limits == driver.stage_limits()
    assert info.image_shift_limit_um == truth.image_shift_limit_um > 0 and info.cassette_slots == 0
    assert info.simulated and info.name == f"SerialEM emulator ({truth.name})"


def test_stage_moves_in_micrometres_and_degrees_and_the_clock_is_serialems_tick(sim: SimulatedMicroscope) -> None:
    driver, _ = _driver(sim)
    assert driver.microscope_time_s() == sim.microscope_time_s() == 0.0
    driver.move_stage(x_um=120.5, y_um=-40.25)
    assert sim.get_stage().x_um == 120.5 and sim.get_stage().y_um == -40.25
    driver.move_stage(z_um=12.0, alpha_deg=-20.0)
    stage = driver.get_stage()
    assert (stage.x_um, stage.y_um, stage.z_um, stage.alpha_deg) == (120.5, -40.25, 12.0, -20.0)
    assert stage == sim.get_stage()
    assert driver.microscope_time_s() == sim.microscope_time_s() > 0
    driver.move_stage(x_um=0.0, wait=False)
    driver.wait_for_stage(timeout_s=30.0)
    assert not driver.is_stage_moving() and sim.get_stage().x_um == 0.0
    driver.stop_stage()  # nothing moves: a no-op
    with pytest.raises(InvalidParameterError):
        driver.wait_for_stage(timeout_s=-1.0)


def test_a_target_beyond_the_stage_limits_is_refused_before_anything_moves(sim: SimulatedMicroscope) -> None:
    driver, _ = _driver(sim, stage_limits=StageLimits(x_min_um=-500, x_max_um=500, y_min_um=-500, y_max_um=500))
    before, clock = sim.get_stage(), sim.microscope_time_s()
    with pytest.raises(StageLimitError, match="x=600"):
        driver.move_stage(x_um=600.0, y_um=0.0)
    with pytest.raises(InvalidParameterError):
        driver.move_stage(x_um=float("nan"))
    assert sim.get_stage() == before and sim.microscope_time_s() == clock


def test_a_move_serialem_refuses_is_a_stage_move_error(sim: SimulatedMicroscope) -> None:
    """Configured limits wider than the instrument's: SerialEM's error arrives as StageMoveError."""
    driver, _ = _driver(sim, stage_limits=StageLimits(x_min_um=-5000, x_max_um=5000))
    with pytest.raises(StageMoveError, match="MoveStageTo"):
        driver.move_stage(x_um=3000.0, y_um=0.0)
    assert sim.get_stage().x_um == 0.0


def test_presets_images_and_their_metadata(sim: SimulatedMicroscope) -> None:
    driver, module = _driver(sim)
    assert driver.get_preset() == sim.get_preset() == "atlas"  # from the magnification index SerialEM reports
    driver.set_preset("exposure")
    assert driver.get_preset() == sim.get_preset() == "exposure"
    assert module.ReportMagIndex()[0] == module.emulator.config().preset("exposure").magnification_index
    frame = driver.acquire(0.25)
    preset = sim.info().preset("exposure")
    assert frame.image.dtype == np.uint16 and frame.shape_px == (CAMERA_PX // 2, CAMERA_PX // 2)
    assert frame.metadata.kind == "image" and frame.metadata.exposure_s == 0.25
    assert (frame.metadata.pixel_size_um, frame.metadata.binning) == (preset.pixel_size_um, preset.binning)
    assert frame.metadata.stage == sim.get_stage() and frame.metadata.time_s == sim.microscope_time_s()
    assert np.array_equal(frame.image, np.asarray(module.bufferImage("A")))
    with pytest.raises(PresetError, match="unknown optics preset"):
        driver.set_preset("nonsense")
    assert driver.get_preset() == "exposure"
    for bad in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(InvalidParameterError):
            driver.acquire(bad)  # type: ignore[arg-type]


def test_diffraction_switches_the_camera_length_and_comes_back_to_imaging(sim: SimulatedMicroscope) -> None:
    driver, module = _driver(sim)
    driver.set_preset("search")
    frame = driver.acquire_diffraction(0.5)
    assert frame.metadata.kind == "diffraction" and frame.metadata.extra["camera_length_mm"] == 1000.0
    assert not module.emulator.diffraction and module.ReportCameraLength() == 0.0
    assert driver.get_preset() == sim.get_preset() == "search"
    assert driver.acquire(0.1).metadata.kind == "image"
    no_diffraction = module.emulator.config().model_copy(update={"presets": tuple(
        p.model_copy(update={"camera_length_index": None}) for p in module.emulator.config().presets
    )})
    plain = SerialEMMicroscope(module, no_diffraction)
    plain.set_preset("search")
    with pytest.raises(PresetError, match="no diffraction_area or camera_length_index"):
        plain.acquire_diffraction(0.5)


def test_low_dose_areas_as_presets_with_a_diffraction_area(sim: SimulatedMicroscope) -> None:
    module = make_serialem_module(sim, low_dose_areas={"V": "atlas", "S": "search", "R": "exposure"},
                                  diffraction_areas={"F"})
    driver = SerialEMMicroscope(module, module.emulator.config(low_dose=True))
    assert driver.config.preset("search").low_dose_area == "S"
    driver.set_preset("search")
    assert sim.get_preset() == "search" and module.ReportLowDose() == (1.0, 4.0)
    assert driver.acquire(0.2).shape_px == (CAMERA_PX, CAMERA_PX)
    driver.set_preset("exposure")
    frame = driver.acquire_diffraction(0.3)
    assert frame.metadata.kind == "diffraction" and frame.metadata.extra["camera_set"] == "F"
    assert module.ReportLowDose() == (1.0, 3.0) and not module.emulator.diffraction
    driver.set_preset("overview")  # not a Low Dose area: its magnification index, Low Dose off
    assert sim.get_preset() == "overview" and module.ReportLowDose()[0] == 0.0


def test_image_shift_in_stage_micrometres_within_the_limit(sim: SimulatedMicroscope) -> None:
    driver, _ = _driver(sim)
    limit = driver.info().image_shift_limit_um
    driver.set_image_shift(2.5, -1.5)
    assert driver.get_image_shift() == sim.get_image_shift() == (2.5, -1.5)
    driver.set_image_shift(-1.0, 0.5)
    assert sim.get_image_shift() == pytest.approx((-1.0, 0.5), abs=1e-12)
    driver.set_preset("search")
    assert driver.acquire(0.1).metadata.image_shift_xy_um == (-1.0, 0.5)
    for x_um, y_um in ((limit + 1.0, 0.0), (0.0, float("nan")), ("1", 0.0)):
        with pytest.raises(InvalidParameterError):
            driver.set_image_shift(x_um, y_um)  # type: ignore[arg-type]
    assert sim.get_image_shift() == pytest.approx((-1.0, 0.5), abs=1e-12)
    off, _ = _driver(create_simulated_microscope("protein-plates", camera_shape_px=(32, 32)), image_shift_limit_um=0)
    with pytest.raises(InvalidParameterError, match="image shift is off"):
        off.set_image_shift(1.0, 0.0)


def test_beam_blanking(sim: SimulatedMicroscope) -> None:
    driver, _ = _driver(sim)
    driver.set_beam_blanked(True)
    assert driver.is_beam_blanked() and sim.is_beam_blanked()
    driver.set_beam_blanked(False)
    assert not driver.is_beam_blanked() and not sim.is_beam_blanked()
    with pytest.raises(InvalidParameterError):
        driver.set_beam_blanked(1)  # type: ignore[arg-type]


def test_camera_errors_are_typed(sim: SimulatedMicroscope) -> None:
    """A binning SerialEM's camera refuses is an AcquisitionError; a camera timeout an AcquisitionTimeout."""
    config = _driver(sim)[1].emulator.config()
    wrong = config.model_copy(update={"presets": tuple(p.model_copy(update={"binning": 4}) for p in config.presets)})
    driver = SerialEMMicroscope(make_serialem_module(sim), wrong)
    driver.set_preset("atlas")
    with pytest.raises(AcquisitionError, match="bins by 1"):
        driver.acquire(0.1)
    faulty = create_simulated_microscope("protein-plates", camera_shape_px=(64, 64),
                                         faults=FaultPlan(timeout_acquire_numbers=frozenset({1})))
    driver, _ = _driver(faulty)
    driver.set_preset("atlas")
    with pytest.raises(AcquisitionTimeout):
        driver.acquire(0.1)
    assert driver.acquire(0.1).shape_px == (64, 64)


def test_reads_answer_while_a_long_command_holds_serialem(sim: SimulatedMicroscope) -> None:
    """The bridge's read calls must not wait for a move or an exposure: with the link busy (another thread in a
    command) they answer from the last values read, at once."""
    driver, _ = _driver(sim)
    driver.set_preset("atlas")
    driver.move_stage(x_um=50.0, y_um=5.0)
    held, release = threading.Event(), threading.Event()
    released_in_time: list[bool] = []

    def long_command() -> None:
        with driver.link.lock:
            held.set()
            released_in_time.append(release.wait(10.0))  # False if a read waited for this command

    worker = threading.Thread(target=long_command, daemon=True)
    worker.start()
    try:
        assert held.wait(10.0)
        assert driver.get_stage().x_um == 50.0 and driver.get_preset() == "atlas"
        assert driver.microscope_time_s() >= 0.0 and not driver.is_beam_blanked()
        assert driver.get_image_shift() == (0.0, 0.0) and driver.info().presets
    finally:
        release.set()
        worker.join(10.0)
    assert released_in_time == [True]


def test_serialem_not_reachable_is_one_line_naming_the_address_and_the_properties(sim: SimulatedMicroscope) -> None:
    module = make_serialem_module(sim, host="127.0.0.1", port=48888)
    config = module.emulator.config(host="127.0.0.1", port=48889)
    with pytest.raises(MicroscopeError) as caught:
        SerialEMMicroscope(module, config)
    message = str(caught.value)
    assert "\n" not in message and "127.0.0.1:48889" in message
    for word in ("EnableExternalPython 1", "SocketServerIP 7", "SocketServerPort 7"):
        assert word in message


def test_without_the_serialem_module_connecting_says_where_it_comes_from() -> None:
    try:
        import serialem  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only on a SerialEM PC
        pytest.skip("the real serialem module is installed here")
    config = SerialEMConfig(presets=({"name": "a", "magnification_index": 3, "magnification": 100,
                                      "pixel_size_um": 0.5},))  # type: ignore[arg-type]
    with pytest.raises(MicroscopeError, match="PythonModules"):
        connect_serialem(config)


def test_the_emulator_checks_argument_types_as_the_real_module_does(
    sim: SimulatedMicroscope, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PY_SERIALEM_IP", raising=False)
    monkeypatch.delenv("PY_SERIALEM_PORT", raising=False)
    assert make_serialem_module(sim).ReportTiltAngle() == 0.0  # connects to the default 127.0.0.1:48888 itself
    module = make_serialem_module(sim, port=48890)
    with pytest.raises(SEMmoduleError, match=r"at IP 127\.0\.0\.1 on port 48888"):
        module.ReportStageXYZ()
    module.ConnectToSEM(48890, "127.0.0.1")
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (module.MoveStageTo, ("10", 0.0)), (module.MoveStageTo, (1.0,)), (module.MoveStageTo, (1.0, 2.0, 3.0, 4.0)),
        (module.SetMagIndex, (2.0,)), (module.GoToLowDoseArea, (1,)), (module.SetExposure, ("R", "1")),
        (module.bufferImage, (1,)), (module.ConnectToSEM, ("48890", "127.0.0.1")),
    ]
    for function, args in calls:
        with pytest.raises(TypeError):
            function(*args)
    with pytest.raises(TypeError, match="keyword"):
        module.MoveStageTo(x_um=1.0, y_um=2.0)
    module.MoveStageTo(np.float64(3.0), 4)  # numbers of any kind, as PyArg_ParseTuple's 'd'
    assert module.ReportStageXYZ() == (3.0, 4.0, 0.0) and isinstance(module.ReportTickTime(), float)
    assert module.ReportTiltAngle() == 0.0 and module.SetExposure("R", 0.5) is None
    with pytest.raises(SEMerror, match="magnification index 99"):
        module.SetMagIndex(99)
    with pytest.raises(SEMmoduleError, match="no image in buffer A"):
        module.bufferImage("A")
    with pytest.raises(SEMerror, match="no autoloader"):
        module.LoadCartridge(1)
    assert not hasattr(module, "__file__") and module.__name__ != "serialem"


def test_the_cassette_through_serialems_cartridge_commands() -> None:
    sim = create_cassette_microscope("default", seed=0, camera_shape_px=(64, 64))
    driver, _ = _driver(sim)
    slots = sim.cassette_slots()
    assert driver.info().cassette_slots == len(slots) == 12 and driver.loaded_slot() is None
    assert [s.state for s in driver.cassette_slots()] == [s.state for s in slots]
    empty = next(s.slot for s in slots if s.state == "empty")
    full = next(s.slot for s in slots if s.state == "occupied")
    clock = sim.microscope_time_s()
    with pytest.raises(GridLoadError, match=f"slot {empty} is empty"):
        driver.load_grid(empty)
    # not knowing which grid is on the stage (its own slot reads empty too), the driver lets LoadCartridge decide:
    # SerialEM refuses an empty slot at once
    assert sim.loaded_slot() is None and sim.microscope_time_s() - clock < 1.0
    with pytest.raises(InvalidParameterError):
        driver.load_grid(13)
    driver.load_grid(full)
    assert driver.loaded_slot() == sim.loaded_slot() == full and sim.microscope_time_s() - clock >= 60.0
    assert driver.cassette_slots()[full - 1].state == "loaded"
    after = sim.microscope_time_s()
    driver.load_grid(full)  # already there: nothing happens
    assert sim.microscope_time_s() == after and driver.get_stage() == sim.get_stage()
    # a driver started while a grid is on the stage (a restarted bridge, a resumed run) does not know it: that
    # grid's slot reads empty (its cartridge is out), and loading it is not refused as empty
    fresh, _ = _driver(sim)
    assert fresh.loaded_slot() is None and fresh.cassette_slots()[full - 1].state == "empty"
    fresh.load_grid(full)
    assert fresh.loaded_slot() == sim.loaded_slot() == full and sim.microscope_time_s() - after < 1.0
    with pytest.raises(GridLoadError, match=f"slot {empty} is empty"):  # now it knows: an empty slot is refused
        fresh.load_grid(empty)


def test_a_config_file_is_checked_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "scope.json"
    path.write_text('{"presets": [{"name": "a", "low_dose_area": "V", "magnification_index": 3, '
                    '"magnification": 100, "pixel_size_um": 0.5}]}')
    with pytest.raises(InvalidParameterError, match="exactly one of low_dose_area and magnification_index"):
        SerialEMConfig.from_file(path)
    path.write_text('{"port": 48888, "presets": [{"name": "a", "low_dose_area": "V", "magnification": 100, '
                    '"pixel_size_um": 0.5, "diffraction_area": "F"}]}')
    config = SerialEMConfig.from_file(path)
    assert config.preset("a").acquire_set == "V" and config.preset("a").diffraction_set == "F"
    with pytest.raises(InvalidParameterError, match=r"nothing\.json"):
        SerialEMConfig.from_file(tmp_path / "nothing.json")


def test_bridge_serve_refuses_a_serialem_adapter_it_cannot_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    assert main(["bridge", "serve", "--adapter", "serialem"]) == 2
    assert "--adapter-config" in capsys.readouterr().err
    assert main(["bridge", "serve", "--adapter", "serialem", "--clock", "krios"]) == 2
    assert "--clock" in capsys.readouterr().err
    path = tmp_path / "scope.json"
    path.write_text('{"presets": [{"name": "a", "magnification_index": 3, "magnification": 100, "pixel_size_um": 1}]}')
    assert main(["bridge", "serve", "--adapter", "serialem", "--adapter-config", str(path),
                 "--serialem-port", "70000"]) == 2
    assert "--serialem-port" in capsys.readouterr().err


def test_bridge_serve_puts_the_emulator_behind_the_bridge(capsys: pytest.CaptureFixture[str]) -> None:
    """`bridge serve --adapter serialem-emulator` in its own process: ping sees the simulated microscope through
    the SerialEM driver, SIGTERM stops it."""
    import queue
    import signal
    import subprocess
    import sys

    from agent.cli import main

    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "bridge", "serve", "--adapter", "serialem-emulator", "--camera-px", "64",
         "--clock", "jeol-fast", "--endpoint", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()], daemon=True).start()
    try:
        first = lines.get(timeout=60.0)
        assert "serving SerialEMMicroscope" in first, first
        endpoint = first.split(" on ", 1)[1].split()[0]
        assert main(["bridge", "ping", endpoint, "--count", "1", "--json"]) == 0
        out = capsys.readouterr().out
        assert '"SerialEM emulator (simulated-tem)"' in out and '"camera_shape_px": [64, 64]' in out
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20.0) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10.0)


def test_the_cassette_of_a_serialem_microscope_over_the_bridge() -> None:
    """The bridge serves the driver's cassette: slots, an empty slot refused with GridLoadError, a load."""
    from drivers.zmq_bridge import BridgeClient, BridgeServer

    sim = create_cassette_microscope("default", seed=2, camera_shape_px=(64, 64))
    driver, _ = _driver(sim)
    empty = next(s.slot for s in sim.cassette_slots() if s.state == "empty")
    full = next(s.slot for s in sim.cassette_slots() if s.state == "occupied")
    with BridgeServer(driver, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint) as client:
        assert client.info().cassette_slots == 12
        assert [s.state for s in client.cassette_slots()] == [s.state for s in sim.cassette_slots()]
        with pytest.raises(GridLoadError, match="empty"):
            client.load_grid(empty)
        client.load_grid(full)
        assert client.loaded_slot() == sim.loaded_slot() == full
        assert client.cassette_slots()[full - 1].state == "loaded"
