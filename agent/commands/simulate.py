"""`crystal-locator simulate ...`: look at what the simulated microscope makes.

- `simulate snapshot --specimen protein-plates --preset atlas --x-um X --y-um Y --out f.tif [--png]`
  writes one frame as a TIFF with its metadata (and an 8-bit PNG preview with `--png`);
  `--diffraction` takes a diffraction pattern instead;
- `simulate specimen --specimen T --seed N --out truth.json` writes the ground truth as JSON;
- `--tiles DIR [--pixel-size-um X]` serves dataset tiles instead of a procedural specimen;
- `--conditions realistic` adds real-grid conditions (`simulator.conditions`: folds, tears, carbon edges,
  contamination, thick-ice gradients, stacked plates, beam drift; default none);
- `--clock PROFILE` picks the timing profile (`simulator.timing`: thermo-serialem, krios, jeol-fast, or a
  `.json` file of figures); the snapshot reports the microscope time it took.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from agent.cli import CommandError
from agent.commands.screen import clock_profile_arg


def register(subparsers: Any) -> None:
    """Add the `simulate` command group."""
    parser = subparsers.add_parser("simulate", help="snapshots and ground truth from the simulated microscope")
    sub = parser.add_subparsers(dest="simulate_command", metavar="SUBCOMMAND")

    snap = sub.add_parser("snapshot", help="write one simulated frame (TIFF with metadata, optional PNG)")
    _source_options(snap)
    snap.add_argument("--preset", default="atlas", help="optics preset (overview, atlas, search, exposure)")
    snap.add_argument("--x-um", type=float, default=0.0, help="stage x in micrometres (default 0)")
    snap.add_argument("--y-um", type=float, default=0.0, help="stage y in micrometres (default 0)")
    snap.add_argument("--exposure-s", type=float, default=0.5, help="exposure time in seconds (default 0.5)")
    snap.add_argument("--camera-px", type=int, default=2048, help="camera sensor size in pixels (square)")
    snap.add_argument("--diffraction", action="store_true", help="take a diffraction pattern instead of an image")
    snap.add_argument("--png", action="store_true", help="also write an 8-bit PNG preview next to the TIFF")
    snap.add_argument("--out", required=True, type=Path, help="output TIFF path")
    snap.set_defaults(handler=_snapshot)

    spec = sub.add_parser("specimen", help="write a specimen's ground truth (grid, crystals) as JSON")
    spec.add_argument("--specimen", default="protein-plates", help="specimen type")
    spec.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    conditions_option(spec)
    spec.add_argument("--out", required=True, type=Path, help="output JSON path")
    spec.set_defaults(handler=_specimen)
    parser.set_defaults(handler=lambda args: _help(parser))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--specimen", default="protein-plates", help="specimen type (default protein-plates)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--tiles", type=Path, default=None, help="serve a folder of dataset tiles (a montage)")
    parser.add_argument("--pixel-size-um", type=float, default=None, help="um per pixel of the tiles")
    parser.add_argument("--overlap", type=float, default=None,
                        help="overlap fraction of neighbouring Tile_RRR-CCC tiles (default: the layout's, else 0)")
    parser.add_argument("--clock", metavar="PROFILE", default=None,
                        help="timing profile: thermo-serialem (default), krios, jeol-fast, or a .json of figures")
    conditions_option(parser)


def conditions_option(parser: argparse.ArgumentParser) -> None:
    """Add `--conditions NAME`: a set of real-grid conditions for the simulator (`simulator.conditions`)."""
    from simulator.conditions import CONDITION_SETS

    parser.add_argument("--conditions", choices=tuple(CONDITION_SETS), default=None,
                        help="simulated grid conditions: none (default) or realistic (folds, tears, carbon edges, "
                             "contamination, thick-ice gradients, stacked plates, beam drift)")


def _check_specimen(name: str) -> None:
    from simulator import SPECIMEN_TYPES

    if name not in SPECIMEN_TYPES:
        raise CommandError(f"unknown specimen type {name!r}; choose one of: {', '.join(SPECIMEN_TYPES)}")


def _snapshot(args: argparse.Namespace) -> int:
    from drivers.base import MicroscopeError
    from drivers.formats.images import write_frame_tiff, write_png
    from simulator import create_simulated_microscope

    if args.tiles is None:
        _check_specimen(args.specimen)
    if args.camera_px < 16 or args.camera_px > 8192:
        raise CommandError(f"--camera-px must be in [16, 8192], got {args.camera_px}")
    if not math.isfinite(args.exposure_s) or not 0 < args.exposure_s <= 600:
        raise CommandError(f"--exposure-s must be in (0, 600] s, got {args.exposure_s}")
    if args.pixel_size_um is not None and not (math.isfinite(args.pixel_size_um) and args.pixel_size_um > 0):
        raise CommandError(f"--pixel-size-um must be a positive number, got {args.pixel_size_um}")
    try:
        microscope = create_simulated_microscope(
            specimen_type=args.specimen,
            seed=args.seed,
            tiles=args.tiles,
            pixel_size_um=args.pixel_size_um,
            overlap_fraction=args.overlap,
            camera_shape_px=(args.camera_px, args.camera_px),
            clock_profile=clock_profile_arg(args.clock),
            conditions=args.conditions,
        )
        info = microscope.info()
        if args.preset not in [p.name for p in info.presets]:
            raise CommandError(
                f"unknown preset {args.preset!r}; choose one of: {', '.join(p.name for p in info.presets)}"
            )
        limits = info.stage_limits
        if not (limits.x_min_um <= args.x_um <= limits.x_max_um and limits.y_min_um <= args.y_um <= limits.y_max_um):
            raise CommandError(
                f"position ({args.x_um}, {args.y_um}) um is outside the stage limits "
                f"x [{limits.x_min_um}, {limits.x_max_um}], y [{limits.y_min_um}, {limits.y_max_um}] um"
            )
        microscope.set_preset(args.preset)
        microscope.move_stage(x_um=args.x_um, y_um=args.y_um)
        if args.diffraction:
            frame = microscope.acquire_diffraction(args.exposure_s)
        else:
            frame = microscope.acquire(args.exposure_s)
    except CommandError:
        raise
    except (MicroscopeError, OSError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    try:
        path = write_frame_tiff(args.out, frame)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from exc
    print(f"wrote {path} ({frame.shape_px[1]}x{frame.shape_px[0]} px, {frame.metadata.pixel_size_um} um/px, "
          f"preset {frame.metadata.preset}, stage ({args.x_um}, {args.y_um}) um; "
          f"{microscope.microscope_time_s():.2f} s of microscope time on clock {microscope.timing.name})")
    if args.png:
        png_path = args.out.with_suffix(".png")
        try:
            write_png(png_path, preview_8bit(frame.image, gamma=0.5 if args.diffraction else 1.0))
        except OSError as exc:
            raise CommandError(f"cannot write {png_path}: {exc}") from exc
        print(f"wrote {png_path}")
    return 0


def preview_8bit(image: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """An 8-bit preview of a 16-bit image: 0.5-99.8 percentile stretch, optional gamma."""
    data = image.astype(np.float32)
    low, high = np.percentile(data, [0.5, 99.8])
    scaled = np.clip((data - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    if gamma != 1.0:
        scaled = scaled**gamma
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def _specimen(args: argparse.Namespace) -> int:
    from drivers.formats.images import write_atomic
    from simulator.conditions import condition_kwargs
    from simulator.specimen import SpecimenError, generate_specimen

    _check_specimen(args.specimen)
    try:
        specimen = generate_specimen(args.specimen, args.seed,
                                     **condition_kwargs(args.conditions).get("specimen_options", {}))
    except SpecimenError as exc:
        raise CommandError(str(exc)) from exc
    payload = json.dumps(specimen.truth_dict(), indent=1).encode()
    try:
        path = write_atomic(args.out, payload)
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc}") from exc
    print(f"wrote {path}: {specimen.crystal_count} crystals, {len(specimen.square_centres_um())} intact squares")
    return 0
