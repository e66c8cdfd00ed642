"""Every option of every command says what it does and, when it has one, its default; descriptions are for
users (no notes on which module imports what)."""

from __future__ import annotations

import argparse
import io

from agent.cli import _all_parsers, build_parser


def _options() -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    return [
        (parser, action)
        for parser in _all_parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def test_every_option_has_help_text() -> None:
    missing = [(parser.prog, action.option_strings or action.dest) for parser, action in _options()
               if not (action.help and action.help.strip())]
    assert missing == []


def test_help_shows_defaults_that_are_set() -> None:
    for parser, action in _options():
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS, []):
            continue
        buffer = io.StringIO()
        parser.print_help(buffer)
        flat = " ".join(buffer.getvalue().split())
        assert "default" in flat, (parser.prog, action.option_strings)
    text = io.StringIO()
    next(p for p in _all_parsers(build_parser()) if p.prog.endswith(" locate")).print_help(text)
    assert "(default: kmeans)" in " ".join(text.getvalue().split())


def test_descriptions_hold_no_developer_notes() -> None:
    for parser in _all_parsers(build_parser()):
        text = (parser.description or "").lower()
        assert "imports" not in text and "this module" not in text, parser.prog
