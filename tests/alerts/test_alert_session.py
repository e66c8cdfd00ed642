"""Alerts in a real screening session on the simulator (one short session: 512 px camera, one square, three
targets), `crystal-locator alerts test`, and a session whose alert secret is missing."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.alerts.plan import AlertPlan, EmailPlan, WebhookPlan
from agent.cli import main
from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.session.journal import read_records
from agent.session.records import AlertSent
from agent.session.screening import ScreeningSession, SessionError
from tests.alerts.alert_servers import SmtpServer, WebhookServer

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

PASSWORD = "s3cret:Pass-word"


def _alerts(webhook_server: WebhookServer, smtp_server: SmtpServer, credentials: Path) -> AlertPlan:
    credentials.write_text(f"alerts@example.org:{PASSWORD}\n")
    credentials.chmod(0o600)
    return AlertPlan(
        webhook=WebhookPlan(url_env="TEST_ALERT_WEBHOOK", timeout_s=5.0, retries=1, backoff_s=0.1),
        email=EmailPlan(
            host="127.0.0.1",
            port=smtp_server.port,
            security="none",
            sender="microscope@example.org",
            to=("night-shift@example.org",),
            credentials_file=str(credentials),
            timeout_s=5.0,
            retries=1,
            backoff_s=0.1,
        ),
    )


def test_a_session_sends_its_end_alert_and_writes_no_secret(
    simulated_microscope: Callable[..., SimulatedMicroscope],
    webhook_server: WebhookServer,
    smtp_server: SmtpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", webhook_server.url)
    plan = ScreeningPlan(
        specimen="protein-plates",
        area=AreaPlan(squares=1),
        targeting=TargetingPlan(max_targets=3),
        alerts=_alerts(webhook_server, smtp_server, tmp_path / "smtp-credentials"),
    )
    session = ScreeningSession(simulated_microscope("protein-plates", 0, 512), plan, tmp_path / "night")
    events: list[str] = []
    session.events.subscribe(lambda topic, event: events.append(json.dumps(event, default=str)))
    caplog.set_level(logging.DEBUG)
    summary = session.run()
    assert summary.state == "done" and summary.targets_visited == 3
    end = webhook_server.bodies()[-1]
    assert list(end) == ["text"] and end["text"].startswith("crystal-locator night on ")
    assert "session ended (state done): finished" in end["text"]
    assert f"{summary.targets_recorded} diffracting of 3 visited ({summary.targets_found} planned)" in end["text"]
    mail = smtp_server.messages[-1]
    assert mail["Subject"].endswith("session ended") and mail["To"] == "night-shift@example.org"
    assert smtp_server.logins[-1] == "alerts@example.org"
    journalled = [r for r in read_records(session.session_dir / "journal.jsonl") if isinstance(r, AlertSent)]
    assert {(a.kind, a.channel, a.ok) for a in journalled} == {("end", "webhook", True), ("end", "email", True)}
    plan_json = (session.session_dir / "plan.json").read_text()
    assert "TEST_ALERT_WEBHOOK" in plan_json and "smtp-credentials" in plan_json  # names, not values
    written = {
        "plan.json": plan_json,
        "journal.jsonl": (session.session_dir / "journal.jsonl").read_text(),
        "events": "\n".join(events),
        "log": caplog.text,
    }
    for where, text in written.items():
        for secret in ("xoxSecretWebhookToken42", "T0SECRET", PASSWORD, "Pass-word"):
            assert secret not in text, f"{secret} in {where}"


def test_a_missing_secret_stops_the_session_before_it_starts(
    simulated_microscope: Callable[..., SimulatedMicroscope], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_ALERT_WEBHOOK", raising=False)
    plan = ScreeningPlan(alerts=AlertPlan(webhook=WebhookPlan(url_env="TEST_ALERT_WEBHOOK")))
    with pytest.raises(SessionError, match="alerts: the webhook URL: the environment variable TEST_ALERT_WEBHOOK"):
        ScreeningSession(simulated_microscope("protein-plates", 0, 64), plan, tmp_path / "s")
    assert not (tmp_path / "s" / "plan.json").exists()


def _plan_file(path: Path, alerts: AlertPlan | None) -> Path:
    """A TOML plan named `cli-check` with `alerts` (one table per channel)."""
    lines = ['name = "cli-check"']
    if alerts is not None:
        lines.append("[alerts]")
        for channel in ("webhook", "email"):
            settings: dict[str, Any] = getattr(alerts, channel).model_dump(mode="json", exclude_none=True)
            lines.append(f"[alerts.{channel}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_alerts_test_command_says_which_channel_worked(
    webhook_server: WebhookServer,
    smtp_server: SmtpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", webhook_server.url)
    plan = _plan_file(tmp_path / "plan.toml", _alerts(webhook_server, smtp_server, tmp_path / "smtp-credentials"))
    assert main(["alerts", "test", "--plan", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "webhook: sent (1 attempt(s), answer 200)" in out and "email: sent" in out and "2 of 2 channel(s)" in out
    assert "cli-check" in webhook_server.bodies()[0]["text"] and "test alert" in webhook_server.bodies()[0]["text"]
    assert smtp_server.messages[0]["X-Crystal-Locator-Event"] == "test"
    webhook_server.status = 500
    assert main(["alerts", "test", "--plan", str(plan)]) == 1
    out = capsys.readouterr().out
    assert "webhook: NOT sent after 2 attempt(s): HTTP 500" in out and "1 of 2 channel(s)" in out
    assert "xoxSecret" not in out
    assert main(["alerts", "test", "--plan", str(_plan_file(tmp_path / "none.toml", None))]) == 2
    assert "nothing to test" in capsys.readouterr().err
