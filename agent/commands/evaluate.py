"""`crystal-locator evaluate` (accuracy against ground truth) and `crystal-locator report SESSION_DIR`.

    crystal-locator evaluate [--quick] [--json FILE] [--html FILE] [--seeds N] [--specimens TYPE ...]
    crystal-locator evaluate --images DIR_OR_FILES ... --truth crystals.csv [--pixel-size-um X]
    crystal-locator report SESSION_DIR [--out FILE]

`evaluate` runs the clustering locator (by default with the settings `screen` uses; --modes and --k compare
others; the default crystal-cluster rule, no operator) and two baselines (threshold + connected components,
LoG blobs) on the same images, scores every detection against ground truth and prints one row per
specimen x preset x method x mode.
"""
# Simulated images come from `simulator`: this module wires it in; nothing else in `agent` imports it.

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli import CommandError
from agent.commands.learning_curve import DEFAULT_LEARNING_SEED
from agent.locate import defaults as locate_defaults

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `evaluate` and `report` commands."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score the locator and two baselines against ground truth (simulated or your labelled images)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="about a minute: 2 seeds, atlas only, k=3, 1024 px")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write rows, target checks and config as JSON")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML report")
    parser.add_argument("--seeds", type=int, help="seeds per specimen type (default 3; quick 2)")
    parser.add_argument("--specimens", nargs="+", metavar="TYPE", help="specimen types (default: all)")
    parser.add_argument("--presets", nargs="+", metavar="PRESET", help="presets to image (default atlas search)")
    parser.add_argument("--frames", type=int, help="frames per seed and preset (default 2; quick 1)")
    parser.add_argument("--camera-px", type=int, help="simulated camera size, pixels (default 1024)")
    parser.add_argument("--modes", nargs="+", choices=("grid", "window"),
                        help="locator modes (default: window, as screen uses)")
    parser.add_argument("--k", nargs="+", type=int, dest="ks", metavar="K",
                        help=f"cluster counts (default: {locate_defaults.K}, as screen uses)")
    parser.add_argument("--grid", metavar="RxC", help="locator grid mode: patch grid (default: the locator's)")
    parser.add_argument("--window-px", type=int, help="locator window mode: window size, pixels")
    parser.add_argument("--stride-px", type=int, help="locator window mode: stride, pixels")
    parser.add_argument(
        "--search-outlines",
        type=int,
        metavar="PX",
        help="search images: find faint crystals by straight edges with lines of PX pixels (default 41; 0: off)",
    )
    parser.add_argument("--conditions", choices=("none", "realistic"), default=None,
                        help="simulated grid conditions (simulator.conditions): none (default) or realistic")
    parser.add_argument("--no-baselines", action="store_true", help="do not run the two baseline detectors")
    parser.add_argument("--no-locator", action="store_true", help="run only the baselines")
    parser.add_argument("--tolerance-um", type=float, help="matching tolerance, um (default 2)")
    parser.add_argument("--images", nargs="+", type=Path, metavar="PATH", help="your own images (files or folders)")
    parser.add_argument("--truth", type=Path, metavar="CSV", help="labels: image,row_px,col_px[,radius_px]")
    parser.add_argument("--pixel-size-um", type=float, help="pixel size of --images when the files do not say")
    learning = parser.add_argument_group("learning curve of the crystal classifier (agent.commands.learning_curve)")
    learning.add_argument("--learning", type=int, metavar="N", default=None,
                          help="run N simulated sessions per specimen type on one label memory (and each cold) "
                               "instead of the image evaluation")
    learning.add_argument("--learning-out", type=Path, metavar="DIR", default=Path("learning-curve"),
                          help="folder for the learning curve's sessions (must be new or empty)")
    learning.add_argument("--learning-seed", type=int, default=DEFAULT_LEARNING_SEED,
                          help="first seed of the learning curve (far from the seeds used for tuning)")
    learning.add_argument("--learning-squares", type=int, default=2, help="squares each session maps")
    learning.add_argument("--learning-max-targets", type=int, default=20, help="targets each session visits")
    learning.add_argument("--learning-camera-px", type=int, default=1024, metavar="PX",
                          help="simulated camera of the learning curve's sessions (pixels)")
    learning.add_argument("--learning-budget-s", type=float, default=None, metavar="S",
                          help="size each session by this microscope-time budget instead of squares and targets")
    parser.set_defaults(handler=run_evaluate)

    report = subparsers.add_parser(
        "report", help="(re)write the HTML report of a screening session folder",
        description="Write SESSION_DIR/report.html: atlas with heat map and targets, per-target images, tables, "
        "timings. Self-contained: open it in any browser, offline.",
    )
    report.add_argument("session_dir", type=Path, metavar="SESSION_DIR", help="a screening session's folder")
    report.add_argument("--out", type=Path, metavar="FILE", help="write here instead of SESSION_DIR/report.html")
    report.set_defaults(handler=run_report)


def _config_from_args(args: argparse.Namespace) -> Any:
    from agent.evaluation.runner import EvaluationConfig

    overrides: dict[str, Any] = {}
    for name, key in (("seeds", "seeds"), ("frames", "frames_per_seed"), ("camera_px", "camera_px"),
                      ("tolerance_um", "tolerance_um")):
        value = getattr(args, name)
        if value is not None:
            overrides[key] = value
    for name in ("specimens", "presets", "modes", "ks"):
        value = getattr(args, name)
        if value:
            overrides[name] = tuple(value)
    settings: dict[str, Any] = {}
    if args.grid:
        try:
            rows_text, cols_text = args.grid.lower().split("x")
            settings.update(grid_rows=int(rows_text), grid_cols=int(cols_text))
        except ValueError as exc:
            raise CommandError(f"--grid must look like 20x20 (rows x columns), got {args.grid!r}") from exc
    if args.window_px is not None:
        settings["window_px"] = args.window_px
    if args.stride_px is not None:
        settings["stride_px"] = args.stride_px
    if settings:
        overrides["locator_settings"] = settings
    if args.search_outlines is not None:
        outlines = {"outline_length_px": args.search_outlines} if args.search_outlines > 0 else {}
        overrides["preset_locator_settings"] = {"search": outlines}
    if args.no_baselines:
        overrides["baselines"] = False
    if args.no_locator:
        overrides["modes"] = ()
    if overrides.get("ks") and "default_k" not in overrides and locate_defaults.K not in overrides["ks"]:
        overrides["default_k"] = overrides["ks"][0]
    try:
        return EvaluationConfig.quick(**overrides) if args.quick else EvaluationConfig(**overrides)
    except ValueError as exc:
        raise CommandError(f"invalid evaluation options: {exc}") from exc


def _simulated_images(config: Any, conditions: str | None = None) -> Any:
    """Yield labelled frames from a simulated microscope per specimen type and seed (with the named set of
    `simulator.conditions`, default none)."""
    from agent.evaluation.runner import simulated_images
    from simulator import SPECIMEN_TYPES, create_simulated_microscope

    unknown = [s for s in config.specimens if s not in SPECIMEN_TYPES]
    if unknown:
        raise CommandError(f"unknown specimen type(s) {unknown}; choose from {', '.join(SPECIMEN_TYPES)}")
    for specimen in config.specimens:
        for seed in range(config.seeds):
            microscope = create_simulated_microscope(
                specimen_type=specimen, seed=seed, camera_shape_px=(config.camera_px, config.camera_px),
                conditions=conditions,
            )
            truth = microscope.ground_truth
            yield from simulated_images(
                microscope, truth, specimen=specimen, seed=seed, config=config,
                square_centres_um=truth.square_centres_um(),
                true_matrix=microscope.true_image_to_stage_matrix,
                true_stage_xy_um=microscope.true_stage_xy_um,
            )


def print_rows(rows: list[dict[str, Any]], targets: list[dict[str, Any]], title: str) -> None:
    """Print the result rows and the target checks as rich tables."""
    from rich.console import Console
    from rich.table import Table

    def f(value: Any, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 170))
    table = Table(title=title)
    for column in ("specimen", "preset", "method", "mode", "precision", "recall", "recall_diffr", "loc_err_um",
                   "P_area", "R_area", "bar_iou", "crystals", "detections", "s/image"):
        table.add_column(column, justify="left" if column in ("specimen", "preset", "method", "mode") else "right")
    for r in rows:
        table.add_row(r["specimen"], r["preset"], r["method"], r["mode"], f(r["precision"]), f(r["recall"]),
                      f(r["recall_diffracting"]), f(r["loc_error_um"], 2), f(r.get("precision_area")),
                      f(r.get("recall_area")), f(r["bar_iou"]), str(r["n_crystals"]),
                      str(r["n_detections"]), f(r["seconds_per_image"], 2))
    console.print(table)
    if targets:
        checks = Table(title="targets at atlas (recall >= goal at precision >= goal)")
        for column in ("specimen", "role", "method", "mode", "precision", "recall", "goal P/R", "met"):
            checks.add_column(column)
        for t in targets:
            checks.add_row(t["specimen"], t["role"], t["method"], t["mode"], f(t["precision"]), f(t["recall"]),
                           f"{t['precision_goal']}/{t['recall_goal']}",
                           "[green]yes[/green]" if t["met"] else "[red]no[/red]")
        console.print(checks)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator evaluate`."""
    from agent.evaluation.labelled import LabelsError, labelled_images
    from agent.evaluation.runner import EvaluationError, baseline_methods, evaluate_images, methods_for
    from agent.report import ReportError, write_evaluation_report
    from drivers.formats.images import ImageFormatError, write_atomic

    if args.conditions is not None and args.images is not None:
        raise CommandError("--conditions sets the simulated grid's conditions; your --images have their own")
    if (args.images is None) != (args.truth is None):
        raise CommandError("--images and --truth go together: your images and a CSV of crystal positions")
    if args.pixel_size_um is not None and args.pixel_size_um <= 0:
        raise CommandError(f"--pixel-size-um must be positive, got {args.pixel_size_um}")
    for path in (args.json, args.html):  # checked before the work: finished work is never lost to a bad path
        if path is not None and path.is_dir():
            raise CommandError(f"{path} is a folder; give a file name for the output")
        if path is not None and path.parent and not path.parent.exists():
            raise CommandError(f"{path}: the folder {path.parent} does not exist")
    if args.learning is not None:
        return _run_learning(args)
    config = _config_from_args(args)
    start = time.perf_counter()
    try:
        methods = methods_for(config) if config.modes else (baseline_methods() if config.baselines else [])
    except EvaluationError as exc:
        raise CommandError(str(exc)) from exc
    if not methods:
        raise CommandError("nothing to run: --no-locator and --no-baselines together leave no method")
    skipped: list[str] = []
    if args.images is not None:
        images = labelled_images(args.images, args.truth, pixel_size_um=args.pixel_size_um, skipped=skipped)
        config_dict = {"images": [str(p) for p in args.images], "truth": str(args.truth),
                       "tolerance_um": config.tolerance_um, "modes": list(config.modes), "ks": list(config.ks),
                       "baselines": config.baselines}
        title = f"evaluation on {args.truth.name}"
    else:
        images = _simulated_images(config, args.conditions)
        config_dict = {**config.model_dump(mode="json"), "quick": bool(args.quick),
                       "conditions": args.conditions or "none"}
        title = "evaluation on simulated images" + (" (quick)" if args.quick else "")
        title += f", conditions {args.conditions}" if args.conditions else ""

    counter = {"images": 0}

    def progress(name: str) -> None:
        counter["images"] += 1
        print(f"[{counter['images']:>3}] {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    try:
        result = evaluate_images(images, methods, tolerance_um=config.tolerance_um, default_k=config.default_k,
                                 config=config_dict, progress=progress)
    except (LabelsError, ImageFormatError, EvaluationError) as exc:
        raise CommandError(str(exc)) from exc
    result.elapsed_s = time.perf_counter() - start
    result.config["skipped_images"] = list(skipped)
    heading = f"{title}: {result.n_images} images, {result.elapsed_s:.1f} s"
    if skipped:
        heading += f"; {len(skipped)} image(s) could not be read and are left out"
    print_rows(result.rows, result.targets, heading)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if result.failures:
        print(f"{len(result.failures)} method run(s) failed; first: {result.failures[0]}")
    if args.json is not None:
        write_atomic(args.json, json.dumps(result.as_dict(), indent=2, default=str).encode())
        print(f"wrote {args.json}")
    if args.html is not None:
        try:
            write_evaluation_report(result.rows, args.html, targets=result.targets, examples=result.examples,
                                    config=config_dict, title=title, elapsed_s=result.elapsed_s,
                                    failures=result.failures)
        except ReportError as exc:
            raise CommandError(str(exc)) from exc
        print(f"wrote {args.html}")
    return 1 if skipped else 0


def _run_learning(args: argparse.Namespace) -> int:
    """`evaluate --learning N`: the classifier's learning curve (`agent.commands.learning_curve`)."""
    from agent.commands.learning_curve import print_learning, run_learning_curve, write_learning_outputs
    from simulator import SPECIMEN_TYPES

    if args.learning < 1 or args.learning_squares < 1 or args.learning_max_targets < 1:
        raise CommandError("--learning, --learning-squares and --learning-max-targets must be at least 1")
    if args.images is not None:
        raise CommandError("--learning runs simulated sessions; it does not take --images")
    specimens = tuple(args.specimens or SPECIMEN_TYPES)
    unknown = [s for s in specimens if s not in SPECIMEN_TYPES]
    if unknown:
        raise CommandError(f"unknown specimen type(s) {unknown}; choose from {', '.join(SPECIMEN_TYPES)}")
    result = run_learning_curve(args, specimens)
    print_learning(result)
    write_learning_outputs(result, args.json, args.html)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator report SESSION_DIR`."""
    from agent.report import ReportError, session_report_html, write_session_report
    from drivers.formats.images import write_atomic

    try:
        if args.out is None:
            path = write_session_report(args.session_dir)
        else:
            path = write_atomic(args.out, session_report_html(args.session_dir).encode("utf-8"))
    except ReportError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot write the report: {exc}") from exc
    print(f"wrote {path}")
    return 0
