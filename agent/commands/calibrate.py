"""`crystal-locator calibrate`: measure the image -> stage matrix of every preset a plan uses and store them
for the instrument, so that screening sessions only check them (one test move per preset).

    crystal-locator calibrate --simulated [--specimen TYPE] [--seed N] [--instrument-seed N] [--camera-px N]
    crystal-locator calibrate --tiles DIR [--pixel-size-um X]
    crystal-locator calibrate --bridge tcp://127.0.0.1:5555
        [--plan plan.toml] [--calibrations DIR] [--json]

The presets are those the plan uses (default plan: overview, atlas, search), measured where a session
measures them (a grid-square corner near the stage centre). The store is one file per instrument, named
after the microscope's `info().name`, in `--calibrations DIR` (default `$CRYSTAL_LOCATOR_CALIBRATIONS`, else
`$XDG_DATA_HOME/crystal-locator/calibrations`, beside the label memory). A file there that cannot be used
(corrupt, unknown version, another instrument's) is kept as `<file>.<reason>-<date>`, never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from agent.cli import CommandError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `calibrate` command."""
    parser = subparsers.add_parser(
        "calibrate",
        help="measure every preset's image -> stage calibration and store it for the instrument",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--simulated", action="store_true", help="a simulated microscope")
    source.add_argument("--tiles", type=Path, metavar="DIR", help="a simulated microscope serving real image tiles")
    source.add_argument("--bridge", metavar="ENDPOINT", help="a microscope behind `crystal-locator bridge serve`")
    parser.add_argument("--specimen", default=None, help="specimen type to calibrate on (simulated)")
    parser.add_argument("--seed", type=int, default=None, help="specimen seed (simulated)")
    parser.add_argument(
        "--instrument-seed", type=int, default=None, metavar="N", help="simulated instrument (default 0)"
    )
    parser.add_argument("--pixel-size-um", type=float, default=None, help="pixel size of the tiles, um")
    parser.add_argument("--camera-px", type=int, default=None, help="simulated camera size, pixels (square)")
    parser.add_argument("--plan", type=Path, help="screening plan whose presets to measure (default plan otherwise)")
    parser.add_argument("--calibrations", type=Path, metavar="DIR", help="the calibration store folder")
    parser.add_argument("--json", action="store_true", help="print the stored calibration as JSON")
    parser.set_defaults(handler=run_calibrate)


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """How to make the microscope, in the form `agent.commands.screen.make_microscope` takes."""
    from agent.commands.screen import DEFAULT_SPECIMEN

    if args.bridge is not None:
        return {"kind": "bridge", "endpoint": args.bridge}
    common = {"seed": args.seed or 0, "camera_px": args.camera_px, "instrument_seed": args.instrument_seed or 0}
    if args.tiles is not None:
        return {"kind": "tiles", "tiles": str(args.tiles.resolve()), "pixel_size_um": args.pixel_size_um, **common}
    return {"kind": "simulated", "specimen": args.specimen or DEFAULT_SPECIMEN, **common}


def run_calibrate(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator calibrate`."""
    from agent.commands.screen import make_microscope
    from agent.config import PlanError, ScreeningPlan, load_plan
    from agent.steps.calibration_store import CalibrationStore, default_calibrations_dir
    from agent.steps.instrument_calibration import calibrate_instrument
    from drivers.base import MicroscopeError

    try:
        plan = load_plan(args.plan) if args.plan else ScreeningPlan()
    except PlanError as exc:
        raise CommandError(str(exc)) from exc
    store = CalibrationStore(args.calibrations or default_calibrations_dir())
    _check_writable(store.folder)  # before minutes of microscope time, not after
    microscope, _truth = make_microscope(_source(args))
    try:
        result = calibrate_instrument(microscope, plan)
    except MicroscopeError as exc:
        raise CommandError(f"calibration failed: {exc}") from exc
    finally:
        close = getattr(microscope, "close", None)
        if callable(close):
            close()
    try:
        path = store.save(result.calibration)
    except OSError as exc:
        raise CommandError(f"cannot write the calibration store {store.folder}: {exc}") from exc
    if args.json:
        data = {"path": str(path), "time_s": result.time_s, **json.loads(path.read_text())}
        print(json.dumps(data, indent=2))
    else:
        _print_table(result, path)
    return 0


def _check_writable(folder: Path) -> None:
    """`CommandError` unless `folder` is (or can be made) a folder this process can write into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CommandError(f"cannot write the calibration store {folder}: {exc}") from exc


def _print_table(result: Any, path: Path) -> None:
    """The measured presets as a table, and where they were stored."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"calibration of {result.calibration.instrument}")
    for column in ("preset", "rotation deg", "um/px (col, row)", "nominal um/px", "flipped", "misfit px", "time s"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for name, preset in result.calibration.presets.items():
        table.add_row(
            name,
            f"{preset.rotation_deg:.2f}",
            f"{preset.scale_um_per_px[0]:.4g}, {preset.scale_um_per_px[1]:.4g}",
            f"{preset.nominal_pixel_size_um:.4g}",
            "yes" if preset.flipped else "no",
            f"{preset.residual_px:.2f}",
            f"{result.time_s.get(name, 0.0):.1f}",
        )
    console = Console()
    console.print(table)
    console.print(f"stored: {path}")
