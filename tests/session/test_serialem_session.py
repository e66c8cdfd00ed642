"""A screening session through the SerialEM driver: `BridgeServer(SerialEMMicroscope(emulator))` and a
`BridgeClient` give the session the simulator itself gives, same specimen and seed (issue 23, item 2).

One test of two sessions (512 px camera, one square, three targets): about 25 s on a quiet 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.session.screening import ScreeningSession
from drivers.serialem_adapter import SerialEMMicroscope
from drivers.zmq_bridge import BridgeClient, BridgeServer
from simulator.serialem_emulator import make_serialem_module

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope

CAMERA_PX = 512
SPECIMEN = "protein-plates"  # seed 0: three targets, two of them diffracting, re-centred by image shift


def _plan() -> ScreeningPlan:
    return ScreeningPlan(specimen=SPECIMEN, seed=0, area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=3))


def _outcomes(session: ScreeningSession) -> list[tuple[str, float, float, str]]:
    return sorted((t.target_id, round(t.x_um, 3), round(t.y_um, 3), session.results[t.target_id].outcome)
                  for t in session.targets if t.target_id in session.results)


def test_a_session_through_the_serialem_driver_matches_the_simulator(
    simulated_microscope: Callable[..., SimulatedMicroscope], tmp_path: Path
) -> None:
    """Same targets, outcomes, counts and microscope time: the emulator charges the simulator's clock for each
    physical event once, and the driver adds no instrument time of its own (status reports are free)."""
    local = ScreeningSession(simulated_microscope(SPECIMEN, seed=0, camera_px=CAMERA_PX), _plan(), tmp_path / "local")
    expected = local.run()

    behind = simulated_microscope(SPECIMEN, seed=0, camera_px=CAMERA_PX)
    module = make_serialem_module(behind)
    driver = SerialEMMicroscope(module, module.emulator.config())
    with BridgeServer(driver, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint) as client:
        session = ScreeningSession(client, _plan(), tmp_path / "serialem")
        summary = session.run()

    assert summary.state == expected.state == "done" and summary.faults == 0
    assert expected.targets_found == 3 and (expected.diffracting_crystals or 0) >= 1  # the test sees diffraction
    ignore = {"session", "wall_time_s"}
    assert summary.model_dump(exclude=ignore) == expected.model_dump(exclude=ignore)
    assert abs(summary.microscope_time_s - expected.microscope_time_s) <= 0.01
    assert abs(behind.microscope_time_s() - local.microscope.microscope_time_s()) <= 0.01
    assert _outcomes(session) == _outcomes(local)
    # the frames went through SerialEM's buffer A, diffraction through its camera length
    assert module.emulator.buffers and not module.emulator.diffraction
