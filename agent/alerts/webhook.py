"""The webhook channel: one HTTP POST of a JSON body per alert (standard library `urllib`).

Bodies (`WebhookPlan.format`):
- `slack`: `{"text": "<one line>"}`, what a Slack incoming webhook takes (its only required field); Mattermost
  and Rocket.Chat incoming webhooks and the retired Office 365 connector webhooks of Teams take it too.
- `teams`: `{"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
  "content": <AdaptiveCard 1.4>}]}`: Teams' Workflows webhooks ("when a Teams webhook request is received")
  post Adaptive Cards only (Microsoft's "Create and send messages" page, known issues). The card holds the text
  line and a fact table.
- `json`: the whole `AlertMessage` (with `text`), for a facility's own receiver.

Any 2xx answer counts as delivered (Slack answers 200 `ok`, Workflows 202). A timeout, a refused connection,
HTTP 408, 429 or 5xx are retried (bounded, see `agent.alerts.delivery`); other answers are not. The URL is a
secret: it is never logged, journalled or put into an error message.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from agent.alerts.delivery import Attempt, Delivery, deliver
from agent.alerts.message import AlertMessage
from agent.alerts.plan import WebhookPlan
from agent.alerts.secrets import AlertConfigError

#: Bytes of a webhook's answer read (and ignored) before the connection is closed.
_MAX_ANSWER_BYTES = 64 * 1024


def webhook_body(message: AlertMessage, body_format: str) -> dict[str, Any]:
    """The JSON body of `message` in `body_format` (`slack`, `teams` or `json`; see the module docstring)."""
    if body_format == "slack":
        return {"text": message.text}
    if body_format == "json":
        return message.model_dump(mode="json")
    if body_format != "teams":
        raise ValueError(f"unknown webhook format {body_format!r}; use slack, teams or json")
    facts = [
        ("Session", message.session),
        ("Host", message.host),
        ("Folder", message.folder),
        ("State", message.state),
        ("Targets", message.counts_line()),
        ("Time (UTC)", message.time_utc),
    ]
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": message.subject, "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "TextBlock", "text": message.text, "wrap": True},
            {"type": "FactSet", "facts": [{"title": title, "value": value} for title, value in facts if value]},
        ],
    }
    attachment = {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
    return {"type": "message", "attachments": [attachment]}


class WebhookSender:
    """Posts alerts to one webhook URL (a secret, read by `agent.alerts.channels`); `send` never raises."""

    channel = "webhook"

    def __init__(self, plan: WebhookPlan, url: str) -> None:
        parts = urlsplit(url)
        source = f"the file {plan.url_file}" if plan.url_file else f"the variable {plan.url_env}"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AlertConfigError(f"the webhook URL in {source} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            # a password in the URL would end up in error texts (e.g. urllib's InvalidURL) and the journal
            raise AlertConfigError(f"the webhook URL in {source} holds a user name or password; webhooks take none")
        self.plan = plan
        self._url = url
        # the whole URL and its path (Slack's and Teams' secret part) are kept out of every error text
        self.secrets: tuple[str, ...] = tuple(s for s in (url, parts.path, parts.query) if len(s) >= 8)

    def send(self, message: AlertMessage, stop: threading.Event | None = None) -> Delivery:
        """POST `message` with bounded retries; what became of it (secrets removed from the error)."""
        body = json.dumps(webhook_body(message, self.plan.format)).encode()
        return deliver(self.channel, message.kind, lambda: self._post(body), self.plan, self.secrets, stop)

    def _post(self, body: bytes) -> Attempt:
        request = urllib.request.Request(
            self._url,
            data=body,
            headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "crystal-locator-alerts"},
            method="POST",
        )
        timeout_s = self.plan.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                answer.read(_MAX_ANSWER_BYTES)
                status = int(answer.status)
        except urllib.error.HTTPError as exc:
            retry = exc.code >= 500 or exc.code in (408, 429)
            return Attempt(ok=False, retryable=retry, status=exc.code, error=f"HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                return Attempt(ok=False, retryable=True, error=f"no answer within {timeout_s:g} s")
            return Attempt(ok=False, retryable=True, error=f"cannot reach the webhook's host: {reason}")
        except TimeoutError:
            return Attempt(ok=False, retryable=True, error=f"no answer within {timeout_s:g} s")
        except OSError as exc:
            return Attempt(ok=False, retryable=True, error=f"connection failed: {type(exc).__name__}: {exc}")
        except ValueError as exc:  # http.client.InvalidURL and the like: the URL itself is wrong, retrying won't help
            return Attempt(ok=False, retryable=False, error=f"the webhook URL is not usable: {type(exc).__name__}")
        if 200 <= status < 300:
            return Attempt(ok=True, status=status)
        return Attempt(ok=False, retryable=False, status=status, error=f"HTTP {status} (not 2xx)")
