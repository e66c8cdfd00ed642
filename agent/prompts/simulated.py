"""An operator that answers prompts with an answer policy: a real prompt client in a background thread.

`PolicyOperator` connects to an agent's `OperatorChannel` like any front-end (`OperatorClient`), and for
each prompt asks its policy which options to choose (`policy.answer(prompt) -> option ids`, the prompt
given in its JSON form as the wire delivers it) and sends them, `delay_s` seconds after the prompt
arrived. The simulated operator is `PolicyOperator(endpoint, simulator.operator.SimulatedAnswerPolicy(truth))`:
the command that starts it wires the two, so that `simulator` never imports `agent`. `never_answer=True`
never answers (to test the agent's fallback). What it sent, and the agent's reply, is kept in `attempts`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.prompts.client import OperatorClient
from agent.prompts.errors import AnswerRefusedError, OperatorError
from agent.prompts.wire import PromptClosed, PromptInfo

logger = logging.getLogger(__name__)

#: Longest wait for an event between two checks of the stop flag and of answers due, seconds.
_POLL_S = 0.05


class AnswerPolicy(Protocol):
    """Decides a prompt's answer: the option ids to choose for `prompt` (the `PromptInfo`'s JSON form)."""

    def answer(self, prompt: dict[str, Any]) -> Sequence[str]:
        """The option ids to send."""
        ...


@dataclass(frozen=True)
class AnswerAttempt:
    """One answer sent: the prompt, the option ids chosen, whether the agent accepted it and its reply
    (or the refusal message); `time_s`: when the policy chose (time.monotonic seconds)."""

    prompt_id: str
    chosen: tuple[str, ...]
    accepted: bool = False
    reply: str = ""
    time_s: float = field(default_factory=time.monotonic)


class PolicyOperator:
    """Answers prompts on `endpoint` (an `OperatorChannel.prompt_endpoint`) with `policy`.

    Use as a context manager or call `start()` / `stop()`. `delay_s` >= 0: seconds between seeing a
    prompt and answering it; `name`: the operator name sent with each answer.
    """

    def __init__(
        self,
        endpoint: str,
        policy: AnswerPolicy,
        *,
        delay_s: float = 0.0,
        name: str = "simulated",
        never_answer: bool = False,
        event_endpoint: str | None = None,
    ) -> None:
        if not (delay_s >= 0.0 and math.isfinite(delay_s)):
            raise ValueError(f"delay_s must be a finite number of seconds >= 0, got {delay_s}")
        self.endpoint = endpoint
        self.event_endpoint = event_endpoint
        self.policy = policy
        self.delay_s = float(delay_s)
        self.name = name
        self.never_answer = never_answer
        self._lock = threading.Lock()
        self._attempts: list[AnswerAttempt] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> PolicyOperator:
        """Connect and start answering in a background thread; raises if it cannot connect in `timeout_s`."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"simulated-operator-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"simulated operator could not connect to {self.endpoint} within {timeout_s} s")
        if self._error is not None:
            self.stop()
            raise self._error
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop answering and disconnect (waits at most `timeout_s` for the thread). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> PolicyOperator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def attempts(self) -> list[AnswerAttempt]:
        """Every answer sent so far, in order."""
        with self._lock:
            return list(self._attempts)

    @property
    def answered(self) -> list[AnswerAttempt]:
        """The answers the agent accepted."""
        return [a for a in self.attempts if a.accepted]

    # -- thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            client = OperatorClient(self.endpoint, event_endpoint=self.event_endpoint)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        due: dict[str, tuple[float, PromptInfo]] = {}
        try:
            while not self._stop.is_set():
                wait_s = _POLL_S
                if due:
                    wait_s = max(0.0, min(wait_s, min(t for t, _ in due.values()) - time.monotonic()))
                event = client.next_event(wait_s)
                if isinstance(event, PromptInfo) and not self.never_answer:
                    due[event.id] = (time.monotonic() + self.delay_s, event)
                elif isinstance(event, PromptClosed):
                    due.pop(event.prompt_id, None)
                for prompt_id, (when, prompt) in list(due.items()):
                    if when > time.monotonic():
                        continue
                    del due[prompt_id]
                    self._answer(client, prompt)
        except Exception:
            logger.exception("simulated operator %s stopped on an error", self.name)
        finally:
            client.close()

    def _answer(self, client: OperatorClient, prompt: PromptInfo) -> None:
        """Ask the policy about `prompt`, send its choice and keep what happened."""
        chosen = tuple(str(option_id) for option_id in self.policy.answer(prompt.model_dump(mode="json")))
        attempt = AnswerAttempt(prompt_id=prompt.id, chosen=chosen)
        try:
            reply = client.answer(prompt.id, list(chosen), operator=self.name)
            attempt = dataclasses.replace(attempt, accepted=True, reply=f"accepted at {reply.answered_utc}")
        except AnswerRefusedError as exc:
            attempt = dataclasses.replace(attempt, reply=f"{exc.code}: {exc}")
        except OperatorError as exc:
            attempt = dataclasses.replace(attempt, reply=f"error: {exc}")
        logger.info("simulated operator %s: %s -> %s (%s)", self.name, prompt.id, attempt.chosen, attempt.reply)
        with self._lock:
            self._attempts.append(attempt)
