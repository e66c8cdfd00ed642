"""The alert part of a screening plan: which channels, which events, and where the secrets are.

The plan holds no secret: only the path of a file that holds it or the NAME of an environment variable that
does (a Slack or Teams webhook URL is a secret: whoever has it can post to the channel). The plan is saved
with the session (`plan.json`) and journalled, so this is what keeps secrets out of both. In TOML:

    [alerts]
    no_diffraction_min = 45
    [alerts.webhook]
    url_env = "CRYSTAL_LOCATOR_WEBHOOK_URL"
    [alerts.email]
    host = "smtp.example.org"
    sender = "microscope@example.org"
    to = ["cryo-em@example.org"]
    credentials_file = "~/.config/crystal-locator/smtp"   # one line: user:password

Off by default: no webhook, no e-mail, nothing is sent. Times: `*_s` seconds of real time (network waits),
`no_diffraction_min` minutes of microscope time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")

#: What an alert is about. `test` is only sent by `crystal-locator alerts test`.
AlertKind = Literal["end", "failure", "pause", "no_diffraction", "test"]

#: The events a session sends by default (every one).
DEFAULT_EVENTS: tuple[AlertKind, ...] = ("end", "failure", "pause", "no_diffraction")


class RetryPlan(BaseModel):
    """How hard a channel tries: `retries` more attempts after the first, waiting `backoff_s`, then twice
    that, ... (at most `max_backoff_s`) between them; each attempt gives up after `timeout_s` (real seconds)."""

    model_config = _FROZEN

    timeout_s: float = Field(default=10.0, gt=0, le=120, description="per attempt (connect, send, answer)")
    retries: int = Field(default=2, ge=0, le=10)
    backoff_s: float = Field(default=2.0, ge=0, le=60)
    max_backoff_s: float = Field(default=30.0, ge=0, le=300)


def _one_source(file: str | None, env: str | None, what: str, required: bool) -> None:
    """A secret comes from a file or an environment variable, not both (and, if `required`, one of them)."""
    if file is not None and env is not None:
        raise ValueError(f"give {what}_file or {what}_env, not both")
    if required and file is None and env is None:
        raise ValueError(f"give {what}_file (a file holding it) or {what}_env (the NAME of a variable holding it)")


class WebhookPlan(RetryPlan):
    """POST one JSON message per alert to a webhook URL read from `url_file` or the variable `url_env`.

    `format`: `slack` sends `{"text": ...}` (Slack incoming webhooks; also Mattermost, Rocket.Chat and the
    retired Office 365 connector webhooks of Teams); `teams` sends a message with one Adaptive Card (what
    the Teams Workflows "when a Teams webhook request is received" trigger takes); `json` sends the whole
    `AlertMessage` with its `text` (for a facility's own receiver)."""

    url_file: str | None = Field(default=None, description="file holding the URL (one line); ~ expanded")
    url_env: str | None = Field(default=None, description="NAME of the environment variable holding the URL")
    format: Literal["slack", "teams", "json"] = "slack"

    @model_validator(mode="after")
    def _url_source(self) -> WebhookPlan:
        _one_source(self.url_file, self.url_env, "url", required=True)
        return self


class EmailPlan(RetryPlan):
    """Send each alert as a plain-text e-mail through an SMTP server (standard library `smtplib`).

    `security`: `starttls` (port 587, upgrade to TLS), `ssl` (port 465, TLS from the start) or `none` (a local
    relay, port 25). User and password, when the server wants them, come from `credentials_file` or the
    variable `credentials_env`, written `user:password` (split at the first colon); neither: no login.
    `ca_file`: a certificate authority to trust besides the system's (a facility's own CA)."""

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535, description="default: 587, 465 or 25 by `security`")
    security: Literal["starttls", "ssl", "none"] = "starttls"
    sender: str = Field(min_length=3, description="the From address")
    to: tuple[str, ...] = Field(min_length=1, description="the To addresses")
    credentials_file: str | None = Field(default=None, description="file holding user:password; ~ expanded")
    credentials_env: str | None = Field(default=None, description="NAME of the variable holding user:password")
    ca_file: str | None = None
    subject_prefix: str = "[crystal-locator]"

    @model_validator(mode="after")
    def _credentials_source(self) -> EmailPlan:
        _one_source(self.credentials_file, self.credentials_env, "credentials", required=False)
        for address in (self.sender, *self.to):
            if "@" not in address or any(c in address for c in "\r\n"):
                raise ValueError(f"{address!r} is not an e-mail address")
        return self

    @property
    def port_or_default(self) -> int:
        """The port: `port`, else 587 for STARTTLS, 465 for SSL, 25 for none."""
        return self.port or {"starttls": 587, "ssl": 465, "none": 25}[self.security]


class AlertPlan(BaseModel):
    """Which channels alerts go to (none: alerts are off) and on which events.

    `events`: `end` (the session finished: done or aborted, or failed when `failure` is not listed),
    `failure` (the session failed: one message, instead of the end one), `pause` (the session paused and waits
    for a person or for the bridge to answer again), `no_diffraction` (no diffracting target for
    `no_diffraction_min` minutes of microscope time counted while targets are visited: once per such stretch,
    again only after a diffracting target and another stretch). `end_wait_s`: how long the end of a session
    waits, at most, for the last alerts to go out (real seconds)."""

    model_config = _FROZEN

    webhook: WebhookPlan | None = None
    email: EmailPlan | None = None
    events: tuple[AlertKind, ...] = DEFAULT_EVENTS
    no_diffraction_min: float = Field(default=60.0, gt=0, le=24 * 60)
    end_wait_s: float = Field(default=15.0, ge=0, le=300)

    @property
    def enabled(self) -> bool:
        """True when the plan has a channel to send to."""
        return self.webhook is not None or self.email is not None

    def sends(self, kind: AlertKind) -> bool:
        """True when alerts of `kind` go out (a `test` always does)."""
        return self.enabled and (kind == "test" or kind in self.events)
