"""Session events out, session control in: what consoles and logs follow, over ZeroMQ and in-process.

`EventBus` fans every event of a screening session out to in-process listeners (the terminal progress
display, the web console) and, when given an endpoint, to a ZeroMQ PUB socket. A message on the wire is
two frames: the topic (ASCII) and a JSON object `{"topic", "seq", "time_utc", ...payload}`.

Topics: `state` (state machine transition), `progress` (counts and microscope time), `target` (one
target's outcome), `journal` (a journal line), `atlas` (a new heat map is available), `prompt` (a prompt
was asked / closed), `summary` (the session summary).

`ControlServer` answers JSON requests on a ROUTER socket: `{"command": "pause" | "resume" | "abort" |
"status"}` -> `{"ok": true, "state": ..., **info}` or `{"ok": false, "error": ...}`; garbage gets an error
reply and the server keeps serving. `info` is what a console needs to attach to the session: the
screen command puts `session_dir`, `events_endpoint` and `prompt_endpoint` there. Both bind 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

import zmq

from drivers.network import require_loopback

logger = logging.getLogger(__name__)

EventListener = Callable[[str, dict[str, Any]], None]

TOPICS = ("state", "progress", "target", "journal", "atlas", "prompt", "summary")


class EventBus:
    """Publishes session events to listeners and (optionally) a PUB socket. Thread-safe."""

    def __init__(self, endpoint: str | None = None) -> None:
        self._listeners: list[EventListener] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._socket: zmq.Socket[bytes] | None = None
        self.endpoint: str | None = None
        self.history: dict[str, dict[str, Any]] = {}
        if endpoint is not None:
            require_loopback(endpoint, "the event publisher")
            context = zmq.Context.instance()
            self._socket = context.socket(zmq.PUB)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, 10000)
            self._socket.bind(endpoint)
            self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def subscribe(self, listener: EventListener) -> None:
        """Call `listener(topic, event)` for every event from now on (exceptions are logged, not raised)."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: EventListener) -> None:
        """Stop calling `listener`."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def publish(self, topic: str, **payload: Any) -> dict[str, Any]:
        """Send one event; returns it (with `topic`, `seq` and `time_utc` added)."""
        with self._lock:
            self._seq += 1
            event = {
                "topic": topic,
                "seq": self._seq,
                "time_utc": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                **payload,
            }
            self.history[topic] = event
            listeners = list(self._listeners)
            if self._socket is not None:
                try:
                    data = json.dumps(event, default=str).encode()
                    self._socket.send_multipart([topic.encode(), data], flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # a full queue must never stop the session
                    logger.debug("event %s dropped: %s", topic, exc)
        for listener in listeners:
            try:
                listener(topic, event)
            except Exception:
                logger.exception("event listener failed on %s", topic)
        return event

    def close(self) -> None:
        """Close the PUB socket (listeners stay registered)."""
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None


class Controllable(Protocol):
    """What `ControlServer` controls (implemented by `agent.screening.ScreeningSession`)."""

    state: str

    def request_pause(self) -> None: ...
    def request_resume(self) -> None: ...
    def request_abort(self) -> None: ...


class ControlServer:
    """Serves pause / resume / abort / status on a ROUTER socket in a background thread."""

    def __init__(
        self, target: Controllable, endpoint: str = "tcp://127.0.0.1:0", info: dict[str, Any] | None = None
    ) -> None:
        require_loopback(endpoint, "the control server")
        self._target = target
        self.info: dict[str, Any] = dict(info or {})
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="session-control", daemon=True)
        self._thread.start()

    def _handle(self, payload: bytes) -> dict[str, Any]:
        try:
            request = json.loads(payload)
            command = request["command"] if isinstance(request, dict) else None
        except (ValueError, KeyError):
            return {"ok": False, "error": 'malformed request: send JSON {"command": ...}'}
        actions = {
            "pause": self._target.request_pause,
            "resume": self._target.request_resume,
            "abort": self._target.request_abort,
            "status": lambda: None,
        }
        if not isinstance(command, str) or command not in actions:
            return {"ok": False, "error": f"unknown command {command!r}; use one of {sorted(actions)}"}
        actions[command]()
        return {"ok": True, "command": command, "state": self._target.state, **self.info}

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(100)):
                continue
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) < 2:
                continue
            identity, payload = frames[0], frames[-1]
            try:
                reply = self._handle(payload)
            except Exception as exc:  # the control socket keeps serving whatever a request does
                logger.exception("control request failed")
                reply = {"ok": False, "error": f"the request failed: {type(exc).__name__}: {exc}"}
            try:
                self._socket.send_multipart([identity, b"", json.dumps(reply).encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                logger.debug("control reply dropped")
        self._socket.close(linger=0)

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()
        self._thread.join(timeout=2.0)


def send_control(endpoint: str, command: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """Send one control command to a `ControlServer` and return its reply; TimeoutError if none."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send_multipart([b"", json.dumps({"command": command}).encode()])
        if not socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s")
        return dict(json.loads(socket.recv_multipart()[-1]))
    finally:
        socket.close(linger=0)
