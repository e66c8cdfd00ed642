"""The e-mail channel: one plain-text message per alert through an SMTP server (standard library `smtplib`).

`EmailPlan.security`: `starttls` connects in clear and upgrades with STARTTLS before logging in (refused if the
server does not offer it), `ssl` speaks TLS from the start, `none` never encrypts (a relay on the local
network; a login over it sends the password in clear, so it is warned about unless the server is this host).
Certificates are checked against the system's authorities plus `ca_file`.

A timeout, a refused connection or a 4xx answer (try later) are retried (bounded, see
`agent.alerts.delivery`); a refused login, a refused address or a server without STARTTLS are not. User and
password never appear in what is logged, journalled or reported.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from agent.alerts.delivery import Attempt, Delivery, deliver
from agent.alerts.message import AlertMessage
from agent.alerts.plan import EmailPlan

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def build_email(message: AlertMessage, plan: EmailPlan) -> EmailMessage:
    """The e-mail of `message`: From `plan.sender`, To `plan.to`, the subject with the plan's prefix, the text
    body (`AlertMessage.body`)."""
    mail = EmailMessage()
    mail["From"] = plan.sender
    mail["To"] = ", ".join(plan.to)
    mail["Subject"] = f"{plan.subject_prefix} {message.subject}".strip()
    mail["Date"] = formatdate(localtime=False, usegmt=True)
    mail["Message-ID"] = make_msgid(domain=plan.sender.rpartition("@")[2] or None)
    mail["X-Crystal-Locator-Event"] = message.kind
    mail.set_content(message.body())
    return mail


class EmailSender:
    """Sends alerts by e-mail; `credentials` (user, password) or None for no login. `send` never raises."""

    channel = "email"

    def __init__(self, plan: EmailPlan, credentials: tuple[str, str] | None = None) -> None:
        self.plan = plan
        self._credentials = credentials
        self.secrets: tuple[str, ...] = tuple(credentials or ())
        if credentials and plan.security == "none" and plan.host not in _LOOPBACK_HOSTS:
            logger.warning(
                "alerts: the SMTP login to %s goes without encryption (security = \"none\"); use starttls or ssl",
                plan.host,
            )

    def send(self, message: AlertMessage, stop: threading.Event | None = None) -> Delivery:
        """Send `message` with bounded retries; what became of it (secrets removed from the error)."""
        mail = build_email(message, self.plan)
        return deliver(self.channel, message.kind, lambda: self._send_once(mail), self.plan, self.secrets, stop)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.plan.ca_file:
            context.load_verify_locations(cafile=str(Path(self.plan.ca_file).expanduser()))
        return context

    def _connect(self) -> smtplib.SMTP:
        plan = self.plan
        port, timeout_s = plan.port_or_default, plan.timeout_s
        if plan.security == "ssl":
            return smtplib.SMTP_SSL(plan.host, port, timeout=timeout_s, context=self._tls_context())
        client = smtplib.SMTP(plan.host, port, timeout=timeout_s)
        if plan.security == "starttls":
            try:
                client.starttls(context=self._tls_context())
            except BaseException:
                client.close()
                raise
        return client

    def _send_once(self, mail: EmailMessage) -> Attempt:
        where = f"{self.plan.host}:{self.plan.port_or_default}"
        try:
            with self._connect() as client:
                if self._credentials is not None:
                    client.login(*self._credentials)
                refused = client.send_message(mail)
        except smtplib.SMTPAuthenticationError as exc:
            return Attempt(ok=False, status=exc.smtp_code, error=f"{where} refused the login ({exc.smtp_code})")
        except smtplib.SMTPNotSupportedError as exc:
            return Attempt(ok=False, error=f"{where} does not offer what the plan asks for: {exc}")
        except smtplib.SMTPRecipientsRefused as exc:
            return Attempt(ok=False, error=f"{where} refused every recipient: {sorted(exc.recipients)}")
        except smtplib.SMTPResponseException as exc:
            code = int(exc.smtp_code)
            return Attempt(ok=False, retryable=400 <= code < 500, status=code, error=f"{where} answered {code}")
        except smtplib.SMTPException as exc:
            return Attempt(ok=False, retryable=True, error=f"{where}: {type(exc).__name__}: {exc}")
        except ssl.SSLError as exc:
            return Attempt(ok=False, error=f"TLS with {where} failed: {exc.reason or exc}")
        except TimeoutError:
            return Attempt(ok=False, retryable=True, error=f"{where} did not answer within {self.plan.timeout_s:g} s")
        except OSError as exc:
            return Attempt(ok=False, retryable=True, error=f"cannot reach {where}: {exc}")
        if refused:
            return Attempt(ok=True, error=f"refused recipients: {sorted(refused)}")
        return Attempt(ok=True, status=250)
