"""The operator front-end's end of the prompt protocol: `OperatorClient` lists, receives and answers prompts.

A client talks to an agent's `agent.prompts.channel.OperatorChannel` (messages: `agent.prompts.wire`):
requests go to the channel's ROUTER socket from a DEALER, prompts and closed notices arrive on a SUB
socket. `OperatorClient` is for one thread (one client per thread or front-end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import zmq
from pydantic import ValidationError

from agent.prompts.endpoints import endpoint_with_port, key_pair
from agent.prompts.errors import (
    ERRORS_BY_CODE,
    AnswerRefusedError,
    OperatorError,
    OperatorProtocolError,
    OperatorSecurityError,
    OperatorTimeoutError,
)
from agent.prompts.images import check_png_images
from agent.prompts.wire import (
    PROTOCOL_VERSION,
    TOPIC_CLOSED,
    TOPIC_PROMPT,
    TOPIC_SYNC,
    AnswerReply,
    PromptClosed,
    PromptInfo,
)
from drivers.auth import CurveKeyPair, configure_curve_client, load_public_key
from drivers.base import AuthenticationError

logger = logging.getLogger(__name__)

#: What a client receives: a prompt, or the notice that one closed.
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
                self._curve = (key_pair(curve_keys), load_public_key(server_public_key))
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
                    event_endpoint = endpoint_with_port(endpoint, int(hello["event_port"]))
                else:
                    event_endpoint = str(hello.get("event_endpoint"))
            self.event_endpoint: str = event_endpoint
            self._sub = self._context.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._apply_curve(self._sub)
            self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC_PROMPT)
            self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC_CLOSED)
            self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC_SYNC)
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
            cls = ERRORS_BY_CODE.get(str(error.get("code")), AnswerRefusedError)
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
                if frames[0] == TOPIC_SYNC:
                    with contextlib.suppress(ValueError, IndexError, AttributeError):
                        if json.loads(frames[1]).get("token") == token:
                            return
                    continue
                event = self._decode_event(frames)
                if event is not None:
                    self._pending.append(event)
        logger.warning(
            "operator client: the event socket %s did not sync within %.1f s; events may be late",
            self.event_endpoint,
            self.timeout_s,
        )

    def _decode_event(self, frames: list[bytes]) -> OperatorEvent | None:
        try:
            topic, header = frames[0], frames[1]
            if topic == TOPIC_PROMPT:
                info = PromptInfo.model_validate_json(header)
                return _attach_images(info, frames[2:])
            if topic == TOPIC_CLOSED:
                return PromptClosed.model_validate_json(header)
        except (IndexError, ValidationError, ValueError) as exc:
            logger.warning("operator client: ignoring a malformed event: %s", exc)
        return None


def _attach_images(info: PromptInfo, frames: Sequence[bytes]) -> PromptInfo:
    if len(frames) != len(info.image_names):
        raise ValueError(f"prompt {info.id} names {len(info.image_names)} images but carries {len(frames)}")
    images = check_png_images(dict(zip(info.image_names, (bytes(f) for f in frames), strict=True)))
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
