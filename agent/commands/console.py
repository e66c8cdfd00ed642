"""`crystal-locator console`: the operator web console, attached to a running agent.

    crystal-locator screen --simulated --operator tcp://127.0.0.1:5560 --events tcp://127.0.0.1:5561 \\
        --control tcp://127.0.0.1:5562 &
    crystal-locator console --agent tcp://127.0.0.1:5562 [--listen 127.0.0.1:8765] [--token-file F]

The console asks the agent's control socket (`screen --control`) where its events, prompts and session
folder are, follows the session live, answers prompts as one more operator client and survives the agent
being stopped and started again. It listens on 127.0.0.1 by default: from another machine, tunnel
(`ssh -L 8765:127.0.0.1:8765 microscope-pc`) or listen elsewhere with an access token (generated and
printed, or `--token-file`). Needs the `console` extra: `pip install 'crystal-locator[console]'`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from agent.cli import CommandError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `console` command."""
    parser = subparsers.add_parser(
        "console",
        help="web console: follow a running session and answer prompts from a browser",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agent", required=True, metavar="ENDPOINT",
                        help="the agent's control endpoint (crystal-locator screen --control ENDPOINT)")
    parser.add_argument("--listen", default="127.0.0.1:8765", metavar="[HOST:]PORT",
                        help="where the web server listens (default 127.0.0.1:8765; other hosts need a token)")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="access token (first line, >= 16 characters); default: generated off loopback")
    parser.add_argument("--labels", type=Path, metavar="DIR",
                        help="label-memory folder for marks made in the explore view (default: per-user folder)")
    parser.add_argument("--explore-dir", type=Path, metavar="DIR",
                        help="folder whose images the explore view may open (besides uploads and the atlas)")
    parser.set_defaults(handler=run_console)


def run_console(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator console`."""
    try:
        from agent.console.security import SecurityError, read_token_file
        from agent.console.server import parse_listen, start_console_for_agent
    except ImportError as exc:  # the optional extra is missing
        raise CommandError(f"the console needs its extra: pip install 'crystal-locator[console]' ({exc})") from exc
    from agent.console.links import LinkError
    from agent.prompts import LabelMemory, LabelMemoryError, default_labels_dir

    try:
        host, port = parse_listen(args.listen)
        token = read_token_file(args.token_file) if args.token_file else None
    except (ValueError, SecurityError) as exc:
        raise CommandError(str(exc)) from exc
    if args.explore_dir is not None and not args.explore_dir.is_dir():
        raise CommandError(f"--explore-dir {args.explore_dir} is not a folder")
    try:
        labels = LabelMemory(args.labels or default_labels_dir())
    except LabelMemoryError as exc:
        raise CommandError(str(exc)) from exc
    try:
        handle = start_console_for_agent(args.agent, host, port, token, labels=labels,
                                         explore_dir=args.explore_dir, background=False)
    except (LinkError, SecurityError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"console: {handle.url}", flush=True)
    if handle.token and args.token_file is None:
        print("console: the access token is in the URL above; share it only with operators", flush=True)
    print(f"console: following the agent at {args.agent} (Ctrl-C to stop)", flush=True)
    handle.serve_forever()
    return 0
