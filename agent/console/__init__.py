"""The operator web console: follow a screening session live, answer prompts, explore clusters.

Start it next to a session with `start_console_for_session(session, channel, host, port)` (what
`crystal-locator screen --console PORT` does) or attached to a running agent with
`start_console_for_agent(control_endpoint, ...)` (`crystal-locator console --agent ENDPOINT`). Needs the
`console` extra (Starlette, uvicorn, websockets). See `agent.console.server` for the routes and
`agent.console.security` for who may use it.
"""

from __future__ import annotations

from agent.console.server import (
    ConsoleApp,
    ConsoleHandle,
    parse_listen,
    start_console_for_agent,
    start_console_for_session,
)

__all__ = ["ConsoleApp", "ConsoleHandle", "parse_listen", "start_console_for_agent", "start_console_for_session"]
