"""What became of one alert on one channel, and the bounded retry loop every channel uses.

A channel's attempt says whether it worked and, if not, whether trying again can help (a timeout, a refused
connection, an HTTP 5xx or 429, an SMTP 4xx: yes; a wrong URL, a refused password: no). `deliver` tries at
most `1 + retries` times with a doubling wait in between (capped), gives up early when told to stop, never
raises, and removes the channel's secrets from the error it reports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from agent.alerts.plan import AlertKind, RetryPlan
from agent.alerts.secrets import redact


@dataclass(frozen=True)
class Attempt:
    """One try: `ok`, or the `error` and whether a retry can help; `status` is the HTTP status or SMTP code."""

    ok: bool
    retryable: bool = False
    status: int | None = None
    error: str = ""


class Delivery(BaseModel):
    """What became of one alert on one channel (`webhook`, `email`): journalled as an `alert` record."""

    model_config = ConfigDict(frozen=True)

    channel: str
    kind: AlertKind
    ok: bool
    attempts: int
    status: int | None = None
    error: str = ""


def deliver(
    channel: str,
    kind: AlertKind,
    attempt: Callable[[], Attempt],
    retries: RetryPlan,
    secrets: Iterable[str] = (),
    stop: threading.Event | None = None,
) -> Delivery:
    """Call `attempt` until it works, says a retry cannot help, or `retries.retries` retries are used up,
    waiting `backoff_s`, `2 * backoff_s`, ... (at most `max_backoff_s`) in between; `stop` set ends the waiting
    and the trying. An exception from `attempt` counts as a failed attempt that may be retried."""
    stop = stop or threading.Event()
    wait_s = retries.backoff_s
    tries = 0
    while True:
        tries += 1
        try:
            result = attempt()
        except Exception as exc:  # a channel's surprise must not reach the session
            result = Attempt(ok=False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        if result.ok or not result.retryable or tries > retries.retries:
            break
        if stop.wait(min(wait_s, retries.max_backoff_s)):
            break
        wait_s *= 2
    return Delivery(
        channel=channel,
        kind=kind,
        ok=result.ok,
        attempts=tries,
        status=result.status,
        error=redact(result.error, list(secrets)),
    )
