"""Fixtures shared by the test rooms: simulated microscopes, a label memory, operator channels, free ports.

Everything here is real (the simulator, the label log on disk, ZeroMQ sockets on 127.0.0.1); the fixtures
only save each test from repeating the same set-up.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.prompts import LABELS_ENV_VAR, LabelMemory, OperatorChannel
from agent.steps.calibration_store import CALIBRATIONS_ENV_VAR
from simulator import create_simulated_microscope
from simulator.microscope import SimulatedMicroscope

MakeMicroscope = Callable[..., SimulatedMicroscope]


@pytest.fixture(scope="session")
def simulated_microscope() -> MakeMicroscope:
    """Factory of fresh simulated microscopes over a generated specimen, with a square camera.

    `simulated_microscope(specimen="protein-plates", seed=0, camera_px=512, **options)` is
    `create_simulated_microscope(specimen_type=specimen, seed=seed, camera_shape_px=(camera_px, camera_px),
    **options)`; `options` (faults, stage_model, ...) go to the simulator unchanged. Each call builds a new
    microscope (own specimen, stage, clock and noise), so the factory is shared by the whole run and may be
    used by module-scoped fixtures.
    """

    def make(
        specimen: str = "protein-plates", seed: int = 0, camera_px: int = 512, **options: Any
    ) -> SimulatedMicroscope:
        return create_simulated_microscope(
            specimen_type=specimen, seed=seed, camera_shape_px=(camera_px, camera_px), **options
        )

    return make


@pytest.fixture(scope="session", autouse=True)
def calibration_store_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Commands run by the tests (`screen`, `calibrate`, also in subprocesses and module-scoped fixtures) store
    instrument calibrations, label memories and other per-user data in folders of this test run (of this
    pytest-xdist worker: each has its own base temporary folder), never in the user's data folder."""
    folder = tmp_path_factory.mktemp("calibrations")
    data = tmp_path_factory.mktemp("data-home")
    names = (CALIBRATIONS_ENV_VAR, LABELS_ENV_VAR, "XDG_DATA_HOME")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({CALIBRATIONS_ENV_VAR: str(folder), LABELS_ENV_VAR: str(data / "labels"),
                       "XDG_DATA_HOME": str(data)})
    yield folder
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def calibration_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts with an empty calibration store of its own (`$CRYSTAL_LOCATOR_CALIBRATIONS`), so that
    a session's first calibration is measured whatever ran before, and with an empty label memory and data
    folder of its own (`$CRYSTAL_LOCATOR_LABELS`, `$XDG_DATA_HOME`), so that no test learns from another one
    that ran before it in the same process (tests run in any order, also spread over pytest-xdist workers)."""
    folder = tmp_path / "calibrations"
    monkeypatch.setenv(CALIBRATIONS_ENV_VAR, str(folder))
    monkeypatch.setenv(LABELS_ENV_VAR, str(tmp_path / "user-data" / "labels"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user-data"))
    return folder


@pytest.fixture
def label_memory(tmp_path: Path) -> LabelMemory:
    """An empty label memory in `tmp_path / "labels"` (its `folder` and `path` are there to re-open or
    damage it)."""
    return LabelMemory(tmp_path / "labels")


@pytest.fixture
def operator_channel() -> Iterator[OperatorChannel]:
    """An operator channel on free loopback ports (`tcp://127.0.0.1:0`), closed after the test."""
    with OperatorChannel("tcp://127.0.0.1:0") as channel:
        yield channel


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
