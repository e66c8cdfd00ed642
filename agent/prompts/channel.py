"""The agent's end of the prompt protocol: `OperatorChannel` asks, `PromptHandle` follows one prompt.

The agent asks a person a question (e.g. "which of these clusters contain crystals?") without ever
blocking on the answer: `OperatorChannel.ask(prompt)` publishes the prompt and returns a
`PromptHandle` at once; the screening loop polls the handle (or waits at most until the prompt's
deadline) and falls back to its own policy when nobody answers in time. The messages are described in
`agent.prompts.wire`; off loopback the channel needs CURVE keys (`agent.prompts.endpoints`).

Threads: the channel runs its sockets in one background thread; `ask`, handles and `close` are safe
to call from any thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

import zmq

from agent.prompts.book import PromptBook, PromptRecord
from agent.prompts.endpoints import AllowedKeys, event_endpoint_for, server_curve
from agent.prompts.errors import AnswerRefusedError, OperatorError, PromptNotFoundError
from agent.prompts.requests import (
    decode_request_frame,
    refusal_reply,
    request_id_of,
    split_envelope,
    validate_request,
)
from agent.prompts.wire import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    TOPIC_CLOSED,
    TOPIC_PROMPT,
    TOPIC_SYNC,
    Answer,
    AnswerReply,
    Prompt,
    PromptInfo,
    PromptState,
    Request,
    utc_now,
)
from drivers.auth import AllowListAuthenticator, CurveKeyPair, configure_curve_server

logger = logging.getLogger(__name__)


class PromptHandle:
    """What `OperatorChannel.ask` returns: follow one prompt without blocking the caller."""

    def __init__(self, channel: OperatorChannel, record: PromptRecord) -> None:
        self._channel = channel
        self._record = record

    @property
    def id(self) -> str:
        """The prompt id."""
        return self._record.prompt.id

    @property
    def prompt(self) -> Prompt:
        """The prompt as asked."""
        return self._record.prompt

    @property
    def deadline_utc(self) -> datetime:
        """When the prompt expires (UTC)."""
        return self._record.deadline_utc

    def seconds_left(self) -> float:
        """Seconds until the deadline (0 once passed)."""
        return self._record.seconds_left()

    @property
    def state(self) -> PromptState:
        """The prompt's state: "open", "answered", "expired" (deadline passed unanswered) or "cancelled"."""
        self._channel._expire_due()
        return self._record.state

    @property
    def answer(self) -> Answer | None:
        """The winning answer, or None while open / if it expired or was cancelled."""
        return self._record.answer

    def wait(self, timeout_s: float | None = None) -> Answer | None:
        """Wait up to `timeout_s` seconds (None: until the deadline) for an answer; never past the deadline.

        Returns the answer, or None if none came in time (check `state` for "expired").
        """
        limit_s = self._record.seconds_left() if timeout_s is None else min(timeout_s, self._record.seconds_left())
        self._record.closed.wait(max(0.0, limit_s))
        self._channel._expire_due()
        return self._record.answer

    def cancel(self) -> bool:
        """Withdraw the prompt (clients are told). True if it was open, False if already closed."""
        return self._channel._close(self.id, "cancelled")

    def __repr__(self) -> str:
        return f"PromptHandle(id={self.id!r}, state={self._record.state!r})"


class OperatorChannel:
    """The agent's end: binds a ROUTER (requests/answers) and a PUB (prompts, closed notices) socket.

    `endpoint` is the ROUTER address (port 0: any free port; `prompt_endpoint` gives the real one);
    `event_endpoint` the PUB address (default: same host, any free port; clients learn it with a
    "hello" request). Listening on a non-loopback address requires CURVE (as `drivers.auth` does it
    for the bridge): `curve` (the server key pair or its `.key_secret` file) and
    `allowed_client_keys` (client public keys, `.key` files or folders of them). `require_curve=True`
    forces CURVE on loopback too.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:0",
        *,
        event_endpoint: str | None = None,
        curve: CurveKeyPair | str | os.PathLike[str] | None = None,
        allowed_client_keys: AllowedKeys | None = None,
        require_curve: bool = False,
    ) -> None:
        event_endpoint = event_endpoint or event_endpoint_for(endpoint)
        server_keys, allowed = server_curve((endpoint, event_endpoint), curve, allowed_client_keys, require_curve)
        self._book = PromptBook()
        self._outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._auth: Any = None
        #: Prompts asked, answered, expired, cancelled, and requests refused.
        self.stats: dict[str, int] = self._book.stats
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        try:
            self._bind(endpoint, event_endpoint, server_keys, allowed)
        except zmq.ZMQError as exc:
            self._shutdown_sockets()
            raise OperatorError(f"cannot bind operator channel on {endpoint} / {event_endpoint}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="operator-channel", daemon=True)
        self._thread.start()
        logger.info("operator channel: prompts on %s, events on %s", self.prompt_endpoint, self.event_endpoint)

    def _bind(
        self, endpoint: str, event_endpoint: str, server_keys: CurveKeyPair | None, allowed: frozenset[bytes]
    ) -> None:
        """Create and bind the ROUTER and PUB sockets (with CURVE when `server_keys`) and the wake-up pair."""
        self._router = self._context.socket(zmq.ROUTER)
        self._pub = self._context.socket(zmq.PUB)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if server_keys is not None:
            self._auth = AllowListAuthenticator(self._context, allowed)
            self._auth.start()
            configure_curve_server(self._router, server_keys)
            configure_curve_server(self._pub, server_keys)
        self._router.bind(endpoint)
        self._pub.bind(event_endpoint)
        self.prompt_endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.event_endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        wake_address = f"inproc://operator-wake-{uuid.uuid4().hex}"
        self._wake_pull = self._context.socket(zmq.PULL)
        self._wake_pull.bind(wake_address)
        self._wake_push = self._context.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.connect(wake_address)
        self._wake_lock = threading.Lock()

    # -- public API --------------------------------------------------------------------------------

    def ask(self, prompt: Prompt) -> PromptHandle:
        """Publish `prompt` and return its handle at once (never blocks on the answer).

        Raises `OperatorError` if the channel is closed or a prompt with the same id was asked before.
        """
        if self._stop.is_set():
            raise OperatorError("the operator channel is closed; create a new OperatorChannel")
        asked_utc = utc_now()
        deadline_utc = prompt.deadline_utc or asked_utc + timedelta(seconds=prompt.timeout_s)
        record = PromptRecord(prompt, asked_utc, deadline_utc)
        info = self._book.add(record)
        self._publish([TOPIC_PROMPT, info.model_dump_json().encode(), *prompt.images.values()])
        self._notify("asked", info.model_dump(mode="json"))
        logger.info("prompt %s asked (%s, %.0f s): %s", prompt.id, prompt.kind, record.seconds_left(), prompt.question)
        return PromptHandle(self, record)

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call `listener(kind, payload)` on every change: kind "asked" (payload: the PromptInfo as JSON,
        without images) or "closed" (the PromptClosed notice as JSON). It runs in the thread that made
        the change and must be quick; its exceptions are logged and ignored."""
        self._listeners.append(listener)

    def _notify(self, kind: str, payload: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, payload)
            except Exception:
                logger.exception("operator channel: listener %r failed on %s", listener, kind)

    def open_prompts(self) -> list[PromptInfo]:
        """The prompts open now (without images)."""
        self._expire_due()
        return self._book.open_infos()

    def handle(self, prompt_id: str) -> PromptHandle:
        """The handle of a prompt asked on this channel; `PromptNotFoundError` if unknown."""
        record = self._book.get(prompt_id)
        if record is None:
            raise PromptNotFoundError(f"no prompt {prompt_id!r} on this channel", prompt_id)
        return PromptHandle(self, record)

    def close(self) -> None:
        """Cancel open prompts (clients are told), stop the thread and close the sockets. Idempotent."""
        if self._stop.is_set():
            return
        for prompt_id in self._book.open_ids():
            self._close(prompt_id, "cancelled")
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5.0)
        self._shutdown_sockets()

    def __enter__(self) -> OperatorChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- state changes (any thread) ----------------------------------------------------------------

    def _close(self, prompt_id: str, state: Literal["expired", "cancelled"]) -> bool:
        notice = self._book.close(prompt_id, state)
        if notice is None:
            return False
        logger.info("prompt %s %s", prompt_id, state)
        self._publish([TOPIC_CLOSED, notice.model_dump_json().encode()])
        self._notify("closed", notice.model_dump(mode="json"))
        return True

    def _expire_due(self) -> None:
        for prompt_id in self._book.due_ids(time.monotonic()):
            self._close(prompt_id, "expired")

    def _publish(self, frames: list[bytes]) -> None:
        self._outbox.put(frames)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(zmq.ZMQError):
            self._wake_push.send(b"", zmq.NOBLOCK)

    # -- IO thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(self._poll_timeout_ms()))
                if self._wake_pull in ready:
                    while self._wake_pull.poll(0):
                        self._wake_pull.recv()
                if self._router in ready:
                    for _ in range(100):
                        if not self._router.poll(0):
                            break
                        self._serve_one(self._router.recv_multipart())
                self._expire_due()
                self._flush_outbox()
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                logger.warning("operator channel: socket error %s; carrying on", exc)
            except Exception:  # the channel must outlive any bad message
                logger.exception("operator channel: unexpected error; carrying on")
        self._flush_outbox()

    def _poll_timeout_ms(self) -> int:
        deadline = self._book.next_deadline_monotonic()
        if deadline is None:
            return 1000
        return int(min(1000.0, max(1.0, (deadline - time.monotonic()) * 1000.0 + 1.0)))

    def _flush_outbox(self) -> None:
        while True:
            try:
                frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._pub.send_multipart(frames)

    def _serve_one(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # nothing to reply to
        envelope, rest = split_envelope(frames)
        request_id = ""
        try:
            raw = decode_request_frame(rest)
            request_id = request_id_of(raw)
            request = validate_request(raw)
            reply, images = self._dispatch(request)
            reply.update({"v": PROTOCOL_VERSION, "request_id": request.request_id, "ok": True})
        except AnswerRefusedError as exc:
            self._book.count_refused()
            logger.info("operator channel: refused request %s: %s", request_id or "?", exc)
            reply = refusal_reply(request_id, exc)
            images = []
        self._router.send_multipart([*envelope, json.dumps(reply, default=str).encode(), *images])

    def _dispatch(self, request: Request) -> tuple[dict[str, Any], list[bytes]]:
        if request.type == "sync":
            token = (request.token or "")[:64]
            self._publish([TOPIC_SYNC, json.dumps({"token": token}).encode()])
            return {"type": "sync", "token": token}, []
        if request.type == "hello":
            port = self.event_endpoint.rsplit(":", 1)[-1]
            return {
                "type": "hello",
                "event_endpoint": self.event_endpoint,
                "event_port": int(port) if port.isdigit() else None,
            }, []
        if request.type == "list":
            self._expire_due()
            listed = self._book.open_with_infos()
            images = [payload for record, _ in listed for payload in record.prompt.images.values()]
            return {"type": "list", "prompts": [info.model_dump(mode="json") for _, info in listed]}, images
        reply = self._accept_answer(request)
        return {"type": "answer", "answer": reply.model_dump(mode="json")}, []

    def _accept_answer(self, request: Request) -> AnswerReply:
        prompt_id = request.prompt_id or ""
        option_ids = list(request.option_ids or [])
        operator = (request.operator or "anonymous").strip() or "anonymous"
        self._expire_due()
        answer, notice = self._book.accept(prompt_id, option_ids, operator)
        logger.info("prompt %s answered by %s: %s", prompt_id, operator, option_ids)
        self._publish([TOPIC_CLOSED, notice.model_dump_json().encode()])
        self._notify("closed", notice.model_dump(mode="json"))
        return AnswerReply(
            prompt_id=prompt_id, option_ids=answer.option_ids, operator=operator, answered_utc=answer.answered_utc
        )

    # -- set-up / tear-down ------------------------------------------------------------------------

    def _shutdown_sockets(self) -> None:
        for name in ("_router", "_pub", "_wake_pull", "_wake_push"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._context.term()
