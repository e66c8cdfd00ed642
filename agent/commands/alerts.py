"""`crystal-locator alerts test --plan PLAN`: send one test alert to every channel a plan configures.

What to try first after writing a plan's `[alerts]`: it reads the secrets the plan names (a missing file or
variable is an error naming it), sends one `test` message by webhook and by e-mail, each with its retries, and
prints one line per channel: sent, or why not. Exit code 0 when every channel worked, 1 when one did not, 2
for a plan that cannot be read or has no channel.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli import CommandError

_DESCRIPTION = """\
Send one test alert to every channel of the plan's [alerts] (webhook, e-mail) and say which worked.
The webhook URL and the SMTP user:password are read from the file or environment variable the plan names.
Exit code 0: every channel worked; 1: at least one did not."""


def register(subparsers: Any) -> None:
    """Add the `alerts` command group."""
    alerts = subparsers.add_parser(
        "alerts", help="alerts by webhook and e-mail: send a test message", description=_DESCRIPTION
    )
    sub = alerts.add_subparsers(dest="alerts_command", metavar="SUBCOMMAND", required=True)
    test = sub.add_parser("test", help="send one test alert to every channel of a plan", description=_DESCRIPTION)
    test.add_argument("--plan", type=Path, required=True, help="the plan file (.toml, .yaml or .json) with [alerts]")
    test.set_defaults(handler=_test)


def _describe(sender: Any) -> str:
    """Where a sender sends to, without its secrets."""
    plan = sender.plan
    if sender.channel == "webhook":
        source = f"the file {plan.url_file}" if plan.url_file else f"${plan.url_env}"
        return f"webhook ({plan.format} body, URL from {source})"
    login = "with login" if sender.secrets else "without login"
    return f"e-mail via {plan.host}:{plan.port_or_default} ({plan.security}, {login}) to {', '.join(plan.to)}"


def _test(args: argparse.Namespace) -> int:
    from agent.alerts.channels import build_senders
    from agent.alerts.message import AlertMessage
    from agent.alerts.secrets import AlertConfigError
    from agent.config import PlanError, load_plan

    try:
        plan = load_plan(args.plan)
    except PlanError as exc:
        raise CommandError(str(exc)) from exc
    if not plan.alerts.enabled:
        raise CommandError(f"{args.plan}: the plan has no [alerts.webhook] or [alerts.email]: nothing to test")
    try:
        senders = build_senders(plan.alerts)
    except AlertConfigError as exc:
        raise CommandError(f"{args.plan}: {exc}") from exc
    message = AlertMessage(
        kind="test",
        session=plan.name,
        folder=str(Path.cwd()),
        state="test",
        detail="sent by `crystal-locator alerts test`: if you read this, the channel works",
    )
    failed = 0
    for sender in senders:
        print(f"{_describe(sender)}: sending ...", flush=True)
        delivery = sender.send(message)
        if delivery.ok:
            print(f"  {sender.channel}: sent ({delivery.attempts} attempt(s), answer {delivery.status})")
        else:
            failed += 1
            print(f"  {sender.channel}: NOT sent after {delivery.attempts} attempt(s): {delivery.error}")
    print(f"{len(senders) - failed} of {len(senders)} channel(s) worked")
    return 1 if failed else 0
