"""Fixtures shared by the test rooms: simulated microscopes, a label memory, operator channels, free ports.

Everything here is real (the simulator, the label log on disk, ZeroMQ sockets on 127.0.0.1); the fixtures
only save each test from repeating the same set-up.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.prompts import LabelMemory, OperatorChannel
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
