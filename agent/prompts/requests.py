"""Reading a client's request off the ROUTER socket and writing the refusal reply: frames -> `Request`.

Anything that is not a valid request of this protocol version becomes a `BadRequestError`, which the
channel sends back as a `bad_request` reply; nothing a client sends can stop the channel.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from agent.prompts.errors import AnswerRefusedError, BadRequestError
from agent.prompts.wire import PROTOCOL_VERSION, Request


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(routing envelope to send the reply with, the request's own frames) of a ROUTER message: the peer
    identity, and the empty delimiter a DEALER or REQ puts first when there is one."""
    identity, rest = frames[0], frames[1:]
    envelope = [identity]
    if rest and rest[0] == b"":
        envelope.append(b"")
        rest = rest[1:]
    return envelope, rest


def decode_request_frame(rest: list[bytes]) -> Any:
    """The JSON value of a request's one frame; `BadRequestError` for several frames or for non-JSON."""
    if len(rest) != 1:
        raise BadRequestError(f"a request is one JSON frame, got {len(rest)} frames")
    try:
        return json.loads(rest[0])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequestError(f"request is not JSON: {exc}") from exc


def request_id_of(raw: Any) -> str:
    """The request id to echo in the reply, as far as it can be read from a raw request ("" if not)."""
    if isinstance(raw, dict) and isinstance(raw.get("request_id"), str):
        return raw["request_id"][:100]
    return ""


def validate_request(raw: Any) -> Request:
    """`raw` as a `Request` of this protocol version; `BadRequestError` if it is not one."""
    try:
        request = Request.model_validate(raw)
    except ValidationError as exc:
        raise BadRequestError(f"malformed request: {short_errors(exc)}") from exc
    if request.v != PROTOCOL_VERSION:
        raise BadRequestError(f"protocol version {request.v} not supported; this agent speaks {PROTOCOL_VERSION}")
    return request


def refusal_reply(request_id: str, exc: AnswerRefusedError) -> dict[str, Any]:
    """The reply telling a client its request was refused, and why (the error's wire code)."""
    return {
        "v": PROTOCOL_VERSION,
        "request_id": request_id,
        "ok": False,
        "error": {"code": exc.code, "message": str(exc), "prompt_id": exc.prompt_id},
    }


def short_errors(exc: ValidationError) -> str:
    """The first five validation errors of `exc`, one line: `field.path: message; ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
