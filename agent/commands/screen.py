"""`crystal-locator screen`: run (or resume) a screening session on a simulated or real microscope.

    crystal-locator screen --simulated [--specimen TYPE] [--seed N] [--plan plan.toml] [--out DIR]
    crystal-locator screen --tiles DIR [--pixel-size-um X] ...
    crystal-locator screen --bridge tcp://127.0.0.1:5555 ...
    crystal-locator screen --simulated|--bridge ... --atlas GRIDMAP.mrc.mdoc --nav grid.nav [--map-id N]
    crystal-locator screen --resume SESSION_DIR
    crystal-locator screen --simulated|--bridge ... --grids 1-12      (multi-grid run: agent.commands.grid_run)

How the microscope was made is saved in the session folder (`source.json`), so `--resume` needs nothing
else.
"""
# This is the one place in `agent` that imports `simulator` (to wire a simulated session up).

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.cli import CommandError, check_out_folder

logger = logging.getLogger(__name__)

SOURCE_NAME = "source.json"
DEFAULT_SPECIMEN = "protein-plates"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `screen` command."""
    parser = subparsers.add_parser(
        "screen",
        help="run a screening session (simulated, dataset tiles, or a real microscope over the bridge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--simulated", action="store_true", help="a simulated microscope with ground truth")
    source.add_argument("--tiles", type=Path, metavar="DIR", help="serve a montage of real image tiles")
    source.add_argument("--bridge", metavar="ENDPOINT", help="a microscope behind `crystal-locator bridge serve`")
    source.add_argument("--resume", type=Path, metavar="SESSION_DIR", help="continue a session that stopped")
    parser.add_argument("--specimen", default=None, help=f"specimen type (simulated; default {DEFAULT_SPECIMEN})")
    parser.add_argument("--seed", type=int, default=None, help="random seed (specimen, session; default 0)")
    parser.add_argument("--pixel-size-um", type=float, default=None, help="pixel size of the tiles, um")
    parser.add_argument("--camera-px", type=int, default=None, help="simulated camera side, px (default 2048)")
    parser.add_argument("--clock", metavar="PROFILE", default=None,
                        help="simulated timing: thermo-serialem (default), krios, jeol-fast, or a .json of figures")
    parser.add_argument("--conditions", choices=("none", "realistic"), default=None,
                        help="simulated grid conditions (simulator.conditions): none (default) or realistic")
    parser.add_argument("--plan", type=Path, help="screening plan (.toml, .yaml or .json)")
    parser.add_argument("--out", type=Path, help="session folder (default: sessions/<date-time>)")
    parser.add_argument("--max-targets", type=int,
                        help="cap on the targets (plan: targeting.max_targets; default none: the budget decides)")
    parser.add_argument("--squares", type=int,
                        help="map exactly this many grid squares, once (plan: area.squares; default: blocks of "
                             "area.squares_per_round=4 squares, one after the other, while the budget lasts)")
    parser.add_argument("--squares-per-round", type=int,
                        help="grid squares mapped per round when the budget sizes the session (plan: "
                             "area.squares_per_round; default 4)")
    parser.add_argument("--time-budget-s", type=float,
                        help="microscope seconds the session may use (plan: time_budget_s; default 3600)")
    _add_serialem_map_options(parser)
    parser.add_argument(
        "--operator",
        default="none",
        metavar="{none,simulated,ENDPOINT}",
        help="who answers prompts: none (fallback only), simulated (ground truth), or bind ENDPOINT for operators",
    )
    parser.add_argument(
        "--instrument-seed",
        type=int,
        default=None,
        metavar="N",
        help="which simulated instrument (its camera rotation and scale errors; name simulated-tem[-N]; default 0)",
    )
    parser.add_argument(
        "--calibrations",
        type=Path,
        metavar="DIR",
        help="the instruments' calibration store (default: $CRYSTAL_LOCATOR_CALIBRATIONS, else beside the labels)",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure every preset's calibration again (and store it) instead of checking the stored one",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="check this calibration.json (same instrument) instead of the store's; the store is not touched",
    )
    parser.add_argument("--labels", type=Path,
                        help="label-memory folder (default: the per-user data folder; its simulated/ sub-folder "
                             "for a simulated microscope)")
    parser.add_argument("--no-labels", action="store_true", help="do not use or update label memory")
    parser.add_argument("--events", metavar="ENDPOINT", help="publish session events on this PUB endpoint")
    parser.add_argument("--control", metavar="ENDPOINT", help="serve pause/resume/abort on this endpoint")
    # -- web console (agent.console) --
    parser.add_argument(
        "--console",
        metavar="[HOST:]PORT",
        help="operator web console for this session (host 127.0.0.1 unless given; others need a token)",
    )
    parser.add_argument("--console-token-file", type=Path, metavar="FILE", help="access token for --console")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_grid_options(parser)
    parser.set_defaults(handler=run_screen)


def _add_grid_options(parser: argparse.ArgumentParser) -> None:
    """The options of a multi-grid run from the autoloader cassette (`agent.commands.grid_run`)."""
    grids = parser.add_argument_group("multi-grid runs (autoloader cassette)")
    grids.add_argument("--grids", metavar="SLOTS",
                       help="atlas pass over these cassette slots (e.g. 1-12 or 1,3,5-7), rank the grids, screen the "
                            "best in the budget (default budget: one hour per slot)")
    grids.add_argument("--cassette", metavar="default|FILE.json",
                       help="the simulated cassette with --simulated --grids (default: a varied 12-slot cassette)")
    grids.add_argument("--grid-budget-s", type=float, help="microscope seconds of screening per grid (default 2400)")
    grids.add_argument("--atlas-squares", type=int, help="grid squares each grid's atlas pass maps (default 4)")
    grids.add_argument("--max-grids", type=int, help="screen at most this many grids (default: the budget decides)")
    grids.add_argument("--probe-targets", type=int,
                       help="targets each grid's atlas pass visits to measure its hit rate (default 6)")
    grids.add_argument("--switch-after-visits", type=int,
                       help="leave a grid whose visits diffract far less than promised after this many (default 12; "
                            "0: never)")


def _source_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.resume is not None:
        path = args.resume / SOURCE_NAME
        try:
            source = dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise CommandError(f"{args.resume}: cannot resume, {SOURCE_NAME} missing or unreadable ({exc})") from exc
        if args.clock is not None and args.clock != source.get("clock"):
            raise CommandError(f"--resume keeps the session's clock ({source.get('clock')}); drop --clock")
        if args.conditions is not None and args.conditions != (source.get("conditions") or "none"):
            raise CommandError(f"--resume keeps the session's conditions ({source.get('conditions') or 'none'}); "
                               "drop --conditions")
        if args.instrument_seed is not None and args.instrument_seed != int(source.get("instrument_seed") or 0):
            raise CommandError(
                f"--resume keeps the session's instrument (seed {int(source.get('instrument_seed') or 0)}); "
                "drop --instrument-seed"
            )
        if "calibration" in source and (args.calibrations or args.calibration or args.recalibrate):
            raise CommandError(
                f"--resume keeps the session's calibration source ({source['calibration']}); drop --calibrations, "
                "--calibration and --recalibrate"
            )
        return source
    if args.conditions is not None and not args.simulated:
        raise CommandError("--conditions sets the simulated grid's conditions; it goes with --simulated")
    if args.bridge is not None:
        if args.clock is not None:
            raise CommandError("--clock sets the simulator's timing; a microscope behind a bridge keeps its own")
        return {"kind": "bridge", "endpoint": args.bridge, "calibration": calibration_source(args)}
    if args.simulated:
        return {
            "calibration": calibration_source(args),
            "kind": "simulated",
            "specimen": args.specimen or DEFAULT_SPECIMEN,
            "seed": args.seed or 0,
            "camera_px": args.camera_px,
            "instrument_seed": args.instrument_seed or 0,
            "clock": clock_profile_arg(args.clock),
            **({"conditions": args.conditions} if args.conditions else {}),
        }
    return {
        "calibration": calibration_source(args),
        "kind": "tiles",
        "tiles": str(args.tiles.resolve()),
        "pixel_size_um": args.pixel_size_um,
        "seed": args.seed or 0,
        "camera_px": args.camera_px,
        "instrument_seed": args.instrument_seed or 0,
        "clock": clock_profile_arg(args.clock),
    }


def calibration_source(args: argparse.Namespace) -> dict[str, Any]:
    """Where a new session's calibration comes from, as saved in `source.json` so that `--resume` uses the same:
    `{"file": PATH | None, "store": DIR | None, "recalibrate": bool}` (absolute paths)."""
    from agent.steps.calibration_store import default_calibrations_dir

    if args.calibration is not None:
        return {"file": str(Path(args.calibration).resolve()), "store": None, "recalibrate": False}
    store = Path(args.calibrations) if args.calibrations else default_calibrations_dir()
    return {"file": None, "store": str(store.expanduser().resolve()), "recalibrate": bool(args.recalibrate)}


def clock_profile_arg(value: str | None) -> Any:
    """`--clock PROFILE` checked: a profile name (default `thermo-serialem`) as it is, a `.json` file read into
    its figures (so that the session keeps them); `CommandError` with the names otherwise."""
    from simulator.timing import DEFAULT_PROFILE, PROFILES, resolve_profile

    try:
        profile = resolve_profile(value or DEFAULT_PROFILE)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    return profile.name if profile.name in PROFILES and PROFILES[profile.name] == profile else profile.model_dump()


def make_microscope(
    source: dict[str, Any], start: Any | None = None, extra: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """The microscope described by `source` and its ground truth (None unless simulated).

    `start` (an `agent.session.restore.ResumePoint`) is where a resumed session continues: a simulator is
    started at its microscope time, stage position and preset, as a real stage simply stays where it was.
    `extra`: more simulator arguments (a resumed multi-grid run's cassette state). A `cassette` in `source` makes
    a simulated autoloader cassette (`simulator.cassette`) instead of one specimen."""
    kind = source["kind"]
    if kind in ("simulated", "tiles"):
        from simulator import create_simulated_microscope

        kwargs: dict[str, Any] = {"seed": int(source.get("seed") or 0), **_simulator_start(start), **(extra or {})}
        kwargs["clock_profile"] = source.get("clock")  # None (sessions before --clock): the default profile
        if source.get("camera_px"):
            kwargs["camera_shape_px"] = (int(source["camera_px"]), int(source["camera_px"]))
        kwargs["instrument_seed"] = int(source.get("instrument_seed") or 0)
        kwargs["conditions"] = source.get("conditions")  # None (sessions before --conditions): none
        try:
            if kind == "simulated" and source.get("cassette") is not None:
                microscope = create_simulated_microscope(cassette=cassette_spec(source["cassette"]), **kwargs)
            elif kind == "simulated":
                microscope = create_simulated_microscope(specimen_type=source["specimen"], **kwargs)
            else:
                microscope = create_simulated_microscope(
                    tiles=source["tiles"], pixel_size_um=source.get("pixel_size_um"), **kwargs
                )
        except (ValueError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        return microscope, getattr(microscope, "ground_truth", None)
    if kind == "bridge":
        from drivers.zmq_bridge import BridgeClient

        try:
            return BridgeClient(source["endpoint"]), None
        except Exception as exc:
            raise CommandError(f"cannot connect to the bridge at {source['endpoint']}: {exc}") from exc
    raise CommandError(f"unknown microscope source {kind!r}")


def cassette_spec(saved: Any) -> Any:
    """The simulated cassette a run saved in its `source.json`: `"default"` or its slots (JSON)."""
    if saved == "default":
        return "default"
    from simulator.cassette import cassette_spec_from

    return cassette_spec_from(saved, where="source.json")


def _simulator_start(start: Any | None) -> dict[str, Any]:
    """`create_simulated_microscope` arguments that start a simulator at a resume point (none without one)."""
    if start is None:
        return {}
    kwargs: dict[str, Any] = {"start_time_s": start.microscope_time_s}
    if start.stage is not None:
        kwargs["start_stage"] = start.stage
    if start.optics_preset is not None:
        kwargs["initial_preset"] = start.optics_preset
    if start.in_diffraction:
        kwargs["initial_diffraction"] = True
    return kwargs


def _label_memory(folder: Path | None, *, simulated: bool) -> Any:
    """The session's label memory. By default a simulated microscope's sessions keep theirs apart from real
    ones (`<labels>/simulated`); on a real microscope answers stored as `simulated` (from a simulated operator,
    or a memory shared on purpose with `--labels`) carry no weight as votes."""
    from agent.prompts.label_log import default_labels_dir
    from agent.prompts.label_votes import DEFAULT_SOURCE_WEIGHTS
    from agent.prompts.memory import LabelMemory

    if folder is None:
        folder = default_labels_dir() / "simulated" if simulated else default_labels_dir()
    weights = None if simulated else {**DEFAULT_SOURCE_WEIGHTS, "simulated": 0.0}
    return LabelMemory(folder, source_weights=weights)


def _plan_from_args(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    from agent.config import PlanError, ScreeningPlan, load_plan

    try:
        plan = load_plan(args.plan) if args.plan else ScreeningPlan()
    except PlanError as exc:
        raise CommandError(str(exc)) from exc
    updates: dict[str, Any] = {}
    if source["kind"] == "simulated" and plan.specimen is None:
        updates["specimen"] = source["specimen"]
    if args.seed is not None:
        updates["seed"] = args.seed
    if args.time_budget_s is not None:
        updates["time_budget_s"] = args.time_budget_s
    if args.max_targets is not None:
        updates["targeting"] = plan.targeting.model_copy(update={"max_targets": args.max_targets})
    area_updates = {
        key: value
        for key, value in (("squares", args.squares), ("squares_per_round", args.squares_per_round))
        if value is not None
    }
    if getattr(args, "serialem_map", None) is not None:
        area_updates["serialem_map"] = args.serialem_map
    if area_updates:
        updates["area"] = plan.area.model_copy(update=area_updates)
    if updates:
        try:
            plan = ScreeningPlan.model_validate(
                {
                    **plan.model_dump(),
                    **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in updates.items()},
                }
            )
        except ValidationError as exc:
            raise CommandError(_option_error(exc)) from None
    return plan


def _add_serialem_map_options(parser: argparse.ArgumentParser) -> None:
    """`--atlas`, `--nav`, `--map-id`: start from a SerialEM grid map (`agent.steps.serialem_map`)."""
    parser.add_argument("--atlas", type=Path, metavar="GRIDMAP.mrc.mdoc",
                        help="use this SerialEM montage as the atlas (with --nav): no overview, no mapping; with "
                             "--simulated, the same --specimen and --seed as the map was taken of")
    parser.add_argument("--nav", type=Path, metavar="NAV",
                        help="the SerialEM navigator holding --atlas's map item; the targets go to a copy of it, "
                             "targets_on_map.nav in the session folder")
    parser.add_argument("--map-id", type=int, metavar="N",
                        help="MapID of the map item in --nav (default: its only montage map item of --atlas)")


def serialem_map_arg(args: argparse.Namespace) -> Any:
    """`--atlas/--nav/--map-id` loaded and checked (`agent.steps.serialem_map`): the plan's `area.serialem_map`
    (absolute paths, the map id resolved), None without them; `CommandError` with the reason otherwise, before
    anything is written."""
    atlas, nav, map_id = getattr(args, "atlas", None), getattr(args, "nav", None), getattr(args, "map_id", None)
    if atlas is None and nav is None and map_id is None:
        return None
    if args.resume is not None:
        raise CommandError("--resume keeps the session's SerialEM map (its plan.json); drop --atlas, --nav, --map-id")
    if atlas is None or nav is None:
        raise CommandError("--atlas GRIDMAP.mrc.mdoc and --nav grid.nav go together (--map-id N picks the map item)")
    if args.squares is not None or args.squares_per_round is not None:
        raise CommandError("--atlas is the area to screen: drop --squares and --squares-per-round")
    from agent.config import PlanError, ScreeningPlan, SerialemMapPlan, load_plan
    from agent.steps.serialem_map import SerialemMapError, load_serialem_map

    try:  # the session checks the map at its plan's confirm radius: so does this check
        tolerance_um = (load_plan(args.plan) if args.plan else ScreeningPlan()).confirm.radius_um
    except PlanError as exc:
        raise CommandError(str(exc)) from None
    try:
        loaded = load_serialem_map(atlas, nav, map_id, tolerance_um=tolerance_um)
    except SerialemMapError as exc:
        raise CommandError(f"--atlas refused: {exc}") from None
    logger.info("%s", loaded.describe())
    return SerialemMapPlan(mdoc_path=str(atlas.resolve()), nav_path=str(nav.resolve()), map_id=loaded.map_id)


#: The command-line option of each plan field the `screen` flags override.
_OPTION_OF_FIELD = {
    "targeting.max_targets": "--max-targets",
    "area.squares": "--squares",
    "area.squares_per_round": "--squares-per-round",
    "time_budget_s": "--time-budget-s",
    "seed": "--seed",
}


def _option_error(exc: Any) -> str:
    """One line naming the option and what is wrong with its value, from a plan's `ValidationError`."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    if not field:  # a check of the whole plan (e.g. a budget too small for one target): its message names the field
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{_OPTION_OF_FIELD.get(field, field)} {error['input']!r}: {error['msg']}"


def run_screen(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator screen`."""
    from rich.console import Console

    from agent.grids.records import is_run_folder
    from agent.session.events import EventBus
    from agent.session.journal import read_journal
    from agent.session.progress import summary_table

    if args.grids is not None or (args.resume is not None and is_run_folder(args.resume)):
        from agent.commands.grid_run import run_grids

        return run_grids(args)
    if args.cassette is not None:
        raise CommandError("--cassette describes the simulated cassette of a multi-grid run: add --grids SLOTS")
    if args.resume is None and args.out is not None:
        check_out_folder(args.out, "session folder")
    source = _source_from_args(args)
    args.serialem_map = serialem_map_arg(args)  # checked before anything is written
    session_dir = args.resume or args.out or Path("sessions") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.resume is None and (session_dir / "journal.jsonl").exists() and read_journal(session_dir / "journal.jsonl"):
        raise CommandError(f"{session_dir} already holds a session; use --resume {session_dir} or another --out")
    start = None
    if args.resume is not None:
        from agent.session.restore import resume_point

        start = resume_point(args.resume)
    microscope, truth = make_microscope(source, start)
    labels = None
    if not args.no_labels:
        labels = _label_memory(args.labels, simulated=microscope.info().simulated)
    events = EventBus(args.events)
    channel = simulated_operator = None
    try:
        channel, simulated_operator = _start_operator(args.operator, truth)
        session = _make_session(args, source, session_dir, microscope, truth, labels, channel, events)
        summary = _run_with_services(args, session, channel, events)
    finally:
        if simulated_operator is not None:
            simulated_operator.stop()
        if channel is not None:
            channel.close()
        events.close()
        close = getattr(microscope, "close", None)
        if callable(close):
            close()
    report = _write_report(session_dir)
    data = summary.model_dump(mode="json")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        Console().print(summary_table(data))
        if report is not None:
            Console().print(f"report: {report}")
    return 0 if summary.state == "done" else 1


def _make_session(
    args: argparse.Namespace,
    source: dict[str, Any],
    session_dir: Path,
    microscope: Any,
    truth: Any,
    labels: Any,
    channel: Any,
    events: Any,
) -> Any:
    """A new session in `session_dir` (its source saved for `--resume`), or the one resumed from there."""
    from agent.session.screening import ScreeningSession, SessionError
    from drivers.formats.images import write_atomic

    kwargs: dict[str, Any] = {"labels": labels, "operator": channel, "events": events}
    kwargs.update(_calibration_kwargs(args, microscope, source.get("calibration")))
    if truth is not None:
        kwargs["truth_scorer"] = truth_scorer(truth)
    try:
        if args.resume is not None:
            return ScreeningSession.resume(microscope, session_dir, **kwargs)
        plan = _plan_from_args(args, source)
        session_dir.mkdir(parents=True, exist_ok=True)
        session = ScreeningSession(microscope, plan, session_dir, **kwargs)
        # only a session that could start gets its source (a refused one leaves nothing to --resume)
        write_atomic(session_dir / SOURCE_NAME, json.dumps(source, indent=2).encode())
        return session
    except SessionError as exc:
        raise CommandError(str(exc)) from exc


def _run_with_services(args: argparse.Namespace, session: Any, channel: Any, events: Any) -> Any:
    """Run `session` with what the flags ask for around it (control socket, web console, terminal progress,
    signal handlers); returns its summary."""
    from rich.console import Console

    from agent.session.events import ControlServer
    from agent.session.progress import TerminalProgress

    control = None
    if args.control:
        info = {
            "session_dir": str(Path(session.session_dir).resolve()),
            "events_endpoint": events.endpoint,
            "prompt_endpoint": channel.prompt_endpoint if channel is not None else None,
        }
        control = ControlServer(session, args.control, info=info)
    _install_signal_handlers(session)
    console = Console(stderr=True)
    console.print(f"session folder: {session.session_dir}")
    if channel is not None:
        console.print(f"operator prompts: {channel.prompt_endpoint}")
    if events.endpoint:
        console.print(f"events: {events.endpoint}")
    if control is not None:
        console.print(f"control: {control.endpoint}")
    progress = TerminalProgress(console, budget_s=session.plan.time_budget_s)
    events.subscribe(progress.on_event)
    web = None
    try:
        web = _start_console(args, session, channel, console)  # --console (agent.console)
        with progress:
            return session.run()
    finally:
        if web is not None:
            web.stop()
        if control is not None:
            control.close()


def _write_report(session_dir: Path) -> Path | None:
    """The session's self-contained HTML report; a failure is logged, never fatal (the data is on disk)."""
    from agent.report import write_session_report_or_log

    return write_session_report_or_log(session_dir)


def truth_scorer(truth: Any) -> Any:
    """The `ScreeningSession` truth scorer of a simulated specimen's ground truth (`simulator.scoring`)."""
    from simulator.scoring import score_session

    return lambda targets, results, box: score_session(truth, list(results.values()), box)


def _calibration_kwargs(args: argparse.Namespace, microscope: Any, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The session's calibration source: `--calibration FILE` (checked like a stored one; refused when it is of
    another instrument), else the instrument's store (`--calibrations DIR` or the default folder); and
    `--recalibrate`. A resumed session uses what its `source.json` saved (`saved`), whatever the flags."""
    if args.calibration is not None and args.recalibrate:
        raise CommandError("--recalibrate measures every preset: leave out --calibration FILE")
    if saved is not None:
        args = argparse.Namespace(
            **{
                **vars(args),
                "calibration": Path(saved["file"]) if saved.get("file") else None,
                "calibrations": Path(saved["store"]) if saved.get("store") else None,
                "recalibrate": bool(saved.get("recalibrate")),
            }
        )
    if args.calibration is not None:
        calibration = _load_calibration(args.calibration)
        name = microscope.info().name
        if calibration.instrument != name:
            raise CommandError(
                f"{args.calibration}: a calibration of instrument {calibration.instrument!r}, not of this microscope "
                f"{name!r}; refused (leave out --calibration to use this instrument's stored calibration, or "
                "measure again with --recalibrate)"
            )
        return {"stored_calibration": calibration}
    from agent.steps.calibration_store import CalibrationStore, default_calibrations_dir

    return {
        "calibration_store": CalibrationStore(args.calibrations or default_calibrations_dir()),
        "recalibrate": bool(args.recalibrate),
    }


def _load_calibration(path: Path) -> Any:
    """A saved `CalibrationSet` (`CommandError` naming the file when it cannot be read or has an unknown
    format version)."""
    from agent.steps.stage_calibration import CalibrationSet

    try:
        return CalibrationSet.load(path)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def _start_operator(mode: str, truth: Any) -> tuple[Any, Any]:
    """The agent-side prompt channel and, for `simulated`, the simulated operator answering on it."""
    if mode == "none":
        return None, None
    from agent.prompts.channel import OperatorChannel

    if mode == "simulated":
        if truth is None:
            raise CommandError("--operator simulated needs a simulated specimen with ground truth (--simulated)")
        from agent.prompts.simulated import PolicyOperator
        from simulator.operator import SimulatedAnswerPolicy

        channel = OperatorChannel("tcp://127.0.0.1:0")
        operator = PolicyOperator(channel.prompt_endpoint, SimulatedAnswerPolicy(truth))
        operator.start()
        return channel, operator
    try:
        return OperatorChannel(mode), None
    except Exception as exc:
        raise CommandError(f"cannot open the operator endpoint {mode}: {exc}") from exc


def _install_signal_handlers(session: Any) -> None:
    """SIGTERM/SIGINT abort the session at the next step boundary (results so far are kept)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def abort(signum: int, frame: object) -> None:
        logger.warning("signal %d: aborting at the next step; resume with --resume", signum)
        session.request_abort()

    signal.signal(signal.SIGTERM, abort)
    signal.signal(signal.SIGINT, abort)


def _start_console(args: argparse.Namespace, session: Any, channel: Any, console: Any) -> Any:
    """`--console [HOST:]PORT`: the operator web console next to the session (None without the flag)."""
    if not args.console:
        return None
    try:
        from agent.console import parse_listen, start_console_for_session
        from agent.console.security import SecurityError, read_token_file
    except ImportError as exc:
        raise CommandError(f"--console needs the extra: pip install 'crystal-locator[console]' ({exc})") from exc
    try:
        host, port = parse_listen(args.console)
        token = read_token_file(args.console_token_file) if args.console_token_file else None
        handle = start_console_for_session(session, channel, host, port, token)
    except (ValueError, SecurityError) as exc:
        raise CommandError(f"--console {args.console}: {exc}") from exc
    console.print(f"web console: {handle.url}")
    return handle
