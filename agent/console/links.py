"""How the console reaches an agent: in the same process (`LocalLink`) or over ZeroMQ (`RemoteLink`).

Both feed a `ConsoleHub` and offer the same two actions, `control(command)` (pause / resume / abort)
and `answer(prompt_id, option_ids, operator)`. Prompts always go through an `OperatorClient` on the
agent's prompt channel, so the console is just one more operator client: first valid answer wins, the
agent's unattended fallback is unchanged.

`RemoteLink` attaches from ONE endpoint, the agent's control socket: its `status` reply names the
session folder, the event (PUB) endpoint and the prompt endpoint. It asks for status every
`status_interval_s` seconds, so it notices an agent that stopped (the page says "agent unreachable")
and re-attaches, with fresh sockets, when the agent comes back (even on other ports).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from agent.console.hub import ConsoleHub
from agent.prompts import (
    AnswerReply,
    OperatorClient,
    OperatorError,
    PromptClosed,
    PromptInfo,
)
from agent.session.events import send_control

logger = logging.getLogger(__name__)

CONTROL_COMMANDS = ("pause", "resume", "abort")


class LinkError(Exception):
    """The agent cannot be reached or has no prompt channel; the message says what to do."""


class AgentLink(Protocol):
    """What the web server needs from an agent connection."""

    hub: ConsoleHub

    def control(self, command: str) -> dict[str, Any]: ...
    def answer(self, prompt_id: str, option_ids: Sequence[str], operator: str) -> AnswerReply: ...
    def close(self) -> None: ...


class PromptWorker:
    """A thread that owns one `OperatorClient`: feeds prompt events to the hub and sends answers."""

    def __init__(self, hub: ConsoleHub, prompt_endpoint: str, timeout_s: float = 3.0) -> None:
        self.hub = hub
        self.prompt_endpoint = prompt_endpoint
        self.timeout_s = timeout_s
        self._requests: queue.SimpleQueue[tuple[Callable[[OperatorClient], Any], concurrent.futures.Future[Any]]]
        self._requests = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="console-prompts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client: OperatorClient | None = None
        while not self._stop.is_set():
            if client is None:
                try:
                    client = OperatorClient(self.prompt_endpoint, timeout_s=self.timeout_s)
                except OperatorError as exc:
                    self._error = exc
                    logger.info("console: prompt channel %s not reachable yet: %s", self.prompt_endpoint, exc)
                    self._fail_pending(LinkError(f"the agent's prompt channel {self.prompt_endpoint} does not answer"))
                    self._stop.wait(1.0)
                    continue
                self._ready.set()
            try:
                self._serve_requests(client)
                event = client.next_event(timeout_s=0.05)
            except OperatorError as exc:
                logger.warning("console: prompt client error %s; reconnecting", exc)
                client.close()
                client = None
                continue
            if isinstance(event, PromptInfo):
                self.hub.prompt_opened(event.model_dump(mode="json"), dict(event.images), event.seconds_left_now())
            elif isinstance(event, PromptClosed):
                self.hub.prompt_closed(event.prompt_id, event.state, event.answered_by, list(event.option_ids))
        if client is not None:
            client.close()
        self._fail_pending(LinkError("the console is shutting down"))

    def _serve_requests(self, client: OperatorClient) -> None:
        while True:
            try:
                call, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call(client))
            except BaseException as exc:  # handed to the waiting request
                future.set_exception(exc)

    def _fail_pending(self, error: Exception) -> None:
        while True:
            try:
                _, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def answer(self, prompt_id: str, option_ids: Sequence[str], operator: str) -> AnswerReply:
        """Send an answer through the client thread; raises the client's typed refusals."""
        future: concurrent.futures.Future[AnswerReply] = concurrent.futures.Future()
        self._requests.put((lambda client: client.answer(prompt_id, list(option_ids), operator=operator), future))
        try:
            return future.result(timeout=self.timeout_s + 2.0)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise LinkError(f"no reply from the agent's prompt channel within {self.timeout_s + 2.0:.0f} s") from exc

    def close(self) -> None:
        """Stop the thread and close the client."""
        self._stop.set()
        self._thread.join(timeout=5.0)


class LocalLink:
    """The console inside the screening process: session events in-process, prompts over loopback."""

    def __init__(self, session: Any, channel: Any | None, hub: ConsoleHub | None = None) -> None:
        self.hub = hub or ConsoleHub()
        self.session = session
        self.hub.set_agent(True, getattr(session, "session_dir", None), getattr(session, "state", None))
        session_dir = getattr(session, "session_dir", None)
        if session_dir is not None and (session_dir / "journal.jsonl").exists():
            self.hub.load_session_dir(session_dir)  # a resumed session: show what happened before
        self.events = session.events
        self.events.subscribe(self.hub.on_event)
        self.prompts = PromptWorker(self.hub, channel.prompt_endpoint) if channel is not None else None

    def control(self, command: str) -> dict[str, Any]:
        """Pause, resume or abort the session (at its next step boundary)."""
        if command not in CONTROL_COMMANDS:
            raise LinkError(f"unknown command {command!r}; use one of {list(CONTROL_COMMANDS)}")
        getattr(self.session, f"request_{command}")()
        return {"ok": True, "command": command, "state": self.session.state}

    def answer(self, prompt_id: str, option_ids: Sequence[str], operator: str) -> AnswerReply:
        """Answer a prompt over the agent's prompt channel."""
        if self.prompts is None:
            raise LinkError("this session has no operator channel (started with --operator none)")
        return self.prompts.answer(prompt_id, option_ids, operator)

    def close(self) -> None:
        """Stop listening (the session goes on)."""
        self.events.unsubscribe(self.hub.on_event)
        if self.prompts is not None:
            self.prompts.close()


class RemoteLink:
    """Attaches to a running agent through its control endpoint (see the module docstring)."""

    def __init__(
        self, control_endpoint: str, hub: ConsoleHub | None = None, status_interval_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        if not control_endpoint.startswith(("tcp://", "ipc://")):
            raise LinkError(f"agent endpoint {control_endpoint!r} must look like tcp://HOST:PORT (its --control)")
        self.hub = hub or ConsoleHub()
        self.control_endpoint = control_endpoint
        self.status_interval_s = status_interval_s
        self.timeout_s = timeout_s
        self._attached: tuple[Any, Any, Any] | None = None
        self.prompts: PromptWorker | None = None
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._sub: zmq.Socket[bytes] | None = None
        self.attach_count = 0
        self._thread = threading.Thread(target=self._run, name="console-agent-link", daemon=True)
        self._thread.start()

    # -- actions ------------------------------------------------------------------------------------

    def control(self, command: str) -> dict[str, Any]:
        """Send pause / resume / abort to the agent's control socket; LinkError if it does not answer."""
        if command not in CONTROL_COMMANDS:
            raise LinkError(f"unknown command {command!r}; use one of {list(CONTROL_COMMANDS)}")
        try:
            reply = send_control(self.control_endpoint, command, timeout_s=self.timeout_s)
        except TimeoutError as exc:
            raise LinkError(f"the agent at {self.control_endpoint} does not answer; is it running?") from exc
        if not reply.get("ok"):
            raise LinkError(str(reply.get("error", "the agent refused the command")))
        return reply

    def answer(self, prompt_id: str, option_ids: Sequence[str], operator: str) -> AnswerReply:
        """Answer over the agent's prompt channel."""
        worker = self.prompts
        if worker is None:
            raise LinkError("not attached to an agent prompt channel (agent down, or started with --operator none)")
        return worker.answer(prompt_id, option_ids, operator)

    def close(self) -> None:
        """Stop the link thread and close every socket."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        if self.prompts is not None:
            self.prompts.close()
            self.prompts = None
        self._context.term()

    # -- the link thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        next_status = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_status:
                self._check_status()
                next_status = now + self.status_interval_s
            wait_ms = max(1, int((next_status - time.monotonic()) * 1000))
            sub = self._sub
            if sub is None:
                self._stop.wait(wait_ms / 1000)
                continue
            try:
                if sub.poll(min(wait_ms, 200)):
                    for _ in range(1000):
                        frames = sub.recv_multipart(zmq.NOBLOCK)
                        self._on_frames(frames)
                        if not sub.poll(0):
                            break
            except zmq.ZMQError as exc:
                logger.debug("console: event socket error %s", exc)
        if self._sub is not None:
            self._sub.close(linger=0)

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            topic = frames[0].decode("ascii")
            event = json.loads(frames[1])
            if not isinstance(event, dict):
                raise ValueError("event is not a JSON object")
        except (IndexError, UnicodeDecodeError, ValueError) as exc:
            logger.warning("console: ignoring a malformed event: %s", exc)
            return
        self.hub.on_event(topic, event)

    def _check_status(self) -> None:
        try:
            reply = send_control(self.control_endpoint, "status", timeout_s=self.timeout_s)
        except (TimeoutError, zmq.ZMQError, ValueError) as exc:
            if self.hub.agent_connected:
                logger.warning("console: agent at %s unreachable (%s); waiting for it", self.control_endpoint, exc)
                self.hub.drop_open_prompts("cancelled")
            self.hub.set_agent(False)
            return
        if not reply.get("ok"):
            self.hub.set_agent(False)
            return
        key = (reply.get("session_dir"), reply.get("events_endpoint"), reply.get("prompt_endpoint"))
        reattach = key != self._attached or not self.hub.agent_connected
        if reattach:
            self._attach(*key)
        self.hub.set_agent(True, key[0], str(reply.get("state") or "") or None)

    def _attach(self, session_dir: Any, events_endpoint: Any, prompt_endpoint: Any) -> None:
        logger.info("console: attaching to session %s (events %s, prompts %s)", session_dir, events_endpoint,
                    prompt_endpoint)
        self.attach_count += 1
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if events_endpoint:
            sub = self._context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 10000)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(str(events_endpoint))
            self._sub = sub
        if session_dir:
            self.hub.load_session_dir(str(session_dir))
        if self.prompts is not None:  # a restarted agent: new sockets, perhaps new ports; start afresh
            self.prompts.close()
            self.prompts = None
        if prompt_endpoint:
            self.prompts = PromptWorker(self.hub, str(prompt_endpoint))
        self._attached = (session_dir, events_endpoint, prompt_endpoint)
