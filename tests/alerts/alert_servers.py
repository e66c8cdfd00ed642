"""Real local servers for the alert tests (their fixtures are in conftest.py), both on 127.0.0.1.

`WebhookServer`: `http.server` in a thread; it records every POST (path, headers, JSON body) and answers with
`status` (default 200), or holds the request without answering until the test ends (`hang = True`).
`start_smtp`: `aiosmtpd` (the `test` extra) with optional AUTH (`accounts`) and TLS; it records every message.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class WebhookServer:
    """A webhook receiver on 127.0.0.1; `url` is its address (with a secret-looking path)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.hang = False
        self.received = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                server.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body or b"null")}
                )
                server.received.set()
                if server.hang:
                    server.release.wait(30)  # bounded: the test ends it
                    return
                self.send_response(server.status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if server.status < 300 else b"error")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}/services/T0SECRET/B0SECRET/xoxSecretWebhookToken42"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def bodies(self) -> list[Any]:
        """The JSON bodies received, in order."""
        return [request["body"] for request in self.requests]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class SmtpServer:
    """An SMTP server on 127.0.0.1 (aiosmtpd); `messages` are the e-mails received, `logins` the users."""

    port: int
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    controller: Any = None


def start_smtp(
    port: int, accounts: dict[str, str] | None = None, tls_context: Any = None, implicit_tls: Any = None
) -> SmtpServer:
    """Start an aiosmtpd server on 127.0.0.1:`port` (the test extra): AUTH with `accounts` (user -> password)
    when given, STARTTLS with `tls_context`, TLS from the start with `implicit_tls`."""
    aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")
    from aiosmtpd.smtp import AuthResult, LoginPassword

    server = SmtpServer(port=port)

    class Handler:
        async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
            server.messages.append(message_from_bytes(envelope.original_content or envelope.content))
            server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            return "250 Message accepted"

    def authenticator(smtp: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword) and accounts is not None:
            user, password = data.login.decode(), data.password.decode()
            if accounts.get(user) == password:
                server.logins.append(user)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    options: dict[str, Any] = {"hostname": "127.0.0.1", "port": port}
    if accounts is not None:
        options.update(authenticator=authenticator, auth_required=True, auth_require_tls=tls_context is not None)
    if tls_context is not None:
        options.update(tls_context=tls_context, require_starttls=True)
    if implicit_tls is not None:
        options.update(ssl_context=implicit_tls)
    server.controller = aiosmtpd_controller.Controller(Handler(), **options)
    server.controller.start()
    return server


def no_listener_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
