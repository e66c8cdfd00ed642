"""The `crystal-locator` command line.

Each command group lives in its own module under `agent.commands` and exposes
`register(subparsers) -> None`, which adds its sub-command(s) with `set_defaults(handler=...)`. A
handler takes the parsed `argparse.Namespace` and returns the process exit code. A command line naming
the command of `agent.commands.<command>` imports that module only; `--help`, no command or any other
command builds the parser of every group.

Errors a user can fix (a missing file, a bad option) are raised as `CommandError` and printed as one
line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

#: Command modules, in the order their commands appear in `--help`.
COMMAND_MODULES: tuple[str, ...] = (
    "agent.commands.screen",
    "agent.commands.calibrate",
    "agent.commands.simulate",
    "agent.commands.locate",
    "agent.commands.operator",
    "agent.commands.bridge",
    "agent.commands.console",
    "agent.commands.nav",
    "agent.commands.montage",
    "agent.commands.evaluate",
    "agent.commands.alerts",
)


class CommandError(Exception):
    """A problem with the user's command or its input; printed without a traceback, exit code 2."""


def check_out_folder(out: Path, what: str = "folder") -> None:
    """`CommandError` unless `--out` `out` is a folder or can be made one (the nearest existing path is a
    folder); `what` names the folder in the message (e.g. "session folder")."""
    for path in (out, *out.parents):
        if path.exists():
            if path.is_dir():
                return
            where = "" if path == out else f" {path}"
            raise CommandError(f"--out {out}:{where} is a file, not a {what}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (line breaks kept); every option's help ends with its default, when it has one
    worth saying (not None, not a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if default is None or default is False or default is argparse.SUPPRESS or default == []:
            return text
        return f"{text} (default: %(default)s)"


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every sub-command parser under it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += _all_parsers(child)
    return found


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The argument parser with the command groups of `modules` (default: every registered one)."""
    parser = argparse.ArgumentParser(
        prog="crystal-locator",
        description="Screen TEM grids for micro-crystals (MicroED), on a real or simulated microscope.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers)
    for each in _all_parsers(parser):
        each.formatter_class = HelpFormatter
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: when its command is the one of `agent.commands.<command>` (and that module
    registers it), only that module is imported (a command does not pay for the others' imports, e.g. of
    the file-format drivers); otherwise, as for `--help`, every command group."""
    words = [word for word in argv if not word.startswith("-")]
    module_name = f"agent.commands.{words[0]}" if words else ""
    if module_name in COMMAND_MODULES:
        parser = build_parser((module_name,))
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if words[0] in subparsers.choices:
            return parser
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser_for(argv)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except CommandError as exc:
        print(f"crystal-locator: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crystal-locator: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m agent.cli`: run the importable module's main, so that exceptions raised by command
    # modules (which import `agent.cli`) are the same classes that `main` catches.
    from agent.cli import main as _main

    sys.exit(_main())
