"""The autoloader cassette over the ZeroMQ bridge (real sockets on 127.0.0.1, the real simulator): list, load,
loaded; typed errors for bad slots; status calls answered while a load runs; a microscope without a cassette."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import simulator
from drivers.base import (
    CassetteSlot,
    GridLoadError,
    InvalidParameterError,
    MicroscopeError,
    cassette_slot_count,
)
from drivers.protocol import METHOD_SPECS, decode_value, encode_value
from drivers.zmq_bridge import BridgeClient, BridgeServer
from simulator.cassette import CassetteSpec, SimulatedCassetteMicroscope, SlotSpec
from tests.conftest import MakeMicroscope

#: Wall-clock seconds of a realtime load in the "during a load" test: long enough for a few status calls.
REALTIME_LOAD_S = 3.0


def _cassette(load_s: float = 120.0) -> CassetteSpec:
    return CassetteSpec(
        slots=(
            SlotSpec(slot=1, specimen_type="protein-plates", seed=2, options={"crystal_count": 100}, label="plates"),
            SlotSpec(slot=2, specimen_type="graphite-flakes", seed=3, options={"crystal_count": 50}),
            SlotSpec(slot=5, specimen_type="polymer-faint", seed=4, fails_to_load=True),
        ),
        seed=1, load_s=load_s, unload_s=0.0,
    )


@pytest.fixture
def served() -> Iterator[tuple[SimulatedCassetteMicroscope, BridgeClient]]:
    scope = simulator.create_simulated_microscope(cassette=_cassette(), camera_shape_px=(64, 64))
    assert isinstance(scope, SimulatedCassetteMicroscope)
    with BridgeServer(scope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint, timeout_s=5.0) as client:
        yield scope, client


def test_cassette_slots_travel_as_tagged_values() -> None:
    slots = (CassetteSlot(slot=1, state="loaded", label="a"), CassetteSlot(slot=2, state="empty"))
    wire, arrays = encode_value(slots)
    assert wire == {"$type": "CassetteSlots", "value": [s.model_dump(mode="json") for s in slots]} and arrays == []
    assert decode_value(wire, []) == slots
    assert METHOD_SPECS["load_grid"].kind == "control" and not METHOD_SPECS["load_grid"].idempotent
    assert METHOD_SPECS["cassette_slots"].kind == METHOD_SPECS["loaded_slot"].kind == "read"


def test_list_load_and_loaded_over_the_bridge(served: tuple[SimulatedCassetteMicroscope, BridgeClient]) -> None:
    scope, client = served
    assert client.info().cassette_slots == 12 and cassette_slot_count(client) == 12
    slots = client.cassette_slots()
    assert slots == scope.cassette_slots() and len(slots) == 12
    assert (slots[0].state, slots[0].label, slots[2].state) == ("occupied", "plates", "empty")
    assert client.loaded_slot() is None
    t0 = client.microscope_time_s()
    client.load_grid(2)
    assert client.loaded_slot() == 2 == scope.loaded_slot()
    assert client.microscope_time_s() - t0 == pytest.approx(120.0)
    assert client.cassette_slots()[1].state == "loaded"
    assert client.acquire(0.1).metadata.extra["specimen"] == "graphite-flakes"
    client.load_grid(2)  # the slot already loaded: nothing happens
    assert scope.load_counts() == {2: 1}


def test_bad_slots_over_the_bridge(served: tuple[SimulatedCassetteMicroscope, BridgeClient]) -> None:
    scope, client = served
    client.load_grid(1)
    with pytest.raises(GridLoadError, match="slot 3 is empty"):
        client.load_grid(3)
    assert client.loaded_slot() == 1
    for bad in (0, 13, "3", 1.0, True):
        with pytest.raises(InvalidParameterError):
            client.load_grid(bad)  # type: ignore[arg-type]
    assert client.loaded_slot() == 1 and scope.load_counts() == {1: 1}
    with pytest.raises(GridLoadError, match="slot 5 failed"):
        client.load_grid(5)
    assert client.loaded_slot() is None and client.cassette_slots()[4].state == "unknown"


def test_status_calls_are_answered_while_a_load_runs() -> None:
    scope = simulator.create_simulated_microscope(cassette=_cassette(load_s=REALTIME_LOAD_S), realtime=True,
                                                  camera_shape_px=(64, 64))
    with (
        BridgeServer(scope, "tcp://127.0.0.1:0") as server,
        BridgeClient(server.endpoint, timeout_s=5.0) as loader,
        BridgeClient(server.endpoint, timeout_s=5.0) as watcher,
    ):
        errors: list[BaseException] = []

        def load() -> None:
            try:
                loader.load_grid(1)
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=load)
        thread.start()
        answered_during_load = []
        for _ in range(200):  # bounded: a few status calls while the load thread is still inside load_grid
            if not thread.is_alive():
                break
            answered = (watcher.loaded_slot(), watcher.cassette_slots()[0].state, watcher.get_stage())
            if thread.is_alive():
                answered_during_load.append(answered)
        thread.join(timeout=30.0)
        assert not thread.is_alive() and errors == []
        assert answered_during_load, "no status call was answered while the load ran"
        assert all(slot is None and state == "occupied" for slot, state, _ in answered_during_load)
        assert watcher.loaded_slot() == 1


def test_a_microscope_without_a_cassette_answers_with_a_clear_error(simulated_microscope: MakeMicroscope) -> None:
    scope = simulated_microscope(camera_px=64)
    with BridgeServer(scope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint, timeout_s=5.0) as client:
        assert client.info().cassette_slots == 0 and cassette_slot_count(client) == 0
        for name, call in (("cassette_slots", client.cassette_slots), ("loaded_slot", client.loaded_slot),
                           ("load_grid", lambda: client.load_grid(1))):
            with pytest.raises(MicroscopeError, match=f"has no {name} "):
                call()
        assert client.get_stage() is not None  # the connection is fine afterwards
