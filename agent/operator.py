"""Operator prompts over ZeroMQ: the agent side (`OperatorChannel`) and the client API (`OperatorClient`).

The agent asks a person a question (e.g. "which of these clusters contain crystals?") without ever
blocking on the answer: `OperatorChannel.ask(prompt)` publishes the prompt and returns a
`PromptHandle` at once; the screening loop polls the handle (or waits at most until the prompt's
deadline) and falls back to its own policy when nobody answers in time.

Wire (protocol version `PROTOCOL_VERSION`; JSON headers, PNG images as raw binary frames, no pickle)
--------------------------------------------------------------------------------------------------
The channel binds two sockets, both on 127.0.0.1 by default:

* a ROUTER socket (`prompt_endpoint`): clients send requests from a DEALER socket (or REQ), one
  JSON frame each (a DEALER puts an empty delimiter frame first, as REQ does). Every request gets
  exactly one reply: `[delimiter,] reply_json, *png_frames`.

  - `{"v": 1, "type": "hello", "request_id": "..."}` -> `{"ok": true, "event_endpoint": ..., "event_port": N}`
  - `{"v": 1, "type": "list", "request_id": "..."}` -> `{"ok": true, "prompts": [PromptInfo, ...]}` plus
    the images of every open prompt as binary frames, in the order of each prompt's `image_names`.
  - `{"v": 1, "type": "answer", "request_id": "...", "prompt_id": "...", "option_ids": ["a"],
    "operator": "name"}` -> `{"ok": true, "answer": AnswerReply}` or `{"ok": false, "error": {"code":
    ..., "message": ...}}`, codes: `not_found`, `expired`, `already_answered`, `cancelled`,
    `invalid_answer`, `bad_request` (malformed JSON, unknown fields, wrong types).

* a PUB socket (`event_endpoint`): `[b"prompt", PromptInfo_json, *png_frames]` when a prompt is
  asked, `[b"closed", PromptClosed_json]` when it is answered (by whom), expires or is cancelled.

The first valid answer wins; a later one gets `already_answered` and changes nothing. A prompt whose
deadline has passed is `expired`: answers to it are refused. Malformed requests and garbage never
kill the channel: they get a `bad_request` reply (or are dropped when they cannot be replied to).

Security: binding anything but a loopback address (or ipc://) requires CURVE: a server secret key
file and a folder of allowed client public keys (`zmq.auth.create_certificates` writes both kinds).

Threads: the channel runs its sockets in one background thread; `ask`, handles and `close` are safe
to call from any thread. `OperatorClient` is for one thread (one client per thread or front-end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import zmq
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from drivers.auth import (
    AllowListAuthenticator,
    CurveKeyPair,
    configure_curve_client,
    configure_curve_server,
    load_allow_list,
    load_public_key,
)
from drivers.base import AuthenticationError

logger = logging.getLogger(__name__)

#: Version of the wire protocol described in the module docstring.
PROTOCOL_VERSION = 1
#: Largest request the ROUTER socket accepts (answers are small); bigger messages drop the peer.
MAX_REQUEST_BYTES = 256 * 1024
#: Largest PNG image a prompt may carry.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Closed prompts remembered (so that a late answer is told "expired"/"already answered").
MAX_CLOSED_PROMPTS = 2000
#: Default time a prompt stays open.
DEFAULT_PROMPT_TIMEOUT_S = 300.0

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
_TOPIC_PROMPT = b"prompt"
_TOPIC_CLOSED = b"closed"
_TOPIC_SYNC = b"sync"

PromptState = Literal["open", "answered", "expired", "cancelled"]
ErrorCode = Literal["not_found", "expired", "already_answered", "cancelled", "invalid_answer", "bad_request"]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class OperatorError(Exception):
    """Base class of every error of the operator channel and client."""


class OperatorSecurityError(OperatorError, ValueError):
    """A channel would listen off loopback without CURVE, or CURVE keys are missing/invalid."""


class OperatorProtocolError(OperatorError):
    """The peer sent something that is not this protocol (wrong version, malformed reply)."""


class OperatorTimeoutError(OperatorError, TimeoutError):
    """The agent did not reply within the client's time limit (not running, or unreachable)."""


class AnswerRefusedError(OperatorError):
    """The agent refused an answer; `code` says why (see the module docstring). Nothing changed."""

    code: str = "bad_request"

    def __init__(self, message: str, prompt_id: str | None = None) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id


class PromptNotFoundError(AnswerRefusedError):
    """No prompt with that id was ever asked on this channel (check the id; list open prompts)."""

    code = "not_found"


class PromptClosedError(AnswerRefusedError):
    """The prompt is closed (answered, expired or cancelled) and takes no more answers."""

    code = "cancelled"


class PromptExpiredError(PromptClosedError):
    """The prompt's deadline passed before this answer arrived; the agent went on without it."""

    code = "expired"


class PromptAlreadyAnsweredError(PromptClosedError):
    """Another operator answered first; the first valid answer wins."""

    code = "already_answered"


class InvalidAnswerError(AnswerRefusedError):
    """The answer names options that do not exist, too many/few options, or is malformed."""

    code = "invalid_answer"


class BadRequestError(InvalidAnswerError):
    """The request was not valid protocol JSON (wrong fields or types)."""

    code = "bad_request"


_ERRORS_BY_CODE: dict[str, type[AnswerRefusedError]] = {
    cls.code: cls
    for cls in (
        PromptNotFoundError,
        PromptClosedError,
        PromptExpiredError,
        PromptAlreadyAnsweredError,
        InvalidAnswerError,
        BadRequestError,
    )
}


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _check_json(value: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (numbers finite): {exc}") from exc
    return value


class PromptOption(BaseModel):
    """One choice of a prompt. `context` carries data for operators and tools (JSON-serialisable),
    e.g. `{"cluster_id": 2, "sample_xy_um": [[x, y], ...]}` (stage positions of typical cells)."""

    model_config = _FROZEN

    id: str = Field(min_length=1, max_length=64)
    label: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    context: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id_chars(cls, value: str) -> str:
        if value.strip() != value or any(c in value for c in ", \t\n"):
            raise ValueError(f"option id {value!r} must not contain spaces or commas")
        return value

    @field_validator("context")
    @classmethod
    def _context_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_json(value, "option context")


class _PromptBody(BaseModel):
    """Fields shared by the prompt the agent asks and the prompt a client receives."""

    model_config = _FROZEN

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    kind: str = Field(default="choice", max_length=64, description="what is asked, e.g. 'crystal-clusters'")
    question: str = Field(min_length=1, max_length=4000)
    options: tuple[PromptOption, ...] = Field(min_length=1, max_length=256)
    multiple: bool = Field(default=False, description="True if several options may be chosen together")
    context: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _unique_options(cls, value: tuple[PromptOption, ...]) -> tuple[PromptOption, ...]:
        ids = [option.id for option in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"option ids must be unique, got {ids}")
        return value

    @field_validator("context")
    @classmethod
    def _context_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_json(value, "prompt context")

    def option(self, option_id: str) -> PromptOption:
        """The option with id `option_id`; `KeyError` if there is none."""
        for option in self.options:
            if option.id == option_id:
                return option
        raise KeyError(option_id)


def _check_images(value: dict[str, bytes]) -> dict[str, bytes]:
    for name, payload in value.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"image name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
        if not isinstance(payload, (bytes, bytearray)) or not bytes(payload[:8]) == _PNG_SIGNATURE:
            raise ValueError(f"image {name!r} must be PNG bytes (use drivers.formats.images.encode_png)")
        if len(payload) > MAX_IMAGE_BYTES:
            raise ValueError(f"image {name!r} is {len(payload)} bytes; the limit is {MAX_IMAGE_BYTES}")
    return value


class Prompt(_PromptBody):
    """A question the agent asks: options, how long it stays open, PNG images (name -> bytes).

    The deadline is fixed when the prompt is asked: `timeout_s` seconds later (or `deadline_utc`
    if given, which must be timezone-aware).
    """

    timeout_s: float = Field(default=DEFAULT_PROMPT_TIMEOUT_S, gt=0, le=7 * 24 * 3600)
    deadline_utc: datetime | None = None
    images: dict[str, bytes] = Field(default_factory=dict)

    @field_validator("images")
    @classmethod
    def _images_png(cls, value: dict[str, bytes]) -> dict[str, bytes]:
        return _check_images(value)

    @field_validator("deadline_utc")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("deadline_utc must be timezone-aware (e.g. datetime.now(timezone.utc))")
        return value


class PromptInfo(_PromptBody):
    """A prompt as clients see it: the question, options, deadline and images.

    `seconds_left` was measured when the message was sent; `seconds_left_now()` counts down from the
    moment it was received (immune to clock differences between machines).
    """

    asked_utc: datetime
    deadline_utc: datetime
    seconds_left: float
    image_names: tuple[str, ...] = ()
    images: dict[str, bytes] = Field(default_factory=dict, exclude=True)
    _received_monotonic: float = PrivateAttr(default_factory=time.monotonic)

    def seconds_left_now(self) -> float:
        """Seconds until the deadline, counted from when this message arrived (>= 0)."""
        return max(0.0, self.seconds_left - (time.monotonic() - self._received_monotonic))


class PromptClosed(BaseModel):
    """Notice that a prompt closed: answered (by whom, with what), expired or cancelled."""

    model_config = _FROZEN

    prompt_id: str
    state: Literal["answered", "expired", "cancelled"]
    answered_by: str | None = None
    option_ids: tuple[str, ...] = ()
    time_utc: datetime = Field(default_factory=_utc_now)


class Answer(BaseModel):
    """The winning answer to a prompt. `latency_s`: seconds from asking to answering."""

    model_config = _FROZEN

    prompt_id: str
    option_ids: tuple[str, ...]
    operator: str
    answered_utc: datetime
    latency_s: float


class AnswerReply(BaseModel):
    """What the agent tells a client whose answer was accepted."""

    model_config = _FROZEN

    prompt_id: str
    accepted: bool = True
    option_ids: tuple[str, ...]
    operator: str
    answered_utc: datetime


class _Request(BaseModel):
    """A client request (strict: no type coercion, no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    v: int
    type: Literal["hello", "sync", "list", "answer"]
    request_id: str = Field(min_length=1, max_length=100)
    prompt_id: str | None = Field(default=None, max_length=200)
    option_ids: list[str] | None = Field(default=None, max_length=256)
    operator: str | None = Field(default=None, max_length=200)
    token: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _answer_fields(self) -> _Request:
        if self.type == "answer" and (self.prompt_id is None or self.option_ids is None):
            raise ValueError("an answer needs prompt_id and option_ids")
        return self


# --------------------------------------------------------------------------------------------------
# Endpoint and CURVE helpers
# --------------------------------------------------------------------------------------------------


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for tcp:// endpoints on a loopback address and for ipc:// / inproc:// endpoints."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    if parts.scheme != "tcp":
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def _endpoint_with_port(endpoint: str, port: int) -> str:
    """`endpoint` (tcp://HOST:PORT) with its port replaced; used to reach the PUB socket."""
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    return f"tcp://{host}:{port}"


def _event_endpoint_for(endpoint: str) -> str:
    if endpoint.startswith("tcp://"):
        return _endpoint_with_port(endpoint, 0)
    if endpoint.startswith("ipc://"):
        return endpoint + ".events"
    raise OperatorError(f"cannot derive an event endpoint from {endpoint!r}; pass event_endpoint explicitly")


def _key_pair(keys: CurveKeyPair | str | os.PathLike[str]) -> CurveKeyPair:
    """A key pair with its secret key (ours), as `drivers.auth` loads it; `OperatorSecurityError` if not."""
    try:
        pair = keys if isinstance(keys, CurveKeyPair) else CurveKeyPair.load(keys)
    except AuthenticationError as exc:
        raise OperatorSecurityError(str(exc)) from exc
    if not pair.has_secret:
        raise OperatorSecurityError("this CURVE key pair has no secret key; pass the NAME.key_secret file")
    return pair


# --------------------------------------------------------------------------------------------------
# Agent side
# --------------------------------------------------------------------------------------------------


class _Record:
    """Channel-side state of one prompt (guarded by the channel lock)."""

    def __init__(self, prompt: Prompt, asked_utc: datetime, deadline_utc: datetime) -> None:
        self.prompt = prompt
        self.asked_utc = asked_utc
        self.deadline_utc = deadline_utc
        now_utc = _utc_now()
        self.deadline_monotonic = time.monotonic() + (deadline_utc - now_utc).total_seconds()
        self.state: PromptState = "open"
        self.answer: Answer | None = None
        self.closed = threading.Event()

    def seconds_left(self) -> float:
        return max(0.0, self.deadline_monotonic - time.monotonic())

    def info(self) -> PromptInfo:
        body = self.prompt.model_dump(exclude={"timeout_s", "deadline_utc", "images"})
        return PromptInfo(
            **body,
            asked_utc=self.asked_utc,
            deadline_utc=self.deadline_utc,
            seconds_left=self.seconds_left(),
            image_names=tuple(self.prompt.images),
        )


class PromptHandle:
    """What `OperatorChannel.ask` returns: follow one prompt without blocking the caller."""

    def __init__(self, channel: OperatorChannel, record: _Record) -> None:
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
        allowed_client_keys: Iterable[bytes | str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
        require_curve: bool = False,
    ) -> None:
        event_endpoint = event_endpoint or _event_endpoint_for(endpoint)
        use_curve = curve is not None or allowed_client_keys is not None or require_curve
        for address in (endpoint, event_endpoint):
            if not is_loopback_endpoint(address) and not use_curve:
                raise OperatorSecurityError(
                    f"refusing to listen on {address} without CURVE: bind 127.0.0.1 (and use an SSH tunnel), "
                    "or pass curve (server key pair) and allowed_client_keys"
                )
        server_keys: CurveKeyPair | None = None
        allowed: frozenset[bytes] = frozenset()
        if use_curve:
            if curve is None or allowed_client_keys is None:
                raise OperatorSecurityError("CURVE needs both curve (server key pair) and allowed_client_keys")
            server_keys = _key_pair(curve)
            single = isinstance(allowed_client_keys, (str, os.PathLike))
            sources = [allowed_client_keys] if single else allowed_client_keys
            try:
                allowed = load_allow_list(sources)
            except AuthenticationError as exc:
                raise OperatorSecurityError(str(exc)) from exc

        self._lock = threading.RLock()
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._auth: Any = None
        self.stats: dict[str, int] = {"asked": 0, "answered": 0, "expired": 0, "cancelled": 0, "refused": 0}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        try:
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
        except zmq.ZMQError as exc:
            self._shutdown_sockets()
            raise OperatorError(f"cannot bind operator channel on {endpoint} / {event_endpoint}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="operator-channel", daemon=True)
        self._thread.start()
        logger.info("operator channel: prompts on %s, events on %s", self.prompt_endpoint, self.event_endpoint)

    # -- public API --------------------------------------------------------------------------------

    def ask(self, prompt: Prompt) -> PromptHandle:
        """Publish `prompt` and return its handle at once (never blocks on the answer).

        Raises `OperatorError` if the channel is closed or a prompt with the same id was asked before.
        """
        if self._stop.is_set():
            raise OperatorError("the operator channel is closed; create a new OperatorChannel")
        asked_utc = _utc_now()
        deadline_utc = prompt.deadline_utc or asked_utc + timedelta(seconds=prompt.timeout_s)
        record = _Record(prompt, asked_utc, deadline_utc)
        with self._lock:
            if prompt.id in self._records:
                raise OperatorError(f"prompt id {prompt.id!r} was already used on this channel; use a new id")
            self._records[prompt.id] = record
            self.stats["asked"] += 1
            info = record.info()
        self._publish([_TOPIC_PROMPT, info.model_dump_json().encode(), *prompt.images.values()])
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
        with self._lock:
            return [record.info() for record in self._records.values() if record.state == "open"]

    def handle(self, prompt_id: str) -> PromptHandle:
        """The handle of a prompt asked on this channel; `PromptNotFoundError` if unknown."""
        with self._lock:
            record = self._records.get(prompt_id)
        if record is None:
            raise PromptNotFoundError(f"no prompt {prompt_id!r} on this channel", prompt_id)
        return PromptHandle(self, record)

    def close(self) -> None:
        """Cancel open prompts (clients are told), stop the thread and close the sockets. Idempotent."""
        if self._stop.is_set():
            return
        with self._lock:
            open_ids = [pid for pid, record in self._records.items() if record.state == "open"]
        for prompt_id in open_ids:
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
        with self._lock:
            record = self._records.get(prompt_id)
            if record is None or record.state != "open":
                return False
            record.state = state
            self.stats[state] += 1
            record.closed.set()
            notice = PromptClosed(prompt_id=prompt_id, state=state)
            self._trim_closed()
        logger.info("prompt %s %s", prompt_id, state)
        self._publish([_TOPIC_CLOSED, notice.model_dump_json().encode()])
        self._notify("closed", notice.model_dump(mode="json"))
        return True

    def _expire_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [pid for pid, r in self._records.items() if r.state == "open" and r.deadline_monotonic <= now]
        for prompt_id in due:
            self._close(prompt_id, "expired")

    def _trim_closed(self) -> None:
        closed = [pid for pid, r in self._records.items() if r.state != "open"]
        for prompt_id in closed[: max(0, len(closed) - MAX_CLOSED_PROMPTS)]:
            del self._records[prompt_id]

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
        with self._lock:
            deadlines = [r.deadline_monotonic for r in self._records.values() if r.state == "open"]
        if not deadlines:
            return 1000
        return int(min(1000.0, max(1.0, (min(deadlines) - time.monotonic()) * 1000.0 + 1.0)))

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
        identity, rest = frames[0], frames[1:]
        envelope = [identity]
        if rest and rest[0] == b"":
            envelope.append(b"")
            rest = rest[1:]
        request_id = ""
        try:
            if len(rest) != 1:
                raise BadRequestError(f"a request is one JSON frame, got {len(rest)} frames")
            try:
                raw = json.loads(rest[0])
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise BadRequestError(f"request is not JSON: {exc}") from exc
            if isinstance(raw, dict) and isinstance(raw.get("request_id"), str):
                request_id = raw["request_id"][:100]
            try:
                request = _Request.model_validate(raw)
            except ValidationError as exc:
                raise BadRequestError(f"malformed request: {_short_errors(exc)}") from exc
            if request.v != PROTOCOL_VERSION:
                raise BadRequestError(
                    f"protocol version {request.v} not supported; this agent speaks {PROTOCOL_VERSION}"
                )
            reply, images = self._dispatch(request)
            reply.update({"v": PROTOCOL_VERSION, "request_id": request.request_id, "ok": True})
        except AnswerRefusedError as exc:
            with self._lock:
                self.stats["refused"] += 1
            logger.info("operator channel: refused request %s: %s", request_id or "?", exc)
            reply = {
                "v": PROTOCOL_VERSION,
                "request_id": request_id,
                "ok": False,
                "error": {"code": exc.code, "message": str(exc), "prompt_id": exc.prompt_id},
            }
            images = []
        self._router.send_multipart([*envelope, json.dumps(reply, default=str).encode(), *images])

    def _dispatch(self, request: _Request) -> tuple[dict[str, Any], list[bytes]]:
        if request.type == "sync":
            token = (request.token or "")[:64]
            self._publish([_TOPIC_SYNC, json.dumps({"token": token}).encode()])
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
            with self._lock:
                records = [r for r in self._records.values() if r.state == "open"]
                infos = [r.info() for r in records]
            images = [payload for r in records for payload in r.prompt.images.values()]
            return {"type": "list", "prompts": [info.model_dump(mode="json") for info in infos]}, images
        reply = self._accept_answer(request)
        return {"type": "answer", "answer": reply.model_dump(mode="json")}, []

    def _accept_answer(self, request: _Request) -> AnswerReply:
        prompt_id = request.prompt_id or ""
        option_ids = list(request.option_ids or [])
        operator = (request.operator or "anonymous").strip() or "anonymous"
        self._expire_due()
        with self._lock:
            record = self._records.get(prompt_id)
            if record is None:
                raise PromptNotFoundError(f"no prompt {prompt_id!r}: it was never asked (or is long gone)", prompt_id)
            if record.state == "answered" and record.answer is not None:
                raise PromptAlreadyAnsweredError(
                    f"prompt {prompt_id!r} was already answered by {record.answer.operator!r}", prompt_id
                )
            if record.state == "expired":
                expired_at = record.deadline_utc.isoformat()
                raise PromptExpiredError(f"prompt {prompt_id!r} expired at {expired_at}", prompt_id)
            if record.state == "cancelled":
                raise PromptClosedError(f"prompt {prompt_id!r} was withdrawn by the agent", prompt_id)
            _validate_choice(record.prompt, option_ids)
            if not operator.isprintable() or len(operator) > 64:
                raise InvalidAnswerError("operator name must be printable and at most 64 characters", prompt_id)
            now = _utc_now()
            answer = Answer(
                prompt_id=prompt_id,
                option_ids=tuple(option_ids),
                operator=operator,
                answered_utc=now,
                latency_s=(now - record.asked_utc).total_seconds(),
            )
            record.answer = answer
            record.state = "answered"
            self.stats["answered"] += 1
            record.closed.set()
            notice = PromptClosed(
                prompt_id=prompt_id, state="answered", answered_by=operator, option_ids=tuple(option_ids)
            )
        logger.info("prompt %s answered by %s: %s", prompt_id, operator, option_ids)
        self._publish([_TOPIC_CLOSED, notice.model_dump_json().encode()])
        self._notify("closed", notice.model_dump(mode="json"))
        return AnswerReply(prompt_id=prompt_id, option_ids=answer.option_ids, operator=operator, answered_utc=now)

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


def _validate_choice(prompt: Prompt, option_ids: Sequence[str]) -> None:
    known = [option.id for option in prompt.options]
    if not option_ids:
        raise InvalidAnswerError(f"choose at least one option of {known}", prompt.id)
    if len(set(option_ids)) != len(option_ids):
        raise InvalidAnswerError(f"option ids repeat: {list(option_ids)}", prompt.id)
    unknown = [oid for oid in option_ids if oid not in known]
    if unknown:
        raise InvalidAnswerError(f"no such option(s) {unknown}; the options are {known}", prompt.id)
    if not prompt.multiple and len(option_ids) != 1:
        raise InvalidAnswerError(f"this prompt takes exactly one option, got {list(option_ids)}", prompt.id)


def _short_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])


# --------------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------------

OperatorEvent = PromptInfo | PromptClosed


class OperatorClient:
    """An operator front-end's connection to an agent's `OperatorChannel` (one thread only).

    `endpoint` is the channel's `prompt_endpoint`; the event (PUB) endpoint is asked for with a
    "hello" request unless given. Requests time out after `timeout_s` (`OperatorTimeoutError`; the
    socket is then rebuilt, so the client works again once the agent is back). CURVE: pass
    `curve_keys` (the client's key pair or `.key_secret` file) and `server_public_key` (key or `.key` file).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        event_endpoint: str | None = None,
        timeout_s: float = 5.0,
        curve_keys: CurveKeyPair | str | os.PathLike[str] | None = None,
        server_public_key: bytes | str | os.PathLike[str] | None = None,
    ) -> None:
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise OperatorError(f"endpoint {endpoint!r} must look like tcp://HOST:PORT")
        if (curve_keys is None) != (server_public_key is None):
            raise OperatorSecurityError("CURVE needs both curve_keys and server_public_key")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self._curve: tuple[CurveKeyPair, bytes] | None = None
        if curve_keys is not None and server_public_key is not None:
            try:
                self._curve = (_key_pair(curve_keys), load_public_key(server_public_key))
            except AuthenticationError as exc:
                raise OperatorSecurityError(str(exc)) from exc
        self._context = zmq.Context()
        self._dealer: zmq.Socket[bytes] | None = None
        self._sub: zmq.Socket[bytes] | None = None
        self._pending: list[OperatorEvent] = []
        self._seen: set[str] = set()
        self._listed = False
        try:
            self._dealer = self._new_dealer()
            if event_endpoint is None:
                hello = self._request({"type": "hello"})[0]
                if endpoint.startswith("tcp://") and hello.get("event_port"):
                    event_endpoint = _endpoint_with_port(endpoint, int(hello["event_port"]))
                else:
                    event_endpoint = str(hello.get("event_endpoint"))
            self.event_endpoint: str = event_endpoint
            self._sub = self._context.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._apply_curve(self._sub)
            self._sub.setsockopt(zmq.SUBSCRIBE, _TOPIC_PROMPT)
            self._sub.setsockopt(zmq.SUBSCRIBE, _TOPIC_CLOSED)
            self._sub.setsockopt(zmq.SUBSCRIBE, _TOPIC_SYNC)
            self._sub.connect(event_endpoint)
            self._synchronise()
        except BaseException:
            self.close()
            raise

    # -- requests ----------------------------------------------------------------------------------

    def open_prompts(self) -> list[PromptInfo]:
        """The prompts open now, images included (a client that joins late sees them this way)."""
        reply, frames = self._request({"type": "list"})
        try:
            return _prompts_from_reply(reply, frames)
        except (ValidationError, KeyError, TypeError, ValueError) as exc:
            raise OperatorProtocolError(f"malformed prompt list from {self.endpoint}: {exc}") from exc

    def answer(self, prompt_id: str, option_ids: Sequence[str] | str, operator: str = "anonymous") -> AnswerReply:
        """Answer a prompt with one option id (or several for `multiple` prompts).

        Raises `PromptNotFoundError`, `PromptExpiredError`, `PromptAlreadyAnsweredError`,
        `PromptClosedError` (withdrawn), `InvalidAnswerError` (unknown/too many options); nothing
        changes on the agent then. `OperatorTimeoutError` if the agent does not reply.
        """
        ids = [option_ids] if isinstance(option_ids, str) else [str(o) for o in option_ids]
        reply, _ = self._request({"type": "answer", "prompt_id": prompt_id, "option_ids": ids, "operator": operator})
        try:
            return AnswerReply.model_validate(reply["answer"])
        except (ValidationError, KeyError, TypeError) as exc:
            raise OperatorProtocolError(f"malformed answer reply from {self.endpoint}: {exc}") from exc

    # -- events ------------------------------------------------------------------------------------

    def next_event(self, timeout_s: float | None = 1.0) -> OperatorEvent | None:
        """The next prompt or closed notice, or None after `timeout_s` seconds (None: wait forever).

        The first call also yields the prompts that were already open when the client joined. A
        prompt is delivered once even if seen both in the list and on the event socket.
        """
        if not self._listed:
            self._listed = True
            with contextlib.suppress(OperatorTimeoutError):
                self._pending.extend(self.open_prompts())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, PromptInfo):
                    if event.id in self._seen:
                        continue
                    self._seen.add(event.id)
                return event
            remaining_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            assert self._sub is not None
            if not self._sub.poll(remaining_ms):
                return None
            event = self._decode_event(self._sub.recv_multipart())
            if event is not None:
                self._pending.append(event)

    def events(self, timeout_s: float | None = None) -> Iterator[OperatorEvent]:
        """Iterate over prompts and closed notices; stops after `timeout_s` seconds without one."""
        while True:
            event = self.next_event(timeout_s)
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Close the sockets. Idempotent."""
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._dealer = self._sub = None
        self._context.term()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _apply_curve(self, sock: zmq.Socket[bytes]) -> None:
        if self._curve is not None:
            configure_curve_client(sock, *self._curve)

    def _new_dealer(self) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        self._apply_curve(sock)
        sock.connect(self.endpoint)
        return sock

    def _request(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        assert self._dealer is not None
        request_id = uuid.uuid4().hex
        message = {"v": PROTOCOL_VERSION, "request_id": request_id, **body}
        self._dealer.send_multipart([b"", json.dumps(message).encode()])
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._dealer.poll(remaining_ms):
                self._dealer.close(linger=0)
                self._dealer = self._new_dealer()
                raise OperatorTimeoutError(
                    f"no reply from the agent at {self.endpoint} within {self.timeout_s:.1f} s; "
                    "is it running, and is the endpoint right?"
                )
            frames = self._dealer.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            try:
                reply = json.loads(frames[0])
            except (IndexError, UnicodeDecodeError, ValueError) as exc:
                raise OperatorProtocolError(f"reply from {self.endpoint} is not JSON: {exc}") from exc
            if not isinstance(reply, dict) or reply.get("request_id") not in (request_id, ""):
                continue  # a stale reply to an earlier, timed-out request
            if reply.get("ok"):
                return reply, frames[1:]
            error = reply.get("error") or {}
            cls = _ERRORS_BY_CODE.get(str(error.get("code")), AnswerRefusedError)
            raise cls(str(error.get("message", "request refused")), error.get("prompt_id"))

    def _synchronise(self) -> None:
        """Wait until the event socket really receives (ZeroMQ drops what a PUB sends before a new SUB
        has joined): ask the agent to publish a token until it arrives, at most `timeout_s`."""
        assert self._sub is not None
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            self._request({"type": "sync", "token": token})
            until = min(deadline, time.monotonic() + 0.2)
            while (left_ms := int((until - time.monotonic()) * 1000)) > 0 and self._sub.poll(left_ms):
                frames = self._sub.recv_multipart()
                if frames[0] == _TOPIC_SYNC:
                    with contextlib.suppress(ValueError, IndexError, AttributeError):
                        if json.loads(frames[1]).get("token") == token:
                            return
                    continue
                event = self._decode_event(frames)
                if event is not None:
                    self._pending.append(event)
        logger.warning("operator client: the event socket %s did not sync within %.1f s; events may be late",
                       self.event_endpoint, self.timeout_s)

    def _decode_event(self, frames: list[bytes]) -> OperatorEvent | None:
        try:
            topic, header = frames[0], frames[1]
            if topic == _TOPIC_PROMPT:
                info = PromptInfo.model_validate_json(header)
                return _attach_images(info, frames[2:])
            if topic == _TOPIC_CLOSED:
                return PromptClosed.model_validate_json(header)
        except (IndexError, ValidationError, ValueError) as exc:
            logger.warning("operator client: ignoring a malformed event: %s", exc)
        return None


def _attach_images(info: PromptInfo, frames: Sequence[bytes]) -> PromptInfo:
    if len(frames) != len(info.image_names):
        raise ValueError(f"prompt {info.id} names {len(info.image_names)} images but carries {len(frames)}")
    images = _check_images(dict(zip(info.image_names, (bytes(f) for f in frames), strict=True)))
    updated = info.model_copy(update={"images": images})
    updated._received_monotonic = info._received_monotonic
    return updated


def _prompts_from_reply(reply: dict[str, Any], frames: list[bytes]) -> list[PromptInfo]:
    prompts: list[PromptInfo] = []
    cursor = 0
    for raw in reply["prompts"]:
        info = PromptInfo.model_validate(raw)
        count = len(info.image_names)
        prompts.append(_attach_images(info, frames[cursor : cursor + count]))
        cursor += count
    if cursor != len(frames):
        raise ValueError(f"{len(frames)} image frames for {cursor} named images")
    return prompts


def save_prompt_images(info: PromptInfo, folder: str | Path) -> list[Path]:
    """Write a received prompt's PNG images to `folder/<prompt id>/<name>.png` (atomically)."""
    from drivers.formats.images import write_atomic

    target = Path(folder) / _safe_component(info.id)
    paths = []
    for name, payload in info.images.items():
        filename = name if name.lower().endswith(".png") else f"{name}.png"
        paths.append(write_atomic(target / _safe_component(filename), payload))
    return paths


def _safe_component(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned[:100] or "unnamed"

