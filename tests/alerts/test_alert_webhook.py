"""The webhook channel against a real HTTP server on 127.0.0.1: the bodies that arrive (Slack `text`, a Teams
Adaptive Card, the whole message), bounded retries on 500 and on silence, the URL kept out of every error."""

from __future__ import annotations

import pytest

from agent.alerts.channels import build_senders
from agent.alerts.message import AlertMessage
from agent.alerts.plan import AlertPlan, WebhookPlan
from agent.alerts.secrets import AlertConfigError
from agent.alerts.webhook import WebhookSender
from tests.alerts.alert_servers import WebhookServer, no_listener_port

FAST = {"timeout_s": 0.5, "retries": 2, "backoff_s": 0.05}


def _message(**fields: object) -> AlertMessage:
    values: dict[str, object] = {
        "kind": "pause",
        "session": "grid7",
        "folder": "/data/grid7",
        "state": "paused",
        "detail": "BridgeTimeout: no answer",
        "targets_found": 9,
        "targets_visited": 4,
        "diffracting": 2,
        "diffracting_per_hour": 3.5,
        "microscope_time_s": 2057.0,
    }
    values.update(fields)
    return AlertMessage(**values)  # type: ignore[arg-type]


def _sender(url: str, **plan: object) -> WebhookSender:
    return WebhookSender(WebhookPlan(url_env="UNUSED", **{**FAST, **plan}), url)  # type: ignore[arg-type]


def test_a_slack_body_arrives_with_its_text_line(webhook_server: WebhookServer) -> None:
    delivery = _sender(webhook_server.url).send(_message())
    assert delivery.ok and delivery.attempts == 1 and delivery.status == 200 and delivery.channel == "webhook"
    (request,) = webhook_server.requests
    assert request["path"] == "/services/T0SECRET/B0SECRET/xoxSecretWebhookToken42"
    assert request["headers"]["Content-Type"].startswith("application/json")
    assert list(request["body"]) == ["text"]
    text = request["body"]["text"]
    assert "grid7" in text and "PAUSED" in text and "BridgeTimeout: no answer" in text
    assert "2 diffracting of 4 visited (9 planned)" in text and "3.5 per hour" in text


def test_teams_gets_an_adaptive_card_and_json_the_whole_message(webhook_server: WebhookServer) -> None:
    assert _sender(webhook_server.url, format="teams").send(_message()).ok
    assert _sender(webhook_server.url, format="json").send(_message(kind="end", state="done")).ok
    teams, whole = webhook_server.bodies()
    assert teams["type"] == "message"
    (attachment,) = teams["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["body"][1]["text"] == _message().text
    facts = {fact["title"]: fact["value"] for fact in card["body"][2]["facts"]}
    assert facts["Session"] == "grid7" and facts["Folder"] == "/data/grid7"
    assert whole["kind"] == "end" and whole["state"] == "done" and whole["diffracting"] == 2
    assert whole["text"].startswith("crystal-locator grid7 on ") and "session ended" in whole["text"]


def test_a_webhook_answering_500_is_tried_a_bounded_number_of_times(webhook_server: WebhookServer) -> None:
    webhook_server.status = 500
    delivery = _sender(webhook_server.url).send(_message())
    assert not delivery.ok and delivery.attempts == 3 and delivery.status == 500
    assert len(webhook_server.requests) == 3
    assert "HTTP 500" in delivery.error


def test_a_client_error_is_not_retried(webhook_server: WebhookServer) -> None:
    webhook_server.status = 404
    delivery = _sender(webhook_server.url).send(_message())
    assert not delivery.ok and delivery.attempts == 1 and len(webhook_server.requests) == 1


def test_a_webhook_that_never_answers_times_out_each_try(webhook_server: WebhookServer) -> None:
    webhook_server.hang = True
    delivery = _sender(webhook_server.url, retries=1).send(_message())
    assert not delivery.ok and delivery.attempts == 2
    assert "no answer within 0.5 s" in delivery.error
    assert len(webhook_server.requests) == 2


def test_an_unreachable_webhook_fails_without_showing_its_url() -> None:
    url = f"http://127.0.0.1:{no_listener_port()}/services/T0SECRET/B0SECRET/xoxSecretWebhookToken42"
    delivery = _sender(url, retries=1).send(_message())
    assert not delivery.ok and delivery.attempts == 2
    assert "xoxSecret" not in delivery.error and "T0SECRET" not in delivery.error
    assert "cannot reach" in delivery.error


def test_the_url_comes_from_the_environment_or_a_file(
    webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", webhook_server.url)
    (from_env,) = build_senders(AlertPlan(webhook=WebhookPlan(url_env="TEST_ALERT_WEBHOOK", **FAST)))
    assert from_env.send(_message()).ok
    secret_file = tmp_path / "webhook-url"
    secret_file.write_text(webhook_server.url + "\n")
    secret_file.chmod(0o644)
    (from_file,) = build_senders(AlertPlan(webhook=WebhookPlan(url_file=str(secret_file), **FAST)))
    assert from_file.send(_message()).ok
    assert len(webhook_server.requests) == 2
    assert "group or others may read it (mode 644)" in caplog.text and "xoxSecret" not in caplog.text


def test_a_missing_or_wrong_url_is_a_clear_error_without_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_ALERT_WEBHOOK", raising=False)
    with pytest.raises(AlertConfigError, match="TEST_ALERT_WEBHOOK is not set"):
        build_senders(AlertPlan(webhook=WebhookPlan(url_env="TEST_ALERT_WEBHOOK")))
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", "hooks.example.org/services/xoxSecret")
    with pytest.raises(AlertConfigError, match="not an http") as raised:
        build_senders(AlertPlan(webhook=WebhookPlan(url_env="TEST_ALERT_WEBHOOK")))
    assert "xoxSecret" not in str(raised.value)
    # a password in the URL would reach error texts (urllib's InvalidURL quotes the netloc) and the journal
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", "https://alerts:S3cretPassw0rd@hooks.example.org/hook")
    with pytest.raises(AlertConfigError, match="user name or password") as raised:
        build_senders(AlertPlan(webhook=WebhookPlan(url_env="TEST_ALERT_WEBHOOK")))
    assert "S3cret" not in str(raised.value)
    with pytest.raises(ValueError, match="not both"):
        WebhookPlan(url_env="A", url_file="/b")
    with pytest.raises(ValueError, match="url_file"):
        WebhookPlan()
