"""Typed errors of the prompt channel and client; each refusal carries the wire `code` it is sent as."""

from __future__ import annotations


class OperatorError(Exception):
    """Base class of every error of the operator channel and client."""


class OperatorSecurityError(OperatorError, ValueError):
    """A channel would listen off loopback without CURVE, or CURVE keys are missing/invalid."""


class OperatorProtocolError(OperatorError):
    """The peer sent something that is not this protocol (wrong version, malformed reply)."""


class OperatorTimeoutError(OperatorError, TimeoutError):
    """The agent did not reply within the client's time limit (not running, or unreachable)."""


class AnswerRefusedError(OperatorError):
    """The agent refused an answer; `code` says why (see `agent.prompts.wire`). Nothing changed."""

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


#: Wire error code -> the error a client raises for it.
ERRORS_BY_CODE: dict[str, type[AnswerRefusedError]] = {
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
