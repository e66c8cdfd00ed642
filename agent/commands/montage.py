"""`crystal-locator montage show|preview`: inspect a montage (SerialEM .mdoc/.mrc, or a tile folder).

- `montage show PATH [--pixel-size-um X] [--overlap F] [--json]` prints the piece layout: piece
  count, piece size, mosaic size, pixel spacing, the pieces' stage extent, the overlap between
  neighbouring pieces, and the mosaic pixel -> stage transform fitted to the pieces' stage positions
  (scale, rotation, residual; `fit_stage_transform`).
- `montage preview PATH --out preview.png [--max-px 2048]` writes a downsampled 8-bit picture of
  the whole mosaic (read band by band, so it works for atlases larger than memory).
Malformed files fail with one clear line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from agent.cli import CommandError
from drivers.formats.montage import MontageFormatError, TileMontage, fit_stage_transform, open_montage


def register(subparsers: Any) -> None:
    """Add the `montage` command group."""
    montage = subparsers.add_parser("montage", help="inspect a montage (SerialEM .mdoc/.mrc or a tile folder)")
    sub = montage.add_subparsers(dest="montage_command", metavar="SUBCOMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", type=Path, help="FILE.mrc.mdoc, its FILE.mrc, or a folder of tiles")
    common.add_argument("--pixel-size-um", type=float, default=None, help="override the pixel size (um/px)")
    common.add_argument("--overlap", type=float, default=None, help="tile overlap fraction for named tiles")

    show = sub.add_parser("show", parents=[common], help="print the piece layout")
    show.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    show.set_defaults(handler=_show)

    preview = sub.add_parser("preview", parents=[common], help="write a downsampled 8-bit PNG of the mosaic")
    preview.add_argument("--out", type=Path, required=True, help="the PNG to write")
    preview.add_argument("--max-px", type=int, default=2048, help="longest side of the preview, pixels")
    preview.set_defaults(handler=_preview)


def _open(args: argparse.Namespace) -> TileMontage:
    try:
        return open_montage(args.path, pixel_size_um=args.pixel_size_um, overlap_fraction=args.overlap)
    except (MontageFormatError, ImportError) as exc:
        raise CommandError(str(exc)) from exc


def montage_summary(montage: TileMontage) -> dict[str, Any]:
    """The layout facts `montage show` prints, as a JSON-serialisable dict (lengths in px and um)."""
    pieces = montage.pieces
    shapes = sorted({p.shape_px for p in pieces})
    stage = [p.stage_xy_um for p in pieces if p.stage_xy_um is not None]
    summary: dict[str, Any] = {
        "source": montage.description,
        "pieces": len(pieces),
        "piece_shape_px": list(montage.piece_shape_px),
        "piece_shapes_px": [list(s) for s in shapes],
        "mosaic_shape_px": list(montage.shape_px),
        "dtype": str(montage.dtype),
        "pixel_size_um": montage.pixel_size_um,
        "mosaic_size_um": None,
        "stage_extent_um": None,
        "overlap_px": _overlaps(montage),
    }
    if montage.pixel_size_um is not None:
        summary["mosaic_size_um"] = [v * montage.pixel_size_um for v in montage.shape_px]
    summary["stage_extent_um"] = stage_extent_um(stage)
    fit = fit_stage_transform(montage)
    summary["stage_fit"] = None
    if fit is not None:
        matrix = np.array(fit.matrix_um_per_px)
        summary["stage_fit"] = {
            "stage_xy_um_at_centre": list(fit.stage_xy_um),
            "matrix_um_per_px": [list(row) for row in fit.matrix_um_per_px],
            "um_per_px": float(np.sqrt(abs(np.linalg.det(matrix)))),
            "rotation_deg": float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))),
            "flipped": bool(np.linalg.det(matrix) < 0),
            "rms_residual_um": fit.rms_residual_um,
        }
    return summary


def stage_extent_um(stage_xy_um: list[tuple[float, float]]) -> dict[str, float] | None:
    """The box (x_min, x_max, y_min, y_max um) of the pieces' stage positions; None without any."""
    if not stage_xy_um:
        return None
    xs, ys = [s[0] for s in stage_xy_um], [s[1] for s in stage_xy_um]
    return {"x_min": min(xs), "x_max": max(xs), "y_min": min(ys), "y_max": max(ys)}


def _stage_line(extent: dict[str, float] | None) -> str:
    """The `stage` line of `montage show`."""
    if extent is None:
        return "stage        no stage positions in the files"
    return (f"stage        x {extent['x_min']:.2f} .. {extent['x_max']:.2f} um, "
            f"y {extent['y_min']:.2f} .. {extent['y_max']:.2f} um (piece centres)")


def _overlaps(montage: TileMontage) -> dict[str, int | None]:
    """Typical overlap (px) between horizontally and vertically neighbouring pieces (None if none)."""
    corners = np.array([(p.row_px, p.col_px) for p in montage.pieces])
    sizes = np.array([p.shape_px for p in montage.pieces])
    result: dict[str, int | None] = {"rows": None, "cols": None}
    for axis, name in ((0, "rows"), (1, "cols")):
        starts = np.unique(corners[:, axis])
        if len(starts) < 2:
            continue
        step = int(np.median(np.diff(starts)))
        result[name] = int(np.median(sizes[:, axis])) - step
    return result


def _stack_missing(path: Path) -> bool:
    """True for a SerialEM `.mdoc` whose image stack is not there."""
    from drivers.formats.montage import serialem_stack_path

    if not path.name.lower().endswith(".mdoc") or not path.is_file():
        return False
    try:
        from drivers.formats.mdoc import read_mdoc

        serialem_stack_path(path, read_mdoc(path).image_file)
    except MontageFormatError:
        return True
    except Exception:  # an unreadable .mdoc: opening the montage says what is wrong
        return False
    return False


def metadata_summary(path: Path, pixel_size_um: float | None) -> dict[str, Any]:
    """What a SerialEM `.mdoc` says without its image stack: pieces, piece size, pixel size, stage extent."""
    from drivers.formats.mdoc import MdocFormatError, read_mdoc

    try:
        meta = read_mdoc(path)
    except MdocFormatError as exc:
        raise CommandError(str(exc)) from exc
    pieces = [p for p in meta.pieces if p.piece_xyz_px is not None]
    stage = [p.stage_xy_um for p in pieces if p.stage_xy_um is not None]
    summary: dict[str, Any] = {
        "source": str(path),
        "stack_missing": True,
        "image_file": meta.image_file,
        "pieces": len(pieces),
        "piece_shape_px": list(meta.piece_shape_px) if meta.piece_shape_px else None,
        "pixel_size_um": pixel_size_um or meta.pixel_size_um,
        "stage_extent_um": None,
    }
    summary["stage_extent_um"] = stage_extent_um(stage)
    return summary


def _show_metadata_only(args: argparse.Namespace) -> int:
    summary = metadata_summary(args.path, args.pixel_size_um)
    if args.json:
        print(json.dumps(summary))
        return 0
    stack = args.path.with_suffix("").name
    print(f"montage      {summary['source']} (metadata only: its image stack {stack} is missing)")
    shape = summary["piece_shape_px"]
    size = f" of {shape[1]} x {shape[0]} px (W x H)" if shape else ""
    print(f"pieces       {summary['pieces']}{size}")
    pixel = summary["pixel_size_um"]
    print("pixel size   unknown" if pixel is None else f"pixel size   {pixel * 1000:.3f} nm/px")
    print(_stage_line(summary["stage_extent_um"]))
    return 0


def _show(args: argparse.Namespace) -> int:
    if _stack_missing(args.path):
        return _show_metadata_only(args)
    with _open(args) as montage:
        summary = montage_summary(montage)
    if args.json:
        print(json.dumps(summary))
        return 0
    rows, cols = summary["mosaic_shape_px"]
    piece_r, piece_c = summary["piece_shape_px"]
    print(f"montage      {summary['source']}")
    print(f"pieces       {summary['pieces']} of {piece_c} x {piece_r} px (W x H), {summary['dtype']}")
    if len(summary["piece_shapes_px"]) > 1:
        print(f"piece sizes  {', '.join(f'{c}x{r}' for r, c in summary['piece_shapes_px'])} (W x H)")
    print(f"mosaic       {cols} x {rows} px (W x H)")
    overlap = summary["overlap_px"]
    if overlap["rows"] is not None or overlap["cols"] is not None:
        print(f"overlap      {overlap['cols']} px between columns, {overlap['rows']} px between rows")
    if summary["pixel_size_um"] is None:
        print("pixel size   unknown (pass --pixel-size-um)")
    else:
        width_um, height_um = summary["mosaic_size_um"][1], summary["mosaic_size_um"][0]
        print(f"pixel size   {summary['pixel_size_um'] * 1000:.3f} nm/px; mosaic {width_um:.1f} x {height_um:.1f} um")
    print(_stage_line(summary["stage_extent_um"]))
    fit = summary["stage_fit"]
    if fit is not None:
        x_um, y_um = (round(v, 2) + 0.0 for v in fit["stage_xy_um_at_centre"])  # no "-0.00"
        print(
            f"stage fit    {fit['um_per_px'] * 1000:.3f} nm/px, rotation {fit['rotation_deg']:.2f} deg"
            f"{', flipped' if fit['flipped'] else ''}, rms {fit['rms_residual_um']:.3f} um; mosaic centre at "
            f"({x_um:.2f}, {y_um:.2f}) um"
        )
    return 0


def _preview(args: argparse.Namespace) -> int:
    if args.max_px < 16:
        raise CommandError(f"--max-px must be at least 16, got {args.max_px}")
    from drivers.formats.images import write_png

    with _open(args) as montage:
        rows, cols = montage.shape_px
        factor = max(1, -(-max(rows, cols) // args.max_px))
        band_rows = factor * max(1, 2048 // factor)
        parts = []
        try:
            for row0 in range(0, rows, band_rows):
                band = montage.read_region(row0, 0, min(band_rows, rows - row0), cols)
                parts.append(band[::factor, ::factor].astype(np.float32))
        except MontageFormatError as exc:
            raise CommandError(str(exc)) from exc
    small = np.concatenate(parts, axis=0)
    low, high = np.percentile(small, [0.5, 99.5])
    scaled = np.clip((small - low) / max(float(high - low), 1e-12) * 255.0, 0, 255).astype(np.uint8)
    path = write_png(args.out, scaled)
    print(f"wrote {path} ({scaled.shape[1]} x {scaled.shape[0]} px, 1/{factor} scale)")
    return 0
