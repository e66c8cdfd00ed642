"""The senders of a plan's alert channels, with their secrets read (`AlertConfigError` if one is missing)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from agent.alerts.delivery import Delivery
from agent.alerts.message import AlertMessage
from agent.alerts.plan import AlertPlan
from agent.alerts.secrets import AlertConfigError, read_secret, split_credentials
from agent.alerts.smtp import EmailSender
from agent.alerts.webhook import WebhookSender


class AlertSender(Protocol):
    """One channel: `send` delivers one message with its bounded retries and never raises; `secrets` are the
    strings to keep out of every text about it."""

    channel: str
    secrets: tuple[str, ...]

    def send(self, message: AlertMessage, stop: threading.Event | None = None) -> Delivery: ...


def build_senders(plan: AlertPlan) -> list[AlertSender]:
    """The senders of `plan` (webhook first, then e-mail); reads the secrets now, so that a missing file or
    variable is an error when the session starts, not a silent night."""
    senders: list[AlertSender] = []
    if plan.webhook is not None:
        hook = plan.webhook
        url = read_secret(hook.url_file, hook.url_env, "the webhook URL")
        senders.append(WebhookSender(hook, url))
    if plan.email is not None:
        mail = plan.email
        credentials = None
        if mail.credentials_file is not None or mail.credentials_env is not None:
            where = f"the file {mail.credentials_file}" if mail.credentials_file else f"${mail.credentials_env}"
            value = read_secret(mail.credentials_file, mail.credentials_env, "the SMTP credentials")
            credentials = split_credentials(value, where)
        if mail.ca_file is not None and not Path(mail.ca_file).expanduser().is_file():
            raise AlertConfigError(f"the SMTP certificate authority file {mail.ca_file} does not exist")
        senders.append(EmailSender(mail, credentials))
    return senders
