"""The prompt protocol's messages as pydantic models: prompts, options, answers and client requests.

Wire (protocol version `PROTOCOL_VERSION`; JSON headers, PNG images as raw binary frames, no pickle)
--------------------------------------------------------------------------------------------------
The channel (`agent.prompts.channel.OperatorChannel`) binds two sockets, both on 127.0.0.1 by default:

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
  - `{"v": 1, "type": "sync", "request_id": "...", "token": "..."}` -> the token is published on the
    event socket (a new subscriber waits for it before it trusts that it receives events).

* a PUB socket (`event_endpoint`): `[b"prompt", PromptInfo_json, *png_frames]` when a prompt is
  asked, `[b"closed", PromptClosed_json]` when it is answered (by whom), expires or is cancelled.

The first valid answer wins; a later one gets `already_answered` and changes nothing. A prompt whose
deadline has passed is `expired`: answers to it are refused. Malformed requests and garbage never
kill the channel: they get a `bad_request` reply (or are dropped when they cannot be replied to).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from agent.prompts.images import check_png_images

#: Version of the wire protocol described in the module docstring.
PROTOCOL_VERSION = 1
#: Largest request the ROUTER socket accepts (answers are small); bigger messages drop the peer.
MAX_REQUEST_BYTES = 256 * 1024
#: Default time a prompt stays open, seconds.
DEFAULT_PROMPT_TIMEOUT_S = 300.0

#: Topics of the event (PUB) socket.
TOPIC_PROMPT = b"prompt"
TOPIC_CLOSED = b"closed"
TOPIC_SYNC = b"sync"

PromptState = Literal["open", "answered", "expired", "cancelled"]
ErrorCode = Literal["not_found", "expired", "already_answered", "cancelled", "invalid_answer", "bad_request"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
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
        return check_png_images(value)

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
    time_utc: datetime = Field(default_factory=utc_now)


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


class Request(BaseModel):
    """A client request, the envelope of every message to the ROUTER socket (strict: no type coercion,
    no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    v: int
    type: Literal["hello", "sync", "list", "answer"]
    request_id: str = Field(min_length=1, max_length=100)
    prompt_id: str | None = Field(default=None, max_length=200)
    option_ids: list[str] | None = Field(default=None, max_length=256)
    operator: str | None = Field(default=None, max_length=200)
    token: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _answer_fields(self) -> Request:
        if self.type == "answer" and (self.prompt_id is None or self.option_ids is None):
            raise ValueError("an answer needs prompt_id and option_ids")
        return self
