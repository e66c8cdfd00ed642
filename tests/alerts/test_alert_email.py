"""The e-mail channel against a real SMTP server on 127.0.0.1 (aiosmtpd): the e-mail that arrives, a login with
user and password from a file or the environment, a refused login, STARTTLS with a facility's own CA."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from agent.alerts.channels import build_senders
from agent.alerts.message import AlertMessage
from agent.alerts.plan import AlertPlan, EmailPlan
from agent.alerts.secrets import AlertConfigError
from tests.alerts.alert_servers import SmtpServer, start_smtp

PASSWORD = "s3cret:Pass-word"  # a colon inside: split at the first one
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
FAST = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.05}


def _plan(port: int, **fields: object) -> EmailPlan:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "sender": "microscope@example.org",
        "to": ("night-shift@example.org", "pi@example.org"),
        **FAST,
    }
    values.update(fields)
    return EmailPlan(**values)  # type: ignore[arg-type]


def _message() -> AlertMessage:
    return AlertMessage(
        kind="failure",
        session="grid3",
        folder="/data/grid3",
        state="failed",
        detail="StageLimitError: x 1200 um beyond the stage",
        targets_found=5,
        targets_visited=5,
        diffracting=1,
        diffracting_per_hour=1.5,
        microscope_time_s=2400.0,
    )


def test_the_email_arrives_with_subject_addresses_and_body(
    smtp_server: SmtpServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    credentials = tmp_path / "smtp"
    credentials.write_text(f"alerts@example.org:{PASSWORD}\n")
    credentials.chmod(0o600)
    (sender,) = build_senders(AlertPlan(email=_plan(smtp_server.port, credentials_file=str(credentials))))
    delivery = sender.send(_message())
    assert delivery.ok and delivery.attempts == 1 and delivery.channel == "email"
    assert smtp_server.logins == ["alerts@example.org"]
    (mail,) = smtp_server.messages
    assert mail["Subject"].startswith("[crystal-locator] grid3 on ") and mail["Subject"].endswith("session FAILED")
    assert mail["From"] == "microscope@example.org"
    assert mail["To"] == "night-shift@example.org, pi@example.org"
    assert smtp_server.envelopes == [("microscope@example.org", ["night-shift@example.org", "pi@example.org"])]
    body = mail.get_payload(decode=True).decode()
    assert "StageLimitError: x 1200 um beyond the stage" in body
    assert "Folder:     /data/grid3" in body and "1 diffracting of 5 visited (5 planned), 1.5 per hour" in body
    assert "group or others" not in caplog.text  # mode 600 draws no warning


def test_the_login_comes_from_an_environment_variable(smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ALERT_SMTP", f"alerts@example.org:{PASSWORD}")
    (sender,) = build_senders(AlertPlan(email=_plan(smtp_server.port, credentials_env="TEST_ALERT_SMTP")))
    assert sender.send(_message()).ok
    assert smtp_server.logins == ["alerts@example.org"] and len(smtp_server.messages) == 1


def test_a_refused_login_is_not_retried_and_the_password_is_not_reported(
    smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TEST_ALERT_SMTP", "alerts@example.org:Wrong-Password-77")
    (sender,) = build_senders(AlertPlan(email=_plan(smtp_server.port, credentials_env="TEST_ALERT_SMTP")))
    delivery = sender.send(_message())
    assert not delivery.ok and delivery.attempts == 1 and delivery.status == 535
    assert "refused the login" in delivery.error and "Wrong-Password-77" not in delivery.error
    assert smtp_server.messages == [] and "Wrong-Password-77" not in caplog.text
    (no_login,) = build_senders(AlertPlan(email=_plan(smtp_server.port)))
    refused = no_login.send(_message())  # this server wants a login: 530 is final, not retried
    assert not refused.ok and refused.attempts == 1 and refused.status == 530


def test_an_unreachable_server_is_retried_a_bounded_number_of_times(free_port: int) -> None:
    (sender,) = build_senders(AlertPlan(email=_plan(free_port, retries=2)))
    delivery = sender.send(_message())
    assert not delivery.ok and delivery.attempts == 3 and "cannot reach 127.0.0.1" in delivery.error


def test_starttls_with_the_facility_ca_then_login(free_port: int, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = start_smtp(free_port, accounts={"alerts@example.org": PASSWORD}, tls_context=context)
    try:
        plain = _plan(free_port, security="starttls")
        (untrusted,) = build_senders(AlertPlan(email=plain))
        refused = untrusted.send(_message())  # a self-signed certificate nobody said to trust
        assert not refused.ok and refused.attempts == 1 and "TLS with 127.0.0.1" in refused.error
        credentials = _plan(free_port, security="starttls", ca_file=str(cert))
        sender = build_senders(AlertPlan(email=credentials))[0]
        assert not sender.send(_message()).ok  # the server requires a login
        sender_with_login = type(sender)(credentials, ("alerts@example.org", PASSWORD))
        assert sender_with_login.send(_message()).ok
        assert server.logins == ["alerts@example.org"] and len(server.messages) == 1
    finally:
        server.controller.stop()


def test_bad_credentials_settings_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ALERT_SMTP", "no-colon-here")
    with pytest.raises(AlertConfigError, match=r"\$TEST_ALERT_SMTP: expected one line user:password") as raised:
        build_senders(AlertPlan(email=_plan(25, credentials_env="TEST_ALERT_SMTP")))
    assert "no-colon-here" not in str(raised.value)
    with pytest.raises(AlertConfigError, match="does not exist"):
        build_senders(AlertPlan(email=_plan(25, credentials_file=str(tmp_path / "missing"))))
    with pytest.raises(ValueError, match="not an e-mail address"):
        _plan(25, to=("nobody",))
    with pytest.raises(ValueError, match="not both"):
        _plan(25, credentials_env="A", credentials_file="/b")


def test_ssl_from_the_start(free_port: int, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = start_smtp(free_port, implicit_tls=context)
    try:
        (sender,) = build_senders(AlertPlan(email=_plan(free_port, security="ssl", ca_file=str(cert))))
        delivery = sender.send(_message())
        assert delivery.ok, delivery.error
        assert server.messages[0]["Subject"].endswith("session FAILED")
    finally:
        server.controller.stop()
