"""Alerts of a multi-grid run (`agent.alerts`): one message when the whole run ends, and which alerts each grid's
sessions send on their own.

Within a run an atlas pass's `end` and `no_diffraction` alerts would be noise (a dozen short sessions a night),
so atlas passes send only `failure` and `pause` (a person is needed); screening sessions send what the plan
says. When the run ends, one `end` alert (or `failure`) sums the run up. Secrets are read as for a session
(`agent.alerts.channels.build_senders`) and never journalled; a channel that fails is logged and never fails the
run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.alerts.channels import build_senders
from agent.alerts.dispatch import AlertDispatcher
from agent.alerts.message import AlertMessage
from agent.alerts.plan import AlertPlan
from agent.alerts.secrets import AlertConfigError

logger = logging.getLogger(__name__)

#: The alerts an atlas pass of a run may send (a subset of the plan's events).
ATLAS_PASS_EVENTS = ("failure", "pause")


def grid_session_alerts(plan: AlertPlan, atlas_pass: bool) -> AlertPlan:
    """The alert plan of one grid session of a run: an atlas pass keeps only `ATLAS_PASS_EVENTS`."""
    if not atlas_pass or not plan.enabled:
        return plan
    return plan.model_copy(update={"events": tuple(e for e in plan.events if e in ATLAS_PASS_EVENTS)})


def send_run_alert(plan: AlertPlan, run_dir: Path, summary: Any) -> None:
    """Send the run's `end` alert (`failure` when it failed and failures are alerted), wait at most the plan's
    `end_wait_s` for it to go out. Nothing when alerts are off or the event is not in the plan's events."""
    kind = "failure" if summary.state == "failed" and plan.sends("failure") else "end"
    if not plan.sends(kind):
        return
    try:
        senders = build_senders(plan)
    except AlertConfigError as exc:
        logger.warning("the run's end alert is not sent: %s", exc)
        return
    screened = [g for g in summary.grids if g.status == "screened"]
    message = AlertMessage(
        kind=kind,  # type: ignore[arg-type]
        session=f"multi-grid run {run_dir.resolve().name}",
        folder=str(run_dir.resolve()),
        state=summary.state,
        detail=(summary.reason + "; " if summary.reason else "")
        + f"{summary.grids_assessed} grids assessed, {len(screened)} screened"
        + (f" (slots {', '.join(str(g.slot) for g in screened)})" if screened else ""),
        targets_visited=sum(g.targets_visited for g in summary.grids),
        diffracting=summary.diffracting_crystals,
        diffracting_per_hour=summary.diffracting_per_hour,
        microscope_time_s=summary.run_time_s,
    )
    dispatcher = AlertDispatcher(senders)
    try:
        dispatcher.submit(message)
        if not dispatcher.drain(plan.end_wait_s):
            logger.warning("the run's end alert was not confirmed within %.0f s", plan.end_wait_s)
    finally:
        dispatcher.close()
