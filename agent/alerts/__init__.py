"""Alerts: tell people when an unattended session needs them or has finished, by webhook and e-mail.

A session whose plan has `[alerts]` with a webhook and/or an e-mail channel sends a short message when it
ends, when it fails, when it pauses and waits for someone (a lost bridge connection, an operator's pause),
and when no diffracting crystal has turned up for `no_diffraction_min` minutes of microscope time spent
visiting targets. One job per module:

- `plan`: `AlertPlan` (the plan's `alerts` field), `WebhookPlan`, `EmailPlan`;
- `secrets`: secrets read from a file or an environment variable named in the plan, and kept out of text;
- `message`: `AlertMessage`, the one JSON-ready message every channel sends;
- `delivery`: `Delivery` (what became of one message on one channel) and the bounded retry loop;
- `webhook`: `WebhookSender` (urllib; Slack, Teams Workflows or plain JSON bodies);
- `smtp`: `EmailSender` (smtplib; STARTTLS, SSL or plain);
- `channels`: `build_senders`, the senders of a plan with their secrets resolved;
- `dispatch`: `AlertDispatcher`, a background thread with a bounded queue, so that sending never blocks a session;
- `monitor`: `AlertMonitor`, the subscriber to a session's records that decides when to send.

Nothing here imports at package import time: `agent.config` imports `agent.alerts.plan` alone.
"""
