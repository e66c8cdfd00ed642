"""`crystal-locator operator connect` (answer an agent's prompts in a terminal) and `crystal-locator labels`.

`operator connect ENDPOINT` shows each prompt (question, numbered options, deadline, where its images
were saved, a small colour preview on a terminal that can show one), reads the answer from stdin
(numbers like `2` or `1,3`, or option ids; `s` skips a prompt, `q` quits) and prints the agent's
reply. Prompts that close while you are choosing (answered elsewhere, expired) are reported and
skipped. Works with piped stdin, so it can be scripted.

`labels list|export|prune` inspect and edit the label memory (`--labels DIR`, default
`agent.prompts.default_labels_dir()`).
"""

from __future__ import annotations

import argparse
import io
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.cli import CommandError

_HINT = "answer with the option number(s), e.g. 2 or 1,3; or s to skip, q to quit"


def register(subparsers: Any) -> None:
    """Add the `operator` and `labels` command groups."""
    operator = subparsers.add_parser("operator", help="answer an agent's prompts from a terminal")
    operator_sub = operator.add_subparsers(dest="operator_command", metavar="SUBCOMMAND", required=True)
    connect = operator_sub.add_parser("connect", help="connect to an agent's prompt endpoint and answer prompts")
    connect.add_argument("endpoint", help="the agent's prompt endpoint, e.g. tcp://127.0.0.1:5556")
    connect.add_argument("--event-endpoint", default=None,
                         help="the agent's event (PUB) endpoint, if not the prompt host with the port it reports")
    connect.add_argument("--name", default=None, help="your name, sent with each answer (default: user name)")
    connect.add_argument("--save-dir", type=Path, default=None, help="folder for prompt images (default: temp)")
    connect.add_argument("--timeout-s", type=float, default=5.0, help="seconds to wait for the agent's replies")
    connect.add_argument("--max-prompts", type=int, default=0, help="exit after this many prompts closed (0: never)")
    connect.add_argument("--idle-exit-s", type=float, default=0.0, help="exit after this long idle (0: never)")
    connect.add_argument("--preview", choices=("auto", "always", "never"), default="auto",
                         help="inline colour preview of the first image (auto: on a terminal)")
    connect.add_argument("--curve-secret", type=Path, default=None, help="your CURVE .key_secret file")
    connect.add_argument("--server-key", type=Path, default=None, help="the agent's CURVE public .key file")
    connect.set_defaults(handler=_connect)

    labels = subparsers.add_parser("labels", help="list, export, import or prune the label memory")
    labels_sub = labels.add_subparsers(dest="labels_command", metavar="SUBCOMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--labels", type=Path, default=None,
                        help="label memory folder (default: per-user; simulated sessions keep theirs in its "
                             "simulated/ sub-folder)")
    listing = labels_sub.add_parser("list", parents=[common], help="show stored labels")
    listing.add_argument("--specimen", default=None, help="only labels of this specimen type")
    listing.add_argument("--preset", default=None, help="only labels of this optics preset")
    listing.add_argument("--session", default=None, help="only labels of this session")
    listing.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    listing.set_defaults(handler=_labels_list)
    export = labels_sub.add_parser(
        "export", parents=[common], help="write all labels and object outcomes (the classifier's data) to one JSON file"
    )
    export.add_argument("out", type=Path, help="the JSON file to write")
    export.set_defaults(handler=_labels_export)
    importing = labels_sub.add_parser(
        "import", parents=[common], help="add an export's labels and object outcomes (or a labels/objects.jsonl)"
    )
    importing.add_argument("file", type=Path, help="an export (.json), another memory's labels.jsonl or objects.jsonl")
    importing.set_defaults(handler=_labels_import)
    prune = labels_sub.add_parser("prune", parents=[common], help="remove labels matching all given filters")
    prune.add_argument("--specimen", default=None, help="labels of this specimen type")
    prune.add_argument("--session", default=None, help="labels of this session")
    prune.add_argument("--source", default=None, help="e.g. auto, operator, console")
    prune.add_argument("--older-than-days", type=float, default=None, help="labels older than this many days")
    prune.add_argument("--all", action="store_true", help="remove every label (start empty)")
    prune.set_defaults(handler=_labels_prune)


# --------------------------------------------------------------------------------------------------
# operator connect
# --------------------------------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> int:
    import getpass

    from rich.console import Console

    from agent.prompts import OperatorClient, OperatorError

    console = Console(highlight=False, soft_wrap=True)
    name = args.name or getpass.getuser() or "operator"
    save_dir = args.save_dir or Path(tempfile.gettempdir()) / "crystal-locator-prompts"
    if (args.curve_secret is None) != (args.server_key is None):
        raise CommandError("CURVE needs both --curve-secret and --server-key")
    try:
        client = OperatorClient(
            args.endpoint,
            event_endpoint=args.event_endpoint,
            timeout_s=args.timeout_s,
            curve_keys=args.curve_secret,
            server_public_key=args.server_key,
        )
    except OperatorError as exc:
        raise CommandError(f"cannot connect to the agent at {args.endpoint}: {exc}") from exc
    preview = args.preview == "always" or (args.preview == "auto" and console.is_terminal)
    session = _TerminalSession(client, console, name, save_dir, preview, args.max_prompts, args.idle_exit_s)
    console.print(f"connected to {args.endpoint} as [bold]{name}[/]; images go to {save_dir}")
    try:
        return session.run()
    finally:
        client.close()


class _TerminalSession:
    """One operator at a terminal: a queue of open prompts, the one being answered, and stdin."""

    def __init__(
        self, client: Any, console: Any, name: str, save_dir: Path, preview: bool, max_prompts: int, idle_exit_s: float
    ) -> None:
        self.client = client
        self.console = console
        self.name = name
        self.save_dir = save_dir
        self.preview = preview
        self.max_prompts = max_prompts
        self.idle_exit_s = idle_exit_s
        self.pending: dict[str, Any] = {}
        self.current: Any = None
        self.closed_count = 0
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdin_open = True
        threading.Thread(target=self._read_stdin, name="operator-stdin", daemon=True).start()

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            self.lines.put(line.strip())
        self.lines.put(None)

    def run(self) -> int:
        from agent.prompts import PromptClosed, PromptInfo

        idle_since = time.monotonic()
        while True:
            event = self.client.next_event(0.1)
            if isinstance(event, PromptInfo):
                self.pending[event.id] = event
            elif isinstance(event, PromptClosed):
                self._closed_elsewhere(event)
            if self.current is None and self.pending:
                self.current = self.pending.pop(next(iter(self.pending)))
                self._show(self.current)
            if self.current is not None:
                idle_since = time.monotonic()
                if not self._take_input():
                    return 0
            if self.max_prompts and self.closed_count >= self.max_prompts:
                self.console.print(f"{self.closed_count} prompt(s) done; exiting")
                return 0
            if self.idle_exit_s and self.current is None and time.monotonic() - idle_since > self.idle_exit_s:
                self.console.print(f"no prompt for {self.idle_exit_s:.0f} s; exiting")
                return 0
            if not self.stdin_open and self.current is None:
                self.console.print("input closed; exiting")
                return 0

    def _closed_elsewhere(self, notice: Any) -> None:
        how = f"answered by {notice.answered_by} ({', '.join(notice.option_ids)})" if notice.state == "answered" \
            else notice.state
        if self.current is not None and notice.prompt_id == self.current.id:
            self.console.print(f"[yellow]prompt {notice.prompt_id[:8]} closed while you were choosing: {how}[/]")
            self.current = None
            self.closed_count += 1
        elif self.pending.pop(notice.prompt_id, None) is not None:
            self.console.print(f"[yellow]queued prompt {notice.prompt_id[:8]} closed: {how}[/]")
            self.closed_count += 1

    def _take_input(self) -> bool:
        """Handle one line of input for the current prompt, if there is one; False to quit."""
        from agent.prompts import AnswerRefusedError, InvalidAnswerError, OperatorError

        try:
            line = self.lines.get_nowait()
        except queue.Empty:
            return True
        if line is None:
            self.stdin_open = False
            self.console.print("[yellow]input closed; the open prompt stays with the agent[/]")
            self.current = None
            return True
        prompt = self.current
        if line.lower() in ("q", "quit", "exit"):
            self.console.print("bye")
            return False
        if line.lower() in ("s", "skip"):
            self.console.print(f"skipped prompt {prompt.id[:8]}")
            self.current = None
            self.closed_count += 1
            return True
        if not line:
            self.console.print(f"{prompt.seconds_left_now():.0f} s left; {_HINT}")
            return True
        try:
            option_ids = parse_choice(line, [o.id for o in prompt.options])
            reply = self.client.answer(prompt.id, option_ids, operator=self.name)
        except InvalidAnswerError as exc:
            self.console.print(f"[red]not accepted: {exc}[/]; {_HINT}")
            return True
        except AnswerRefusedError as exc:
            self.console.print(f"[yellow]not accepted ({exc.code}): {exc}[/]")
        except OperatorError as exc:
            self.console.print(f"[red]could not send the answer: {exc}[/]; try again")
            return True
        else:
            self.console.print(f"[green]accepted[/]: {', '.join(reply.option_ids)} (prompt {prompt.id[:8]})")
        self.current = None
        self.closed_count += 1
        return True

    def _show(self, prompt: Any) -> None:
        from rich.markup import escape
        from rich.panel import Panel
        from rich.table import Table

        from agent.prompts import save_prompt_images

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        for number, option in enumerate(prompt.options, start=1):
            text = escape(option.label) + (f" [dim]- {escape(option.description)}[/]" if option.description else "")
            table.add_row(f"{number}", f"{text} [dim]({escape(option.id)})[/]")
        deadline = prompt.deadline_utc.strftime("%H:%M:%S UTC")
        choose = "choose one or more" if prompt.multiple else "choose one"
        left_s = prompt.seconds_left_now()
        title = f"prompt {prompt.id[:8]} ({prompt.kind}): {choose}, {left_s:.0f} s left (until {deadline})"
        self.console.print(f"[bold]{escape(prompt.question)}[/]")
        self.console.print(Panel(table, title=title, title_align="left"))
        if prompt.images:
            try:
                paths = save_prompt_images(prompt, self.save_dir)
                self.console.print("images: " + ", ".join(str(p) for p in paths))
            except OSError as exc:
                self.console.print(f"[red]could not save the images to {self.save_dir}: {exc}[/]")
            if self.preview:
                first = next(iter(prompt.images.values()))
                self.console.print(preview_text(first))
        self.console.print(_HINT)


def parse_choice(line: str, option_ids: list[str]) -> list[str]:
    """Option ids from a typed answer: numbers (1-based) or ids, separated by commas or spaces."""
    from agent.prompts import InvalidAnswerError

    chosen = []
    for token in line.replace(",", " ").split():
        if token.isdigit():
            index = int(token)
            if not 1 <= index <= len(option_ids):
                raise InvalidAnswerError(f"there is no option {index}; choose 1 to {len(option_ids)}")
            chosen.append(option_ids[index - 1])
        elif token in option_ids:
            chosen.append(token)
        else:
            raise InvalidAnswerError(f"{token!r} is neither an option number nor an option id")
    return chosen


def preview_text(png: bytes, width_chars: int = 64) -> Any:
    """A colour preview of a PNG for the terminal (two image rows per text row, half blocks)."""
    import numpy as np
    from PIL import Image
    from rich.text import Text

    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
        rows = max(2, round(rgb.height * width_chars / max(1, rgb.width) / 2) * 2)
        pixels = np.asarray(rgb.resize((width_chars, rows)))
    text = Text()
    for r in range(0, rows, 2):
        for c in range(width_chars):
            top, bottom = pixels[r, c], pixels[r + 1, c]
            text.append("▀", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bottom[0]},{bottom[1]},{bottom[2]})")
        text.append("\n")
    return text


# --------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------


def _memory(args: argparse.Namespace) -> Any:
    from agent.prompts import LabelMemory, LabelMemoryError, default_labels_dir

    try:
        return LabelMemory(args.labels or default_labels_dir())
    except LabelMemoryError as exc:
        raise CommandError(str(exc)) from exc


def _labels_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    memory = _memory(args)
    records = memory.list_records(specimen=args.specimen, preset=args.preset, session=args.session)
    if args.json:
        for record in records:
            print(record.model_dump_json())
        return 0
    table = Table()
    for column in ("time (UTC)", "specimen", "preset", "session", "cluster", "crystal", "source", "features"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.time_utc.strftime("%Y-%m-%d %H:%M"), r.specimen, r.preset, r.session,
            "" if r.cluster_id is None else str(r.cluster_id), "yes" if r.is_crystal else "no",
            r.source + (f" ({r.operator})" if r.operator else ""), str(len(r.feature_names)),
        )
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # piped: do not wrap at 80
    objects = memory.object_records()
    outcomes = sum(1 for r in objects if r.is_outcome)
    console.print(f"{len(records)} labels in {memory.path}; {len(objects)} object records ({outcomes} visit outcomes, "
                  f"{len(objects) - outcomes} spread answers) for the crystal classifier")
    console.print(table)
    if memory.skipped_lines:
        console.print(f"[yellow]{memory.skipped_lines} unreadable line(s) skipped[/]")
    return 0


def _labels_export(args: argparse.Namespace) -> int:
    memory = _memory(args)
    try:
        path = memory.export(args.out)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from exc
    print(f"exported {len(memory)} label(s) and {len(memory.object_records())} object record(s) to {path}")
    return 0


def _labels_import(args: argparse.Namespace) -> int:
    from agent.prompts import LabelMemoryError

    memory = _memory(args)
    try:
        added = memory.import_file(args.file)
    except LabelMemoryError as exc:
        raise CommandError(str(exc)) from exc
    print(f"added {added} record(s) from {args.file}; {len(memory)} label(s) and {len(memory.object_records())} "
          f"object record(s) in {memory.path}")
    return 0


def _labels_prune(args: argparse.Namespace) -> int:
    from agent.prompts import LabelMemoryError

    memory = _memory(args)
    if args.all:
        removed = memory.clear()
    else:
        older_than_s = None if args.older_than_days is None else args.older_than_days * 86400.0
        try:
            removed = memory.prune(
                specimen=args.specimen, older_than_s=older_than_s, session=args.session, source=args.source
            )
        except LabelMemoryError as exc:
            raise CommandError(f"{exc} (or pass --all)") from exc
    print(f"removed {removed} label(s); {len(memory)} left in {memory.path}")
    return 0
