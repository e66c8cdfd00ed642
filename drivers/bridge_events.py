"""The bridge's state-change events: what the server publishes, and how a client receives them.

Server side, `StatePublisher` reads the instrument state (stage position, optics preset, beam blanked)
after every call that may change it and from a poll, and publishes the topics whose state changed as
`[topic, json]` messages; from the poll, every `snapshot_s` seconds, all topics (so that a subscriber
that joins late learns the whole state). Client side, `BridgeEventSubscriber` receives them as
`BridgeEvent`s.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from drivers.auth import CurveKeyPair, configure_curve_client
from drivers.base import Microscope

logger = logging.getLogger(__name__)

#: The topics a server publishes.
TOPICS: tuple[str, ...] = ("stage", "optics", "beam")


class StatePublisher:
    """Publishes the instrument's state changes through `push` (which hands message frames to the
    server's I/O thread). `server_id` goes into every event; see the module doc for `snapshot_s`."""

    def __init__(
        self, microscope: Microscope, server_id: str, push: Callable[[list[Any]], None], snapshot_s: float
    ) -> None:
        self._microscope = microscope
        self._server_id = server_id
        self._push = push
        self._snapshot_s = float(snapshot_s)
        self._last_snapshot_s = -math.inf
        self._lock = threading.Lock()
        self._last_state: dict[str, Any] = {}
        self._seq = itertools.count(1)
        self._poll_running = threading.Event()

    def schedule_poll(self, submit: Callable[..., Any]) -> None:
        """Run one poll through `submit` (a thread pool's), unless the previous one is still running."""
        if self._poll_running.is_set():
            return
        self._poll_running.set()
        submit(self.publish_changes, True)

    def publish_changes(self, from_poll: bool = False) -> None:
        """Read the instrument state and publish the topics whose state changed since the last event."""
        try:
            state = {
                # only calls that cost nothing: the simulator charges clock time for is_stage_moving polls
                "stage": {"position": self._microscope.get_stage().model_dump(mode="json")},
                "optics": {"preset": self._microscope.get_preset()},
                "beam": {"blanked": bool(self._microscope.is_beam_blanked())},
            }
        except Exception as exc:
            logger.debug("bridge: state poll failed: %s", exc)
            return
        finally:
            if from_poll:
                self._poll_running.clear()
        with self._lock:
            now_s = time.monotonic()
            if from_poll and now_s - self._last_snapshot_s >= self._snapshot_s:
                self._last_snapshot_s = now_s
                changed = list(state)  # a full snapshot now and then, for subscribers that joined late
            else:
                changed = [topic for topic, value in state.items() if self._last_state.get(topic) != value]
            self._last_state.update(state)
            messages = [
                (topic, {"topic": topic, "seq": next(self._seq), "time_unix_s": time.time(),
                         "server_id": self._server_id, "state": state[topic]})
                for topic in changed
            ]
            for topic, payload in messages:
                self._push([b"event", topic.encode("ascii"), json.dumps(payload).encode("utf-8")])


@dataclass(frozen=True)
class BridgeEvent:
    """One state change published by the server: `topic` is stage, optics or beam."""

    topic: str
    seq: int
    time_unix_s: float
    server_id: str
    state: dict[str, Any]


class BridgeEventSubscriber:
    """Receives `BridgeEvent`s from a server's PUB socket (malformed messages are skipped)."""

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str] = TOPICS,
        *,
        curve_keys: CurveKeyPair | None = None,
        server_public_key: bytes | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.linger = 0
        self._socket.setsockopt(zmq.MAXMSGSIZE, 1024 * 1024)
        if curve_keys is not None and server_public_key is not None:
            configure_curve_client(self._socket, curve_keys, server_public_key)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._socket.connect(endpoint)

    def receive(self, timeout_s: float) -> BridgeEvent | None:
        """The next event, or None if none arrives within `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            parts = self._socket.recv_multipart()
            try:
                if len(parts) != 2:
                    raise ValueError(f"{len(parts)} parts")
                payload = json.loads(parts[1])
                event = BridgeEvent(
                    topic=str(payload["topic"]),
                    seq=int(payload["seq"]),
                    time_unix_s=float(payload["time_unix_s"]),
                    server_id=str(payload["server_id"]),
                    state=dict(payload["state"]),
                )
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("%s: skipping a malformed event (%s)", self.endpoint, exc)
                continue
            return event

    def close(self) -> None:
        """Close the subscription."""
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> BridgeEventSubscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
