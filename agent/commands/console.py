"""`crystal-locator console`: the operator web console, attached to a running agent or to a demo session.

    crystal-locator screen --simulated --operator tcp://127.0.0.1:5560 --events tcp://127.0.0.1:5561 \\
        --control tcp://127.0.0.1:5562 &
    crystal-locator console --agent tcp://127.0.0.1:5562 [--listen 127.0.0.1:8765] [--token-file F]
    crystal-locator console --demo [--seed N] [--step-s S]

The console asks the agent's control socket (`screen --control`) where its events, prompts and session
folder are, follows the session live, answers prompts as one more operator client and survives the agent
being stopped and started again. `--demo` runs a short screening session (the real loop, on a small
simulated microscope at a pace you can follow, in a temporary folder) inside the console instead: its
labelling prompt waits for your answer. The console listens on 127.0.0.1 by default: from another
machine, tunnel (`ssh -L 8765:127.0.0.1:8765 microscope-pc`) or listen elsewhere with an access token
(generated and printed, or `--token-file`). Needs the `console` extra: `pip install 'crystal-locator[console]'`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.cli import CommandError

logger = logging.getLogger(__name__)

#: The demo's microscope: a specimen type of `simulator.SPECIMEN_TYPES` and a small camera (px), so that a
#: demo session takes seconds.
DEMO_SPECIMEN = "protein-plates"
DEMO_CAMERA_PX = 384
#: Wall seconds the demo spends on each stage move, preset change and exposure (see `PacedMicroscope`).
DEMO_STEP_S = 0.5
#: How long the demo's labelling prompt waits for an answer, seconds of wall time.
DEMO_PROMPT_TIMEOUT_S = 120.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `console` command."""
    parser = subparsers.add_parser(
        "console",
        help="web console: follow a running session and answer prompts from a browser",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--agent", metavar="ENDPOINT", help="the agent's control endpoint (crystal-locator screen --control ENDPOINT)"
    )
    source.add_argument(
        "--demo",
        action="store_true",
        help="run a short demo session on a small simulated microscope inside the console",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8765",
        metavar="[HOST:]PORT",
        help="where the web server listens (default 127.0.0.1:8765; other hosts need a token)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="access token (first line, >= 16 characters); default: generated off loopback",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="DIR",
        help="label-memory folder for marks made in the explore view (default: per-user folder; --demo: none)",
    )
    parser.add_argument(
        "--explore-dir",
        type=Path,
        metavar="DIR",
        help="folder whose images the explore view may open (besides uploads and the atlas)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--demo: seed of the specimen and the plan (default 0)")
    parser.add_argument(
        "--step-s",
        type=float,
        default=DEMO_STEP_S,
        metavar="S",
        help=f"--demo: wall seconds per stage move, preset change or exposure (default {DEMO_STEP_S})",
    )
    parser.set_defaults(handler=run_console)


def run_console(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator console`."""
    try:
        from agent.console.security import SecurityError, read_token_file
        from agent.console.server import parse_listen
    except ImportError as exc:  # the optional extra is missing
        raise CommandError(f"the console needs its extra: pip install 'crystal-locator[console]' ({exc})") from exc

    try:
        host, port = parse_listen(args.listen)
        token = read_token_file(args.token_file) if args.token_file else None
    except (ValueError, SecurityError) as exc:
        raise CommandError(str(exc)) from exc
    if args.explore_dir is not None and not args.explore_dir.is_dir():
        raise CommandError(f"--explore-dir {args.explore_dir} is not a folder")
    if args.demo:
        return _run_demo(args, host, port, token)
    return _run_attached(args, host, port, token)


def _label_memory(folder: Path | None) -> Any:
    """The label memory in `folder` (default: the per-user folder); CommandError if it cannot be opened."""
    from agent.prompts import LabelMemory, LabelMemoryError, default_labels_dir

    try:
        return LabelMemory(folder or default_labels_dir())
    except LabelMemoryError as exc:
        raise CommandError(str(exc)) from exc


def _run_attached(args: argparse.Namespace, host: str, port: int, token: str | None) -> int:
    """`--agent`: serve a console attached to a running agent until Ctrl-C."""
    from agent.console.links import LinkError
    from agent.console.security import SecurityError
    from agent.console.server import start_console_for_agent

    labels = _label_memory(args.labels)
    try:
        handle = start_console_for_agent(
            args.agent, host, port, token, labels=labels, explore_dir=args.explore_dir, background=False
        )
    except (LinkError, SecurityError) as exc:
        raise CommandError(str(exc)) from exc
    _print_url(handle, args)
    print(f"console: following the agent at {args.agent} (Ctrl-C to stop)", flush=True)
    handle.serve_forever()
    return 0


def _print_url(handle: Any, args: argparse.Namespace) -> None:
    print(f"console: {handle.url}", flush=True)
    if handle.token and args.token_file is None:
        print("console: the access token is in the URL above; share it only with operators", flush=True)


def demo_microscope(seed: int = 0, camera_px: int = DEMO_CAMERA_PX, specimen: str = DEMO_SPECIMEN) -> tuple[Any, Any]:
    """The demo's microscope (a simulated `specimen`, `camera_px` square camera, seeded) and a calibration
    of it (its true image -> stage matrices, as a calibration store would hold for an instrument)."""
    from agent.config import PresetNames
    from agent.steps.stage_calibration import CalibrationSet, PresetCalibration
    from simulator import create_simulated_microscope

    microscope = create_simulated_microscope(specimen, seed=seed, camera_shape_px=(camera_px, camera_px))
    info = microscope.info()
    calibration = CalibrationSet(instrument=info.name)
    for preset in PresetNames().model_dump().values():
        measured = PresetCalibration.from_matrix(
            preset,
            microscope.true_image_to_stage_matrix(preset),
            info.preset(preset).pixel_size_um,
            residual_px=0.0,
            shift_um=0.0,
            stage_xy_um=(0.0, 0.0),
            measured_utc="1970-01-01T00:00:00+00:00",
        )
        calibration = calibration.with_preset(measured)
    return microscope, calibration


def _run_demo(args: argparse.Namespace, host: str, port: int, token: str | None) -> int:
    """`--demo`: a demo session inside the console; the console serves on after it ends, until Ctrl-C."""
    from agent.console.demo import ScriptedSession
    from agent.console.security import SecurityError
    from agent.console.server import start_console_for_session
    from agent.prompts import OperatorChannel
    from agent.session.events import EventBus
    from agent.session.states import TERMINAL_STATES

    if args.step_s < 0:
        raise CommandError("--step-s must be >= 0")
    labels = _label_memory(args.labels) if args.labels is not None else None  # a demo keeps its answers to itself
    microscope, calibration = demo_microscope(args.seed)
    session_dir = Path(tempfile.mkdtemp(prefix="crystal-locator-demo-")) / f"demo-{args.seed}"
    events, channel = EventBus(), OperatorChannel("tcp://127.0.0.1:0")
    session = ScriptedSession(
        microscope,
        session_dir,
        events,
        channel,
        specimen=DEMO_SPECIMEN,
        seed=args.seed,
        step_s=args.step_s,
        prompt_timeout_s=DEMO_PROMPT_TIMEOUT_S,
        calibration=calibration,
        labels=labels,
    )
    try:
        handle = start_console_for_session(session, channel, host, port, token, explore_dir=args.explore_dir)
    except SecurityError as exc:
        channel.close()
        events.close()
        raise CommandError(str(exc)) from exc
    _print_url(handle, args)
    print(
        f"console: demo session in {session_dir}; its prompt waits {DEMO_PROMPT_TIMEOUT_S:.0f} s for your "
        "answer (Ctrl-C to stop)",
        flush=True,
    )
    session.start()
    try:
        while session.state not in TERMINAL_STATES:
            time.sleep(0.5)
        print(f"console: the demo session ended ({session.state}); the console stays up (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        session.stop(10)
        handle.stop()
        channel.close()
        events.close()
    return 0
