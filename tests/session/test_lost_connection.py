"""A session whose microscope stops answering (a bridge whose server went away) pauses, keeps its journal and
summary writable, and carries on by itself once the microscope answers again.

The microscope is the real simulator behind a thin stand-in for a dropped link: from the first diffraction
snapshot on, every call raises `BridgeTimeout` (what `drivers.zmq_bridge.BridgeClient` raises once its own
retries are spent) until the test restores the link.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.session.journal import read_records
from agent.session.records import ControlApplied, FaultRaised, RecoveryTaken
from agent.session.screening import ScreeningSession
from drivers.base import BridgeTimeout


class DroppedLink:
    """Delegates to `microscope`; once `drop_on` is called, every call raises `BridgeTimeout` until `restore()`."""

    def __init__(self, microscope: Any, drop_on: str) -> None:
        self._microscope = microscope
        self._drop_on = drop_on
        self.lost = False
        self.dropped = threading.Event()

    def restore(self) -> None:
        self.lost = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._microscope, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == self._drop_on and not self.dropped.is_set():
                self.dropped.set()
                self.lost = True
            if self.lost:
                raise BridgeTimeout(f"tcp://127.0.0.1:5555 did not answer {name} within 5.0 s (3 attempts)")
            return method(*args, **kwargs)

        return call


def test_a_lost_link_pauses_the_session_which_resumes_when_the_microscope_answers(
    simulated_microscope: Callable[..., Any], tmp_path: Path
) -> None:
    link = DroppedLink(simulated_microscope("protein-plates", seed=0, camera_px=512), drop_on="acquire_diffraction")
    plan = ScreeningPlan(
        specimen="protein-plates", area=AreaPlan(squares=1), targeting=TargetingPlan(max_targets=2)
    )
    session = ScreeningSession(link, plan, tmp_path / "session")  # type: ignore[arg-type]
    session.runner.probe_interval_s = 0.05
    thread = threading.Thread(target=session.run)
    thread.start()
    try:
        assert link.dropped.wait(300), "the session never took a diffraction snapshot"
        deadline = time.monotonic() + 30
        while session.state != "paused" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert session.state == "paused"
        time.sleep(0.3)  # several probes while the link is down: still paused
        assert session.state == "paused"
        link.restore()
        thread.join(timeout=300)
    finally:
        if thread.is_alive():
            session.request_abort()
            thread.join(timeout=60)
    summary = session.summary()
    assert summary.state == "done" and summary.targets_visited == summary.targets_found >= 1
    assert not any(r.outcome == "failed" for r in session.results.values())  # the target was measured again
    records = read_records(tmp_path / "session" / "journal.jsonl")
    faults = [r for r in records if isinstance(r, FaultRaised)]
    assert [f.error for f in faults] == ["BridgeTimeout"] and faults[0].action == "pause"
    assert [r.action for r in records if isinstance(r, RecoveryTaken)] == ["pause"]
    pause, resume = (r for r in records if isinstance(r, ControlApplied))
    assert pause.resume_to == "moving" and "BridgeTimeout" in (pause.reason or "") and resume.command == "resume"
    assert (tmp_path / "session" / "summary.json").exists()


@pytest.mark.timeout(300)
def test_a_restarted_bridge_server_is_journalled_and_published_and_the_session_goes_on(
    simulated_microscope: Callable[..., Any], tmp_path: Path
) -> None:
    """The bridge server is stopped and started again (same endpoint, same microscope) after the first target:
    the session sees the new server id, journals a `bridge_restart` record (which consoles show, through the
    `journal` topic) and finishes its targets."""
    from agent.session.records import BridgeRestarted
    from drivers.zmq_bridge import BridgeClient, BridgeServer

    scope = simulated_microscope("protein-plates", seed=0, camera_px=512)
    servers = [BridgeServer(scope, "tcp://127.0.0.1:0").start()]
    endpoint = servers[0].endpoint
    first_target = threading.Event()
    published: list[dict[str, Any]] = []

    def restart() -> None:
        if first_target.wait(120):
            servers[0].stop()
            servers.append(BridgeServer(scope, endpoint).start())

    restarter = threading.Thread(target=restart)
    restarter.start()
    try:
        with BridgeClient(endpoint, timeout_s=2.0) as client:
            plan = ScreeningPlan(specimen="protein-plates", area=AreaPlan(squares=1),
                                 targeting=TargetingPlan(max_targets=3))
            session = ScreeningSession(client, plan, tmp_path / "session")
            session.runner.probe_interval_s = 0.1

            def on_event(topic: str, event: dict[str, Any]) -> None:
                if topic == "target":
                    first_target.set()
                if topic == "journal" and event["entry"]["type"] == "bridge_restart":
                    published.append(event["entry"])

            session.events.subscribe(on_event)
            summary = session.run()
    finally:
        first_target.set()
        restarter.join(timeout=60)
        for server in servers:
            server.stop()
    assert len(servers) == 2, "the server was never restarted"
    assert summary.state == "done" and summary.targets_visited == summary.targets_found
    restarts = [r for r in read_records(tmp_path / "session" / "journal.jsonl") if isinstance(r, BridgeRestarted)]
    assert len(restarts) == 1 and restarts[0].endpoint == endpoint
    assert restarts[0].old_server_id == servers[0].server_id and restarts[0].new_server_id == servers[1].server_id
    assert [e["new_server_id"] for e in published] == [servers[1].server_id]
