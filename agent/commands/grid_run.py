"""`crystal-locator screen --grids SLOTS`: a multi-grid run from the autoloader cassette (`agent.grids.run`).

    crystal-locator screen --simulated --grids 1-12 [--cassette default|FILE.json] --time-budget-s 7200 --out RUN
    crystal-locator screen --bridge tcp://127.0.0.1:5555 --grids 1-6 ...
    crystal-locator screen --resume RUN

The run folder holds `source.json` (how the microscope was made), `grid_plan.json`, the run journal
`grids.jsonl`, one folder per grid (`grid-03/atlas`, `grid-03/screen`, each a screening session with its own
report), `run_summary.json` and the overview page `index.html`.
"""
# Like agent.commands.screen, this wires a simulator up (a simulated cassette).

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli import CommandError

SOURCE_NAME = "source.json"
GRID_PLAN_NAME = "grid_plan.json"


def run_grids(args: argparse.Namespace) -> int:
    """Handler of `screen --grids` and of `screen --resume RUN_FOLDER` (a multi-grid run). Everything that can be
    checked is checked before a grid is loaded or a file written: the slots against the cassette, the budget, the
    alert secrets."""
    from rich.console import Console

    from agent.commands import screen
    from agent.grids.run import MultiGridRun, RunError, check_run
    from drivers.formats.images import write_atomic

    if args.console or args.control:
        raise CommandError("--console and --control serve one session; a multi-grid run does not serve them yet "
                           "(its sessions' events go to --events; Ctrl-C or SIGTERM stops the run, --resume goes on)")
    resuming = args.resume is not None
    if resuming:
        run_dir = Path(args.resume)
        source, plan, run_plan = _resumed_inputs(run_dir)
    else:
        source, plan, run_plan = _new_inputs(args)
    _check_alert_secrets(plan)
    start = _simulator_start(run_dir, source) if resuming else {}
    microscope, _truth = screen.make_microscope(source, None, extra=start)
    try:
        try:
            check_run(microscope.info(), plan, run_plan)
        except RunError as exc:
            raise CommandError(str(exc)) from exc
        if not resuming:
            run_dir = _new_run_folder(args)
            plan.save(run_dir / "plan.json")
            write_atomic(run_dir / SOURCE_NAME, json.dumps(source, indent=2).encode())
            write_atomic(run_dir / GRID_PLAN_NAME, run_plan.model_dump_json(indent=2).encode())
        factory = _SessionFactory(args, source, microscope)
        try:
            run = MultiGridRun(microscope, plan, run_plan, run_dir, factory.new, factory.resume)
            screen._install_signal_handlers(run)
            Console(stderr=True).print(f"multi-grid run folder: {run_dir}")
            summary = run.run()
        finally:
            factory.close()
    finally:
        close = getattr(microscope, "close", None)
        if callable(close):
            close()
    _print_summary(args, summary, run_dir)
    return 0 if summary.state == "done" else 1


def _new_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(source, screening plan, grid plan) of a new run from the command line; `CommandError` for what does not
    go with `--grids`."""
    from agent.cli import check_out_folder
    from agent.commands import screen
    from agent.grids.plan import GridRunPlan, SlotSelectionError, parse_slots

    if args.tiles is not None:
        raise CommandError("--grids loads grids from a cassette: use --simulated or --bridge, not --tiles")
    if args.specimen and args.simulated:
        raise CommandError("--specimen names one grid's specimen; the cassette says what each slot holds")
    if any(getattr(args, name, None) is not None for name in ("atlas", "nav", "map_id")):
        raise CommandError("--atlas/--nav/--map-id start one session from one grid's map; a run maps every grid")
    if args.out is not None:
        check_out_folder(args.out, "run folder")
        if args.out.exists() and any(args.out.iterdir()):
            raise CommandError(f"{args.out} is not empty; use --resume {args.out} or another --out")
    try:
        slots = parse_slots(args.grids)
        run_plan = GridRunPlan(slots=slots, **_grid_plan_options(args))
    except (SlotSelectionError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    source = screen._source_from_args(args)
    if source["kind"] == "simulated":
        source = {**source, "cassette": cassette_arg(args.cassette)}
        source.pop("specimen", None)
    plan = screen._plan_from_args(args, {**source, "kind": "grids"})
    if args.time_budget_s is None and args.plan is None:  # one hour per slot, e.g. 12 h for a full cassette
        plan = plan.model_copy(update={"time_budget_s": 3600.0 * len(slots)})
    return source, plan, run_plan


def _resumed_inputs(run_dir: Path) -> tuple[dict[str, Any], Any, Any]:
    """(source, screening plan, grid plan) of the run in `run_dir`; `CommandError` naming a damaged file."""
    from pydantic import ValidationError

    from agent.config import PlanError, load_plan
    from agent.grids.plan import GridRunPlan
    from agent.grids.records import read_run_records
    from agent.session.journal import JournalError

    source = _read_json(run_dir / SOURCE_NAME)
    try:
        run_plan = GridRunPlan.model_validate(_read_json(run_dir / GRID_PLAN_NAME))
        plan = load_plan(run_dir / "plan.json")
        read_run_records(run_dir)  # a damaged run journal is refused here, before a grid is touched
    except ValidationError as exc:
        raise CommandError(
            f"cannot resume: {run_dir / GRID_PLAN_NAME} is not a grid plan ({exc.errors()[0]['msg']})"
        ) from None
    except (PlanError, JournalError) as exc:
        raise CommandError(f"cannot resume: {exc}") from None
    if not isinstance(source, dict) or "kind" not in source:
        raise CommandError(f"cannot resume: {run_dir / SOURCE_NAME} does not say how the microscope was made")
    return source, plan, run_plan


def _check_alert_secrets(plan: Any) -> None:
    """Read the alert channels' secrets now: a missing one is a one-line error before any grid is loaded."""
    if not plan.alerts.enabled:
        return
    from agent.alerts.channels import build_senders
    from agent.alerts.secrets import AlertConfigError

    try:
        build_senders(plan.alerts)
    except AlertConfigError as exc:
        raise CommandError(f"alerts: {exc}") from None


def _new_run_folder(args: argparse.Namespace) -> Path:
    """The folder of a new run (`--out`, checked by `_new_inputs`, else `sessions/run-<date-time>`), created."""
    from datetime import datetime

    run_dir = Path(args.out or Path("sessions") / datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _grid_plan_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "grid_budget_s": args.grid_budget_s,
        "atlas_squares": args.atlas_squares,
        "max_grids": args.max_grids,
        "probe_targets": args.probe_targets,
        "switch_after_visits": args.switch_after_visits,
    }
    return {key: value for key, value in options.items() if value is not None}


def cassette_arg(value: str | None) -> Any:
    """`--cassette`: `default` (or nothing) as it is; a JSON file read into its slots so the run keeps them."""
    if value is None or value == "default":
        return "default"
    from simulator.cassette import CassetteSpecError, load_cassette_spec

    try:
        return json.loads(load_cassette_spec(value).to_json())
    except CassetteSpecError as exc:
        raise CommandError(str(exc)) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot resume: {path} missing or unreadable ({exc})") from exc


def _simulator_start(run_dir: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Where a restarted simulated cassette starts: the grid the run loaded last on the stage, as often loaded as
    the journal says, at the run's microscope time and the cut session's stage position (none for a bridge)."""
    if source["kind"] != "simulated":
        return {}
    from agent.grids.records import GridLoaded, GridScreening, read_run_records, spent_s
    from agent.session.restore import resume_point

    records = read_run_records(run_dir)
    loads = [r for r in records if isinstance(r, GridLoaded) and r.load_s > 0]
    counts: dict[int, int] = {}
    for record in loads:
        counts[record.slot] = counts.get(record.slot, 0) + 1
    start: dict[str, Any] = {"load_counts": counts}
    if loads:
        start["loaded_slot"] = loads[-1].slot
    time_s = spent_s(records)
    last = loads[-1] if loads else None
    if last is not None:
        phase = "screen" if any(isinstance(r, GridScreening) and r.slot == last.slot for r in records) else "atlas"
        point = resume_point(run_dir / f"grid-{last.slot:02d}" / phase)
        if point is not None:
            time_s += point.microscope_time_s
            if point.stage is not None:
                start["start_stage"] = point.stage
            if point.optics_preset is not None:
                start["initial_preset"] = point.optics_preset
            if point.in_diffraction:
                start["initial_diffraction"] = True
    start["start_time_s"] = time_s
    return start


class _SessionFactory:
    """Makes and resumes the grid sessions of a run, with the command's label memory, calibration store,
    operator and (simulated) ground truth of whichever grid is on the stage."""

    def __init__(self, args: argparse.Namespace, source: dict[str, Any], microscope: Any) -> None:
        from agent.commands import screen
        from agent.session.events import EventBus

        self.args = args
        self.source = source
        self.microscope = microscope
        self.labels = None
        if not args.no_labels:
            self.labels = screen._label_memory(args.labels, simulated=microscope.info().simulated)
        self.events = EventBus(args.events)
        self.channel: Any = None
        self._operator: Any = None
        if args.operator not in ("none", "simulated"):
            self.channel, _ = screen._start_operator(args.operator, None)
        self.calibration = screen._calibration_kwargs(args, microscope, source.get("calibration"))

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"labels": self.labels, "events": self.events, **self.calibration}
        truth = getattr(self.microscope, "ground_truth", None)
        if truth is not None:
            from agent.commands.screen import truth_scorer

            kwargs["truth_scorer"] = truth_scorer(truth)
        if self.args.operator == "simulated":
            self._restart_simulated_operator(truth)
        kwargs["operator"] = self.channel
        return kwargs

    def _restart_simulated_operator(self, truth: Any) -> None:
        """A simulated operator answers from the ground truth of the grid on the stage: one per grid session."""
        from agent.commands import screen

        if truth is None:
            raise CommandError("--operator simulated needs a simulated cassette (--simulated)")
        if self._operator is not None:
            self._operator.stop()
        if self.channel is not None:
            self.channel.close()
        self.channel, self._operator = screen._start_operator("simulated", truth)

    def new(self, folder: Path, plan: Any) -> Any:
        from agent.session.screening import ScreeningSession, SessionError

        try:
            return ScreeningSession(self.microscope, plan, folder, **self._kwargs())
        except SessionError as exc:
            raise CommandError(str(exc)) from exc

    def resume(self, folder: Path) -> Any:
        from agent.session.screening import ScreeningSession, SessionError

        try:
            return ScreeningSession.resume(self.microscope, folder, **self._kwargs())
        except SessionError as exc:
            raise CommandError(str(exc)) from exc

    def close(self) -> None:
        if self._operator is not None:
            self._operator.stop()
        if self.channel is not None:
            self.channel.close()
        self.events.close()


def _print_summary(args: argparse.Namespace, summary: Any, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    if args.json:
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
        return
    table = Table(title=f"multi-grid run: {summary.state}")
    for column in ("rank", "slot", "grid", "status", "score", "diffracting", "per hour", "note"):
        table.add_column(column)
    for row in sorted(summary.grids, key=lambda r: (r.rank is None, r.rank or 0, r.slot)):
        table.add_row(
            str(row.rank or "-"), str(row.slot), row.label or "-", row.status,
            "-" if row.score is None else f"{row.score:.3g}", str(row.diffracting_crystals),
            "-" if row.diffracting_per_hour is None else f"{row.diffracting_per_hour:.1f}",
            row.reason.split(";")[0][:48],  # the whole reason is in run_summary.json and index.html
        )
    console = Console()
    console.print(table)
    rate = summary.diffracting_per_hour
    console.print(
        f"{summary.diffracting_crystals} diffracting crystals in {summary.run_time_s / 3600:.2f} h of microscope time "
        f"({'-' if rate is None else f'{rate:.1f}'}/h; grid exchange {summary.exchange_time_s / 60:.1f} min)"
    )
    console.print(f"overview: {run_dir / 'index.html'}")
