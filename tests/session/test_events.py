"""Session events over a real PUB socket and session control over a real ROUTER socket (loopback)."""

from __future__ import annotations

import json
import time

import pytest
import zmq

from agent.session.events import ControlServer, EventBus, send_control
from drivers.network import require_loopback


def test_events_reach_listeners_and_subscribers() -> None:
    bus = EventBus("tcp://127.0.0.1:0")
    seen: list[str] = []
    bus.subscribe(lambda topic, event: seen.append(topic))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(bus.endpoint)
    try:
        received = None
        for _ in range(50):  # slow joiner: publish until the subscriber is connected
            bus.publish("state", state="mapping")
            if sub.poll(100):
                received = sub.recv_multipart()
                break
        assert received is not None
        assert received[0] == b"state" and json.loads(received[1])["state"] == "mapping"
        assert "state" in seen and bus.history["state"]["state"] == "mapping"
    finally:
        sub.close()
        bus.close()


def test_a_failing_listener_does_not_stop_publishing() -> None:
    bus = EventBus()
    got: list[int] = []

    def broken(topic: str, event: dict) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(lambda topic, event: got.append(event["seq"]))
    bus.publish("progress", n=1)
    assert got == [1]


class _Target:
    state = "mapping"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def request_pause(self) -> None:
        self.calls.append("pause")

    def request_resume(self) -> None:
        self.calls.append("resume")

    def request_abort(self) -> None:
        self.calls.append("abort")


def test_control_server_obeys_and_survives_garbage() -> None:
    target = _Target()
    server = ControlServer(target)
    try:
        assert send_control(server.endpoint, "pause")["ok"] is True
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(server.endpoint)
        raw.send_multipart([b"", b"\xff\x00garbage"])
        assert raw.poll(3000)
        assert json.loads(raw.recv_multipart()[-1])["ok"] is False
        for not_a_name in (b'{"command": ["pause"]}', b'{"command": {}}', b"[1, 2]"):
            raw.send_multipart([b"", not_a_name])
            assert raw.poll(3000)
            assert json.loads(raw.recv_multipart()[-1])["ok"] is False
        raw.close()
        reply = send_control(server.endpoint, "explode")
        assert reply["ok"] is False and "unknown command" in reply["error"]
        assert send_control(server.endpoint, "abort")["ok"] is True
        assert target.calls == ["pause", "abort"]
    finally:
        server.close()
    time.sleep(0.05)


def test_only_loopback_endpoints_are_allowed() -> None:
    require_loopback("tcp://127.0.0.1:5555", "the event publisher")
    with pytest.raises(ValueError, match="loopback"):
        require_loopback("tcp://0.0.0.0:5555", "the event publisher")
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        require_loopback("127.0.0.1:5555", "the event publisher")
