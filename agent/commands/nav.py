"""`crystal-locator nav show|from-targets`: SerialEM navigator files.

- `nav show FILE.nav [--json]` lists the items (label, type, colour, stage x/y/z in um, acquire flag,
  the map a point was drawn on, note).
- `nav from-targets TARGETS.csv|.json --out FILE.nav [--force] [--map-id N] [--label-prefix P] [--no-acquire]`
  turns targets with stage coordinates (`x_um`, `y_um` columns/keys, as `crystal-locator locate`
  writes them) into navigator points marked for acquisition, so they go straight into a SerialEM
  collection workflow (optionally drawn on the map with MapID N). An existing FILE.nav is replaced
  only with `--force`.
Malformed files fail with one clear line.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli import CommandError
from drivers.formats.nav import NAV_COLORS, NavFormatError, read_nav, targets_to_nav_items, write_nav


def register(subparsers: Any) -> None:
    """Add the `nav` command group."""
    nav = subparsers.add_parser("nav", help="show SerialEM navigator files, write targets as one")
    sub = nav.add_subparsers(dest="nav_command", metavar="SUBCOMMAND", required=True)

    show = sub.add_parser("show", help="list the items of a SerialEM .nav file")
    show.add_argument("path", type=Path, help="the .nav file")
    show.add_argument("--json", action="store_true", help="print JSON (one object per item) instead of a table")
    show.set_defaults(handler=_show)

    convert = sub.add_parser("from-targets", help="write targets (CSV/JSON with x_um, y_um) as a .nav file")
    convert.add_argument("targets", type=Path, help="targets file: .csv or .json (a list, or {'targets': [...]})")
    convert.add_argument("--out", type=Path, required=True, help="the .nav file to write")
    convert.add_argument(
        "--force", action="store_true", help="replace --out if it exists (default: refuse, so a navigator is kept)"
    )
    convert.add_argument("--map-id", type=int, default=None, help="MapID of the map the points belong to")
    convert.add_argument("--label-prefix", default="", help="prefix of the item labels (default: numbers only)")
    convert.add_argument("--regis", type=int, default=1, help="registration number (default 1)")
    convert.add_argument("--color", type=int, default=0, choices=range(len(NAV_COLORS)), help="0 red .. 5 black")
    convert.add_argument("--no-acquire", action="store_true", help="do not mark the points for acquisition")
    convert.set_defaults(handler=_from_targets)


def _show(args: argparse.Namespace) -> int:
    try:
        items = read_nav(args.path)
    except NavFormatError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        for item in items:
            print(
                json.dumps(
                    {
                        "label": item.label,
                        "type": item.kind,
                        "color": item.color_name,
                        "x_um": item.stage_xyz_um[0],
                        "y_um": item.stage_xyz_um[1],
                        "z_um": item.stage_xyz_um[2],
                        "acquire": item.acquire,
                        "drawn_id": item.drawn_id,
                        "map_id": item.map_id,
                        "map_file": item.map_file,
                        "note": item.note,
                        "points": len(item.pts_x),
                    }
                )
            )
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.path} — {len(items)} items")
    for column in ("label", "type", "colour", "x_um", "y_um", "z_um", "acquire", "on map", "note"):
        table.add_column(column, justify="right" if column.endswith("_um") else "left")
    for item in items:
        kind = item.kind if item.map_id is None else f"map {item.map_id}"
        table.add_row(
            item.label,
            kind,
            item.color_name,
            f"{item.stage_xyz_um[0]:.2f}",
            f"{item.stage_xyz_um[1]:.2f}",
            f"{item.stage_xyz_um[2]:.2f}",
            "yes" if item.acquire else "",
            "" if item.drawn_id is None else str(item.drawn_id),
            item.note,
        )
    # piped output (files, scripts) gets full rows instead of rich's 80-column squeeze
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    counts = {kind: sum(1 for i in items if i.kind == kind) for kind in ("point", "polygon", "map")}
    listed = ", ".join(f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in counts.items())
    print(f"{listed}, {sum(i.acquire for i in items)} to acquire")
    return 0


def _read_targets(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CommandError(f"{path}: no such targets file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path}: cannot read ({exc})") from exc
    if path.suffix.lower() == ".csv":
        rows: list[dict[str, Any]] = []
        for row in csv.DictReader(text.splitlines()):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    parsed[key] = float(value) if key in ("x_um", "y_um", "z_um", "score") else value
                except ValueError:
                    raise CommandError(f"{path}: {key} = {value!r} is not a number") from None
            rows.append(parsed)
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("targets", data.get("candidates"))
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise CommandError(f"{path}: expected a list of targets or {{'targets': [...]}} with x_um and y_um")
    return data


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise CommandError(f"--out {out}: is a folder, not a .nav file")
    if out.exists() and not force:
        raise CommandError(f"--out {out}: already exists; pass --force to replace it")


def _from_targets(args: argparse.Namespace) -> int:
    _check_out(args.out, args.force)
    rows = _read_targets(args.targets)
    if not rows:
        raise CommandError(f"{args.targets}: holds no targets")
    try:
        items = targets_to_nav_items(
            rows,
            label_prefix=args.label_prefix,
            drawn_id=args.map_id,
            regis=args.regis,
            color=args.color,
            acquire=not args.no_acquire,
        )
        path = write_nav(args.out, items)
    except (ValueError, TypeError) as exc:
        raise CommandError(f"{args.targets}: {exc}") from exc
    print(f"wrote {len(items)} points to {path}")
    return 0
