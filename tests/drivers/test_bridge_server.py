"""BridgeServer + BridgeClient over real ZeroMQ sockets on 127.0.0.1, serving the simulated microscope."""

from __future__ import annotations

import functools
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from drivers.auth import CurveKeyPair
from drivers.base import (
    MICROSCOPE_METHODS,
    AuthenticationError,
    BridgeError,
    BridgeTimeout,
    Frame,
    InvalidParameterError,
    Microscope,
    MicroscopeError,
    PresetError,
    ProtocolMismatchError,
    StageLimitError,
)
from drivers.network import is_loopback_endpoint
from drivers.protocol import PROTOCOL_VERSION, encode_header, new_request
from drivers.zmq_bridge import BridgeClient, BridgeServer

LOOPBACK = "tcp://127.0.0.1:0"


@functools.cache
def _specimen() -> Any:
    """The simulated specimen, generated once per test run (generation is the slow part; it is not mutated)."""
    from simulator.specimen import generate_specimen

    return generate_specimen("protein-plates", 0)


def make_microscope() -> Microscope:
    """A fresh real simulator (own stage, clock and optics state) with a small camera for fast renders."""
    from simulator.microscope import SimulatedMicroscope

    return SimulatedMicroscope(_specimen(), seed=0, camera_shape_px=(128, 128))


class Gated:
    """The real simulator, with chosen methods held at a gate until the test opens it, and call counts.

    The simulator cannot be told to take long on purpose; this wrapper can, without changing results.
    """

    def __init__(self, inner: Microscope, gated: tuple[str, ...] = ()) -> None:
        self._inner = inner
        self._gated = set(gated)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in MICROSCOPE_METHODS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name in self._gated:
                self.entered.set()
                if not self.gate.wait(15.0):
                    raise MicroscopeError("test gate never opened")
            return attr(*args, **kwargs)

        return call


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll `condition` until true or `timeout_s` passes (bounded loop)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def microscope() -> Microscope:
    return make_microscope()


@pytest.fixture
def server(microscope: Microscope) -> Iterator[BridgeServer]:
    with BridgeServer(microscope, LOOPBACK, event_endpoint=LOOPBACK, event_poll_s=0.1, event_snapshot_s=0.2) as running:
        yield running


@pytest.fixture
def client(server: BridgeServer) -> Iterator[BridgeClient]:
    with BridgeClient(server.endpoint, timeout_s=5.0) as connected:
        yield connected


@pytest.fixture
def raw() -> Iterator[Callable[[str], zmq.Socket]]:
    """Factory of raw DEALER sockets (for speaking bad protocol on purpose)."""
    context = zmq.Context()
    sockets: list[zmq.Socket] = []

    def make(endpoint: str) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def raw_exchange(sock: zmq.Socket, parts: list[bytes], timeout_ms: int = 3000) -> dict[str, Any] | None:
    """Send `parts`, return the decoded reply header (or None if no reply within the time)."""
    sock.send_multipart(parts)
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    reply = sock.recv_multipart()
    assert reply[0] == b""
    return json.loads(reply[1])


# --------------------------------------------------------------------------------------------------
# The Microscope protocol over the wire
# --------------------------------------------------------------------------------------------------


def test_client_is_a_microscope_and_handshake_reports_server_info(
    client: BridgeClient, microscope: Microscope, server: BridgeServer
) -> None:
    assert isinstance(client, Microscope)
    assert client.server_info == microscope.info()
    assert client.server_id == server.server_id
    assert client.event_endpoint == server.event_endpoint


def test_every_protocol_method_through_the_client(client: BridgeClient, microscope: Microscope) -> None:
    assert client.info() == microscope.info()
    assert client.stage_limits() == microscope.stage_limits()
    start_time_s = client.microscope_time_s()

    client.move_stage(x_um=35.0, y_um=-20.0)
    assert client.get_stage() == microscope.get_stage()
    assert client.get_stage().x_um == pytest.approx(35.0, abs=1.0)
    client.move_stage(x_um=-10.0, wait=False)
    client.is_stage_moving()  # a bool either way; the simulator may finish at once
    client.wait_for_stage(timeout_s=30.0)
    assert not client.is_stage_moving()
    client.stop_stage()
    assert client.get_stage().x_um == pytest.approx(-10.0, abs=1.0)

    names = [p.name for p in client.info().presets]
    client.set_preset(names[-1])
    assert client.get_preset() == names[-1] == microscope.get_preset()
    client.set_preset(names[0])

    client.set_beam_blanked(True)
    assert client.is_beam_blanked() and microscope.is_beam_blanked()
    client.set_beam_blanked(False)
    assert not client.is_beam_blanked()

    frame = client.acquire(0.5)
    assert isinstance(frame, Frame) and frame.image.dtype == np.uint16
    assert frame.metadata.preset == names[0]
    assert frame.metadata.stage == client.get_stage()
    assert frame.image.std() > 0  # a real rendered image, not zeros
    assert not frame.image.flags.writeable

    diffraction = client.acquire_diffraction(0.5)
    assert diffraction.metadata.kind == "diffraction"
    assert client.get_preset() == names[0]
    assert client.microscope_time_s() > start_time_s


def test_typed_errors_cross_the_wire(client: BridgeClient) -> None:
    limits = client.stage_limits()
    with pytest.raises(StageLimitError, match="out of range"):
        client.move_stage(x_um=limits.x_max_um + 500.0)
    with pytest.raises(PresetError):
        client.set_preset("no-such-preset")
    with pytest.raises(InvalidParameterError):
        client.acquire(-1.0)  # valid type, refused by the microscope on the server
    with pytest.raises(InvalidParameterError, match="exposure_s"):
        client.acquire("long")  # type: ignore[arg-type]  # refused before sending
    assert client.get_stage() is not None  # the connection is fine afterwards


def test_numpy_scalars_are_accepted_as_arguments(client: BridgeClient) -> None:
    client.move_stage(x_um=np.float32(15.0), y_um=np.int64(-4), wait=np.bool_(True))  # type: ignore[arg-type]
    assert client.get_stage().x_um == pytest.approx(15.0, abs=1.0)
    with pytest.raises(InvalidParameterError, match="x_um"):
        client.move_stage(x_um=object())  # type: ignore[arg-type]


def test_received_frames_outlive_the_client(server: BridgeServer) -> None:
    with BridgeClient(server.endpoint, timeout_s=5.0) as client:
        frame = client.acquire(0.2)
        expected = int(frame.image.astype(np.int64).sum())
    assert int(frame.image.astype(np.int64).sum()) == expected


def test_events_follow_the_instrument(client: BridgeClient) -> None:
    with client.subscribe_events() as events:
        first = events.receive(5.0)  # the periodic poll publishes the initial state
        assert first is not None
        client.move_stage(x_um=42.0, y_um=7.0)
        client.set_beam_blanked(True)
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not (
            seen.get("stage", {}).get("position", {}).get("x_um") == pytest.approx(42.0, abs=1.0)
            and seen.get("beam", {}).get("blanked") is True
        ):
            event = events.receive(1.0)
            if event is not None:
                seen[event.topic] = event.state
        assert seen["stage"]["position"]["x_um"] == pytest.approx(42.0, abs=1.0)
        assert seen["beam"]["blanked"] is True


# --------------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------------


def _request(method: str, params: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    header = json.loads(encode_header(new_request(method, params)))
    header.update(overrides)
    return header


def test_bad_messages_get_error_replies(server: BridgeServer, raw: Callable[[str], zmq.Socket]) -> None:
    sock = raw(server.endpoint)
    cases: list[tuple[list[bytes], str]] = [
        ([b"", b"{not json"], "BridgeError"),
        ([b"", b"\xff\xfe\xfd"], "BridgeError"),
        ([b"", json.dumps(_request("explode")).encode()], "BridgeError"),
        ([b"", json.dumps(_request("acquire", {"exposure_s": "ten"})).encode()], "InvalidParameterError"),
        ([b"", json.dumps(_request("move_stage", {"x_um": True})).encode()], "InvalidParameterError"),
        ([b"", json.dumps(_request("get_stage", protocol_version=PROTOCOL_VERSION + 7)).encode()],
         "ProtocolMismatchError"),
        ([b"", json.dumps(_request("get_stage")).encode(), b"unexpected frame"], "BridgeError"),
        ([b"", json.dumps(_request("get_stage", arrays=[{"dtype": "uint16", "shape": [1], "frame_index": 0}])).encode(),
          b"\0\0"], "BridgeError"),
    ]
    for parts, expected in cases:
        reply = raw_exchange(sock, parts)
        assert reply is not None, parts
        assert reply["ok"] is False and reply["error"]["type"] == expected, (parts, reply)
    # a request id that can be read comes back, so a client can match the error to its call
    header = _request("acquire", {"exposure_s": []})
    reply = raw_exchange(sock, [b"", json.dumps(header).encode()])
    assert reply is not None and reply["request_id"] == header["request_id"]


def test_seeded_fuzz_leaves_the_server_serving(server: BridgeServer, raw: Callable[[str], zmq.Socket]) -> None:
    rng = random.Random(1234)
    valid = json.dumps(_request("get_stage")).encode()
    sock = raw(server.endpoint)
    for _ in range(300):
        choice = rng.randrange(6)
        if choice == 0:
            parts = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))]
        elif choice == 1:
            cut = rng.randrange(len(valid))
            parts = [b"", valid[:cut]]
        elif choice == 2:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
            parts = [b"", bytes(mutated)]
        elif choice == 3:
            parts = [b"", valid, *[b"x" * rng.randrange(10) for _ in range(rng.randrange(1, 4))]]
        elif choice == 4:
            header = _request("get_stage")
            header["method"] = rng.choice([*MICROSCOPE_METHODS, "nope", "", 7, None])
            header["params"] = {rng.choice(["x_um", "name", "exposure_s", "blanked"]): rng.choice(
                [None, 1, -1e300, "s", [1], {"a": 1}, True])}
            parts = [b"", json.dumps(header).encode()]
        else:
            parts = [b"", json.dumps(rng.choice([[], 1, "x", None, {"protocol_version": 1}])).encode()]
        sock.send_multipart(parts)
    # drain whatever came back, bounded
    while sock.poll(200, zmq.POLLIN):
        sock.recv_multipart()
    assert server.running
    with BridgeClient(server.endpoint, timeout_s=5.0) as client:
        assert client.get_stage() is not None
    # no fuzzed request may have moved the stage to a non-finite or out-of-range place
    assert server.stats.requests >= 300


def test_oversize_request_is_dropped_and_the_server_keeps_serving(
    microscope: Microscope, raw: Callable[[str], zmq.Socket]
) -> None:
    with BridgeServer(microscope, LOOPBACK, max_message_bytes=64 * 1024) as server:
        big = raw(server.endpoint)
        assert raw_exchange(big, [b"", b"{" + b" " * (256 * 1024) + b"}"], timeout_ms=500) is None
        with BridgeClient(server.endpoint, timeout_s=5.0) as client:
            assert client.get_stage() is not None


def test_non_loopback_bind_requires_curve(microscope: Microscope) -> None:
    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("ipc:///tmp/x")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5555") and not is_loopback_endpoint("tcp://*:5555")
    with pytest.raises(BridgeError, match="CURVE"):
        BridgeServer(microscope, "tcp://0.0.0.0:0")
    with pytest.raises(BridgeError, match="CURVE"):
        BridgeServer(microscope, LOOPBACK, event_endpoint="tcp://*:0")
    keys = CurveKeyPair.generate()
    with pytest.raises(AuthenticationError, match="allow-list"):
        BridgeServer(microscope, "tcp://0.0.0.0:0", curve=keys)
    BridgeServer(microscope, "tcp://0.0.0.0:0", curve=keys, allowed_client_keys=[CurveKeyPair.generate().public])


# --------------------------------------------------------------------------------------------------
# Timeouts, reconnect, at-most-once
# --------------------------------------------------------------------------------------------------


def test_client_times_out_and_survives_a_server_restart(microscope: Microscope) -> None:
    first = BridgeServer(microscope, LOOPBACK).start()
    endpoint = first.endpoint
    client = BridgeClient(endpoint, timeout_s=0.3, retries=1)
    try:
        client.move_stage(x_um=12.0)
        first.stop()
        with pytest.raises(BridgeTimeout, match=r"no answer from .* to get_stage within 0.3 s \(2 attempts\)"):
            client.get_stage()
        assert client.reconnects >= 1
        with BridgeServer(microscope, endpoint, event_endpoint=LOOPBACK) as second:
            assert client.get_stage().x_um == pytest.approx(12.0, abs=1.0)
            assert client.server_id == second.server_id != first.server_id
            assert client.event_endpoint == second.event_endpoint  # the handshake was refreshed
    finally:
        client.close()
        first.stop()


def test_handshake_timeout_is_a_clear_bridge_timeout() -> None:
    with zmq.Context() as context, context.socket(zmq.ROUTER) as silent:
        silent.linger = 0
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(BridgeTimeout, match="bridge serve"):
            BridgeClient(f"tcp://127.0.0.1:{port}", timeout_s=0.2, retries=0)


def test_protocol_mismatch_at_handshake_is_clear() -> None:
    """A peer that answers with another protocol version (a newer server) is refused clearly."""
    with zmq.Context() as context, context.socket(zmq.ROUTER) as other:
        other.linger = 0
        port = other.bind_to_random_port("tcp://127.0.0.1")

        def answer() -> None:
            if other.poll(5000, zmq.POLLIN):
                identity, _, header = other.recv_multipart()[:3]
                request_id = json.loads(header)["request_id"]
                other.send_multipart([identity, b"", json.dumps(
                    {"protocol_version": PROTOCOL_VERSION + 1, "request_id": request_id, "ok": True}).encode()])

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ProtocolMismatchError, match="protocol"):
            BridgeClient(f"tcp://127.0.0.1:{port}", timeout_s=5.0, retries=0)
        thread.join(10.0)


def test_a_move_is_not_run_twice_when_the_client_resends_it() -> None:
    gated = Gated(make_microscope(), gated=("move_stage",))
    with BridgeServer(gated, LOOPBACK) as server:  # type: ignore[arg-type]
        client = BridgeClient(server.endpoint, timeout_s=5.0, retries=20, method_timeouts_s={"move_stage": 0.2})
        try:
            done: list[BaseException | None] = []
            thread = threading.Thread(target=lambda: done.append(_capture(lambda: client.move_stage(x_um=55.0))))
            thread.start()
            assert wait_until(lambda: server.stats.replayed >= 2)  # the client has resent at least twice
            gated.gate.set()
            thread.join(15.0)
            assert done == [None]
            assert gated.calls["move_stage"] == 1
            assert client.get_stage().x_um == pytest.approx(55.0, abs=1.0)
        finally:
            client.close()


def _capture(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def test_resent_request_id_gets_the_stored_reply(server: BridgeServer, raw: Callable[[str], zmq.Socket]) -> None:
    header = new_request("move_stage", {"x_um": 20.0}, idempotent=False)
    message = [b"", encode_header(header)]
    first = raw_exchange(raw(server.endpoint), message)
    again = raw_exchange(raw(server.endpoint), message)  # a new socket, as after a lazy-pirate reconnect
    assert first is not None and again is not None and first == again and first["ok"]
    assert server.stats.executed["move_stage"] == 1
    assert server.stats.replayed == 1


def test_a_resend_after_its_reply_was_discarded_is_refused_not_executed(
    microscope: Microscope, raw: Callable[[str], zmq.Socket]
) -> None:
    with BridgeServer(microscope, LOOPBACK, reply_cache_size=1) as server:
        sock = raw(server.endpoint)
        first = [b"", encode_header(new_request("move_stage", {"x_um": 1.0}, idempotent=False))]
        second = [b"", encode_header(new_request("move_stage", {"x_um": 2.0}, idempotent=False))]
        assert raw_exchange(sock, first)["ok"]  # type: ignore[index]
        assert raw_exchange(sock, second)["ok"]  # type: ignore[index]  # evicts the first reply
        late = raw_exchange(sock, first)
        assert late is not None and not late["ok"] and "NOT run" in late["error"]["message"]
        assert server.stats.executed["move_stage"] == 2
        assert microscope.get_stage().x_um == pytest.approx(2.0, abs=1.0)


def test_a_resend_to_a_restarted_server_is_refused_not_executed(
    server: BridgeServer, raw: Callable[[str], zmq.Socket]
) -> None:
    header = new_request("move_stage", {"x_um": 30.0}, idempotent=False, server_id=uuid.uuid4().hex)
    reply = raw_exchange(raw(server.endpoint), [b"", encode_header(header)])
    assert reply is not None and reply["error"]["type"] == "BridgeError" and "NOT run" in reply["error"]["message"]
    assert server.stats.executed["move_stage"] == 0


# --------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------


def test_slow_exposure_does_not_block_status_from_another_client() -> None:
    gated = Gated(make_microscope(), gated=("acquire",))
    with BridgeServer(gated, LOOPBACK) as server:  # type: ignore[arg-type]
        slow = BridgeClient(server.endpoint, timeout_s=5.0)
        fast = BridgeClient(server.endpoint, timeout_s=5.0)
        mover = BridgeClient(server.endpoint, timeout_s=5.0)
        try:
            result: list[object] = []
            exposure = threading.Thread(target=lambda: result.append(slow.acquire(0.1)))
            exposure.start()
            assert gated.entered.wait(10.0)
            # status queries are answered while the exposure is held open
            for _ in range(20):
                fast.get_stage()
                fast.is_stage_moving()
                fast.get_preset()
            fast.stop_stage()  # the stop path is never queued behind a control call
            # a second control call waits its turn: it must not run while the exposure runs
            move = threading.Thread(target=lambda: mover.move_stage(x_um=5.0))
            move.start()
            time.sleep(0.2)
            assert gated.calls["move_stage"] == 0 and exposure.is_alive()
            gated.gate.set()
            exposure.join(15.0)
            move.join(15.0)
            assert isinstance(result[0], Frame)
            assert gated.calls["move_stage"] == 1
        finally:
            gated.gate.set()
            for c in (slow, fast, mover):
                c.close()


def test_a_full_queue_answers_busy_instead_of_growing() -> None:
    gated = Gated(make_microscope(), gated=("acquire",))
    with BridgeServer(gated, LOOPBACK, max_pending=1) as server:  # type: ignore[arg-type]
        holder = BridgeClient(server.endpoint, timeout_s=5.0)
        other = BridgeClient(server.endpoint, timeout_s=5.0, retries=0)
        try:
            exposure = threading.Thread(target=lambda: holder.acquire(0.1))
            exposure.start()
            assert gated.entered.wait(10.0)
            with pytest.raises(BridgeError, match="busy"):
                other.get_stage()
            gated.gate.set()
            exposure.join(15.0)
            assert other.get_stage() is not None  # served again once the queue drained
        finally:
            gated.gate.set()
            holder.close()
            other.close()


# --------------------------------------------------------------------------------------------------
# CURVE
# --------------------------------------------------------------------------------------------------


def test_curve_allowed_key_works_and_unknown_keys_get_nothing(microscope: Microscope) -> None:
    server_keys, allowed, stranger = CurveKeyPair.generate(), CurveKeyPair.generate(), CurveKeyPair.generate()
    with BridgeServer(microscope, LOOPBACK, curve=server_keys, allowed_client_keys=[allowed.public],
                      event_endpoint=LOOPBACK, event_poll_s=0.1, event_snapshot_s=0.2) as server:
        with BridgeClient(server.endpoint, timeout_s=5.0, curve_keys=allowed,
                          server_public_key=server_keys.public) as client:
            assert client.get_stage() is not None
            with client.subscribe_events() as events:
                assert events.receive(5.0) is not None  # encrypted events reach an allowed client
        served = server.stats.requests
        with pytest.raises(AuthenticationError, match="allow-list"):
            BridgeClient(server.endpoint, timeout_s=0.5, retries=0, curve_keys=stranger,
                         server_public_key=server_keys.public)
        with pytest.raises(AuthenticationError):
            BridgeClient(server.endpoint, timeout_s=0.5, retries=0)  # no CURVE at all
        assert server.stats.requests == served  # nothing from the refused clients reached the handler


@pytest.mark.skipif(os.name != "posix", reason="ipc:// endpoints are Unix sockets")
def test_stop_removes_only_the_socket_file_it_bound(microscope: Microscope, tmp_path: Path) -> None:
    path = tmp_path / "bridge.sock"
    with BridgeServer(microscope, f"ipc://{path}") as server:
        assert server.endpoint == f"ipc://{path}" and path.is_socket()
    assert not path.exists()
    # a file put at the path after binding is someone else's: it stays
    server = BridgeServer(microscope, f"ipc://{path}").start()
    path.unlink()
    path.write_text("another program's file")
    server.stop()
    assert path.read_text() == "another program's file"
