"""Fixtures of the alert tests: a webhook receiver and an SMTP server on 127.0.0.1 (`tests.alerts.alert_servers`),
and a self-signed certificate for 127.0.0.1."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.alerts.alert_servers import SmtpServer, WebhookServer, start_smtp


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    server = WebhookServer()
    yield server
    server.close()


@pytest.fixture
def smtp_server(free_port: int) -> Iterator[SmtpServer]:
    """A plain SMTP server that asks for a login: user `alerts@example.org`, password `s3cret:Pass-word`."""
    server = start_smtp(free_port, accounts={"alerts@example.org": "s3cret:Pass-word"})
    yield server
    server.controller.stop()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (made with the openssl command; skipped without it)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no openssl to make a test certificate: {exc}")
    return cert, key
