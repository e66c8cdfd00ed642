"""The alert monitor driven by real journal records (a real `Journal` in tmp_path, stamped by the real
`JournalWriter`) and sending to a real local webhook: when it alerts, what it journals, and that a webhook
which fails or never answers does not hold the session up."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.alerts.monitor import AlertMonitor
from agent.alerts.plan import AlertPlan, WebhookPlan
from agent.session.journal import Journal, read_records
from agent.session.outcomes import TargetRecord
from agent.session.records import (
    AlertSent,
    ControlApplied,
    FaultRaised,
    Record,
    SummaryWritten,
    TargetFinished,
    TargetsPlanned,
    Transition,
)
from tests.alerts.alert_servers import WebhookServer


class Session:
    """Records of a session at chosen microscope times, through a real journal, handed to the monitor."""

    def __init__(self, folder: Path, plan: AlertPlan) -> None:
        self.time_s = 0.0
        self.journal = Journal(folder, clock_s=lambda: self.time_s)
        self.monitor = AlertMonitor(plan, folder.name, folder, self.journal)

    def emit(self, at_s: float, record: Record) -> None:
        from agent.session.writers import JournalWriter

        self.time_s = at_s
        self.monitor(JournalWriter(self.journal)(record))

    def visit(self, start_s: float, target: str, outcome: str = "no-diffraction", visit_s: float = 300.0) -> float:
        """One target visit from `start_s` taking `visit_s`; returns when it ended."""
        for step, state in enumerate(("moving", "zooming", "confirming", "diffraction")):
            self.emit(start_s + step * visit_s / 5, Transition(state=state))
        end_s = start_s + visit_s
        self.emit(end_s, TargetFinished(target_id=target, outcome=outcome, x_um=0, y_um=0, microscope_time_s=end_s))
        return end_s

    def alerts(self) -> list[AlertSent]:
        return [r for r in read_records(self.journal.path) if isinstance(r, AlertSent)]


def _plan(server: WebhookServer, monkeypatch: pytest.MonkeyPatch, **fields: object) -> AlertPlan:
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", server.url)
    hook = WebhookPlan(url_env="TEST_ALERT_WEBHOOK", format="json", timeout_s=2.0, retries=1, backoff_s=0.05)
    return AlertPlan(webhook=hook, **fields)  # type: ignore[arg-type]


def _targets(*ids: str) -> TargetsPlanned:
    records = [
        TargetRecord(target_id=i, order=n, x_um=0, y_um=0, atlas_col_px=0, atlas_row_px=0, area_px=1, score=1,
                     cluster_id=0)
        for n, i in enumerate(ids)
    ]  # fmt: skip
    return TargetsPlanned(targets=records)


def test_no_diffraction_pause_and_failure_alerts_on_a_real_journal(
    webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    session = Session(tmp_path / "night1", _plan(webhook_server, monkeypatch, no_diffraction_min=10))
    session.emit(0, Transition(state="mapping"))
    session.emit(2000, Transition(state="locating"))  # 2000 s of mapping: not a quiet stretch
    session.emit(2000, _targets("t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"))
    session.emit(2000, Transition(state="targeting"))
    end_s = session.visit(2000, "t1")
    assert session.monitor.dispatcher.unfinished() == [] and webhook_server.requests == []  # 300 s of 600
    end_s = session.visit(end_s, "t2")  # 600 s of visits without a diffracting target: alert
    end_s = session.visit(end_s, "t3")  # the same quiet stretch: no second alert
    session.emit(end_s, Transition(state="paused"))
    session.emit(end_s, ControlApplied(command="pause", resume_to="moving"))
    end_s = session.visit(end_s + 5000, "t4", outcome="recorded")  # paused 5000 s: not counted; a crystal re-arms
    session.emit(end_s, Transition(state="mapping"))
    end_s = session.visit(end_s + 3000, "t5")  # mapping time between is not counted either
    end_s = session.visit(end_s, "t6")  # a new quiet stretch of 600 s: the alert again
    session.emit(end_s + 10, FaultRaised(state="moving", error="StageLimitError", message="x beyond the stage"))
    session.emit(end_s + 10, Transition(state="failed"))
    session.emit(end_s + 10, SummaryWritten(session="night1", state="failed", targets_found=8, targets_visited=6))
    kinds = [body["kind"] for body in webhook_server.bodies()]
    assert kinds == ["no_diffraction", "pause", "no_diffraction", "failure"]  # a failure replaces the end alert
    first, pause, second, failure = webhook_server.bodies()
    assert first["microscope_time_s"] == 2600 and second["microscope_time_s"] == end_s
    assert "last 10 min of visiting targets" in first["detail"] and first["targets_visited"] == 2
    assert pause["state"] == "paused" and "until someone resumes it" in pause["detail"]
    assert failure["detail"] == "StageLimitError: x beyond the stage" and failure["diffracting"] == 1
    assert failure["folder"] == str((tmp_path / "night1").resolve())
    journalled = session.alerts()
    assert [(a.kind, a.channel, a.ok) for a in journalled] == [(k, "webhook", True) for k in kinds]
    assert "xoxSecret" not in session.journal.path.read_text()
    assert session.monitor.closed
    resumed = AlertMonitor(session.monitor.plan, "night1", tmp_path / "night1", session.journal, senders=[])
    assert resumed.message("end").targets_found == 8 and resumed.message("end").diffracting == 1


def test_the_end_alert_and_a_failing_webhook_journalled_without_the_url(
    webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    webhook_server.status = 503
    session = Session(tmp_path / "night2", _plan(webhook_server, monkeypatch, events=("end",)))
    session.emit(0, Transition(state="paused"))
    session.emit(0, ControlApplied(command="pause", resume_to="mapping", reason="BridgeTimeout: no reply"))
    session.emit(100, Transition(state="aborted"))
    session.emit(100, SummaryWritten(session="night2", state="aborted", microscope_time_s=100.0))
    first, second = webhook_server.bodies()  # pause is not among the events; the end alert was tried twice
    assert first == second and first["kind"] == "end" and first["state"] == "aborted" and first["detail"] == "aborted"
    (alert,) = session.alerts()
    assert not alert.ok and alert.attempts == 2 and alert.status == 503 and alert.error.startswith("HTTP 503")
    assert "xoxSecret" not in session.journal.path.read_text()


def test_a_webhook_that_never_answers_does_not_hold_up_the_session(
    webhook_server: WebhookServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    webhook_server.hang = True
    plan = _plan(webhook_server, monkeypatch, end_wait_s=0.2)
    session = Session(tmp_path / "night3", plan.model_copy(update={"webhook": plan.webhook.model_copy(  # type: ignore[union-attr]
        update={"timeout_s": 60.0, "retries": 0})}))  # fmt: skip
    session.emit(0, Transition(state="paused"))
    session.emit(0, ControlApplied(command="pause", resume_to="moving", reason="BridgeTimeout: no reply"))
    assert webhook_server.received.wait(30)  # the monitor returned while the webhook holds the request unanswered
    assert webhook_server.requests[0]["body"]["kind"] == "pause"
    assert "resumes by itself" in webhook_server.requests[0]["body"]["detail"]
    session.emit(50, Transition(state="aborted"))
    session.emit(50, SummaryWritten(session="night3", state="aborted"))  # waits end_wait_s at most
    pause, end = session.alerts()  # neither confirmed: the pause alert hangs, the end alert waits behind it
    assert (pause.kind, end.kind) == ("pause", "end") and not pause.ok and not end.ok
    assert "still being sent when the session ended (end_wait_s = 0.2 s)" in pause.error
    assert session.monitor.closed and len(webhook_server.requests) == 1


def test_a_full_queue_drops_the_alert_and_says_so(webhook_server: WebhookServer) -> None:
    from agent.alerts.dispatch import AlertDispatcher
    from agent.alerts.message import AlertMessage
    from agent.alerts.webhook import WebhookSender

    webhook_server.hang = True
    sender = WebhookSender(WebhookPlan(url_env="UNUSED", timeout_s=30.0, retries=0), webhook_server.url)
    dispatcher = AlertDispatcher([sender], queue_size=1)
    try:
        assert dispatcher.submit(AlertMessage(kind="pause", session="s"))
        assert webhook_server.received.wait(30)  # the thread is sending it, the webhook holds it
        assert dispatcher.submit(AlertMessage(kind="no_diffraction", session="s"))  # waits in the queue
        assert not dispatcher.submit(AlertMessage(kind="end", session="s"))  # the queue is full
        (dropped,) = dispatcher.results()
        assert (dropped.kind, dropped.ok, dropped.attempts) == ("end", False, 0) and "dropped" in dropped.error
        assert [m.kind for m in dispatcher.unfinished()] == ["pause", "no_diffraction"]
    finally:
        dispatcher.close(timeout_s=0.1)
