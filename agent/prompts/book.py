"""The channel's bookkeeping: every prompt asked, its state and answer, and the counts per outcome.

All state changes happen under one lock, so `ask`, answers from the socket thread, expiry and
cancellation from any thread agree on who won. The book publishes nothing: it returns the notice for the
channel to send.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from agent.prompts.errors import (
    InvalidAnswerError,
    OperatorError,
    PromptAlreadyAnsweredError,
    PromptClosedError,
    PromptExpiredError,
    PromptNotFoundError,
)
from agent.prompts.wire import Answer, Prompt, PromptClosed, PromptInfo, PromptState, utc_now

#: Closed prompts remembered (so that a late answer is told "expired"/"already answered").
MAX_CLOSED_PROMPTS = 2000


class PromptRecord:
    """Channel-side state of one prompt (changed only under the book's lock)."""

    def __init__(self, prompt: Prompt, asked_utc: datetime, deadline_utc: datetime) -> None:
        self.prompt = prompt
        self.asked_utc = asked_utc
        self.deadline_utc = deadline_utc
        now_utc = utc_now()
        self.deadline_monotonic = time.monotonic() + (deadline_utc - now_utc).total_seconds()
        self.state: PromptState = "open"
        self.answer: Answer | None = None
        self.closed = threading.Event()

    def seconds_left(self) -> float:
        """Seconds until the deadline (0 once passed)."""
        return max(0.0, self.deadline_monotonic - time.monotonic())

    def info(self) -> PromptInfo:
        """The prompt as clients see it (without images; `image_names` lists them)."""
        body = self.prompt.model_dump(exclude={"timeout_s", "deadline_utc", "images"})
        return PromptInfo(
            **body,
            asked_utc=self.asked_utc,
            deadline_utc=self.deadline_utc,
            seconds_left=self.seconds_left(),
            image_names=tuple(self.prompt.images),
        )


class PromptBook:
    """The prompts of one channel, oldest first, with `stats` (asked, answered, expired, cancelled, refused)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._records: OrderedDict[str, PromptRecord] = OrderedDict()
        self.stats: dict[str, int] = {"asked": 0, "answered": 0, "expired": 0, "cancelled": 0, "refused": 0}

    def add(self, record: PromptRecord) -> PromptInfo:
        """Register a newly asked prompt and return its info; `OperatorError` if its id was used before."""
        with self._lock:
            if record.prompt.id in self._records:
                raise OperatorError(f"prompt id {record.prompt.id!r} was already used on this channel; use a new id")
            self._records[record.prompt.id] = record
            self.stats["asked"] += 1
            return record.info()

    def get(self, prompt_id: str) -> PromptRecord | None:
        """The record of `prompt_id`, or None if it was never asked (or is long gone)."""
        with self._lock:
            return self._records.get(prompt_id)

    def open_ids(self) -> list[str]:
        """Ids of the prompts open now."""
        with self._lock:
            return [pid for pid, record in self._records.items() if record.state == "open"]

    def open_infos(self) -> list[PromptInfo]:
        """The prompts open now, as clients see them (without images)."""
        with self._lock:
            return [record.info() for record in self._records.values() if record.state == "open"]

    def open_with_infos(self) -> list[tuple[PromptRecord, PromptInfo]]:
        """The open prompts' records with their infos, taken together (for a list reply with images)."""
        with self._lock:
            records = [r for r in self._records.values() if r.state == "open"]
            return [(r, r.info()) for r in records]

    def due_ids(self, now_monotonic: float) -> list[str]:
        """Ids of open prompts whose deadline is at or before `now_monotonic` (time.monotonic seconds)."""
        with self._lock:
            return [
                pid for pid, r in self._records.items() if r.state == "open" and r.deadline_monotonic <= now_monotonic
            ]

    def next_deadline_monotonic(self) -> float | None:
        """The earliest deadline of the open prompts (time.monotonic seconds), None without open prompts."""
        with self._lock:
            deadlines = [r.deadline_monotonic for r in self._records.values() if r.state == "open"]
        return min(deadlines) if deadlines else None

    def count_refused(self) -> None:
        """Count one refused request."""
        with self._lock:
            self.stats["refused"] += 1

    def close(self, prompt_id: str, state: Literal["expired", "cancelled"]) -> PromptClosed | None:
        """Close an open prompt as `state`; the notice to publish, or None if it was not open."""
        with self._lock:
            record = self._records.get(prompt_id)
            if record is None or record.state != "open":
                return None
            record.state = state
            self.stats[state] += 1
            record.closed.set()
            notice = PromptClosed(prompt_id=prompt_id, state=state)
            self._trim_closed()
        return notice

    def accept(self, prompt_id: str, option_ids: list[str], operator: str) -> tuple[Answer, PromptClosed]:
        """Record the winning answer to an open prompt: (the answer, the notice to publish).

        Raises `PromptNotFoundError`, `PromptAlreadyAnsweredError`, `PromptExpiredError`, `PromptClosedError`
        (withdrawn) or `InvalidAnswerError` (options or operator name); nothing changes then.
        """
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
            validate_choice(record.prompt, option_ids)
            if not operator.isprintable() or len(operator) > 64:
                raise InvalidAnswerError("operator name must be printable and at most 64 characters", prompt_id)
            now = utc_now()
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
        return answer, notice

    def _trim_closed(self) -> None:
        closed = [pid for pid, r in self._records.items() if r.state != "open"]
        for prompt_id in closed[: max(0, len(closed) - MAX_CLOSED_PROMPTS)]:
            del self._records[prompt_id]


def validate_choice(prompt: Prompt, option_ids: Sequence[str]) -> None:
    """`InvalidAnswerError` unless `option_ids` are distinct options of `prompt`, one only if it is single-choice."""
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
