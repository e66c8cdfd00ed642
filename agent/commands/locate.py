"""`crystal-locator locate IMAGE`: cluster patches of one image (or montage) and write targets.

Writes into `--out DIR`: `heatmap.png` (cluster map over the image, candidates numbered),
`clusters.json` (per cluster: size, mean and normalised features; the rule or option that chose the
crystal clusters; settings), `gallery.png` (typical patches per cluster), `candidates.json` and
`candidates.csv` (row_px, col_px, area_px, score, cluster_id and, with stage metadata, x_um, y_um),
`bar_mask.png` (white on grid bars / black areas / holes in the film) and, with `--reference`,
`similarity.png`. Prints a short table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.cli import CommandError, check_out_folder
from agent.locate import defaults as locate_defaults
from drivers.geometry import pixel_to_stage_um

if TYPE_CHECKING:
    from agent.locate.analysis import ClusterAnalysis, LocateSettings
    from agent.locate.render import HeatmapDraft
    from agent.locate.targets import Candidate

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `locate` command."""
    parser = subparsers.add_parser(
        "locate",
        help="find crystal-bearing areas in an image or montage by clustering patches",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", help="image file (TIFF, MRC, PNG, NPY), a tile folder or a SerialEM .mdoc montage")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--grid", metavar="RxC", help="grid of R x C patches instead of sliding windows (e.g. 20x20)")
    layout.add_argument("--window", metavar="PX", type=int,
                        help=f"sliding window of PX pixels (odd; default {locate_defaults.WINDOW_PX}, as screen uses)")
    parser.add_argument("--stride", metavar="S", type=int, default=None,
                        help=f"window stride in pixels (default {locate_defaults.STRIDE_PX})")
    parser.add_argument("--k", type=int, default=None, help=f"number of clusters (default {locate_defaults.K})")
    parser.add_argument("--suggest-k", action="store_true", help="also report the silhouette suggestion for k")
    parser.add_argument("--method", choices=("kmeans", "agglomerative"), default="kmeans",
                        help="clustering of the patch features")
    parser.add_argument("--bar-filter", choices=("auto", "two-step", "mesh", "none"), default="auto",
                        help="how grid bars are found and masked")
    parser.add_argument(
        "--crystal-cluster", type=int, action="append", default=None, metavar="N", help="cluster id(s) holding crystals"
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=None,
        metavar="ROW,COL",
        help="pixel (row,col) of a reference patch: rank by similarity to it instead (repeatable)",
    )
    parser.add_argument("--calibration", metavar="FILE", help='JSON {"presets": {NAME: {"matrix_um_per_px": ...}}}')
    parser.add_argument("--allow-uncalibrated", action="store_true",
                        help="use the nominal pixel size when --calibration has no entry for the image's preset "
                             "(default: refuse)")
    parser.add_argument("--pixel-size-um", type=float, default=None, help="override the file's pixel size (um)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the clustering")
    parser.add_argument("--max-candidates", type=int, default=locate_defaults.MAX_CANDIDATES,
                        help="most candidates written")
    parser.add_argument("--no-flatten", action="store_true", help="do not flatten uneven illumination")
    parser.add_argument(
        "--outlines",
        metavar="PX",
        type=int,
        default=None,
        help="also find faint crystals by their straight edges, with lines of PX pixels (about the shortest facet; "
        "for high-magnification images where crystals are many windows wide, e.g. 41 at 0.04 um/px)",
    )
    parser.add_argument("--out", metavar="DIR", default="locate-out", help="output folder (default ./locate-out)")
    parser.set_defaults(handler=run)


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise CommandError(f"--grid must look like 20x20 (rows x cols), got {text!r}") from None
    if rows < 1 or cols < 1:
        raise CommandError(f"--grid needs at least 1x1 cells, got {text!r}")
    return rows, cols


def _parse_reference(text: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise CommandError(f"--reference must be ROW,COL in pixels, got {text!r}") from None
    return row, col


def _check_references(texts: Sequence[str] | None, image_shape: tuple[int, ...]) -> None:
    """`CommandError` for a `--reference` pixel outside the image (rows 0..H-1, columns 0..W-1)."""
    rows, cols = image_shape[0], image_shape[1]
    for text in texts or ():
        row, col = _parse_reference(text)
        if not (0 <= row < rows and 0 <= col < cols):
            raise CommandError(
                f"--reference {text}: outside the image ({rows} rows x {cols} columns; "
                f"ROW must be 0..{rows - 1}, COL 0..{cols - 1})"
            )


def load_input(path_text: str, pixel_size_um: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The image (2-D array, stored dtype) and what is known about its place: `stage_xy_um`, `preset`,
    `pixel_size_um`, `matrix_um_per_px` (montages with stage positions). Raises `CommandError`."""
    from drivers.formats.images import ImageFormatError, read_image

    path = Path(path_text)
    if not path.exists():
        raise CommandError(f"{path}: no such file or folder")
    info: dict[str, Any] = {}
    if path.is_dir() or path.suffix.lower() == ".mdoc":
        try:
            from drivers.formats.montage import fit_stage_transform, open_montage
        except ImportError as exc:  # pragma: no cover - the montage reader ships with the project
            raise CommandError(f"montages need drivers.formats.montage: {exc}") from exc
        try:
            with open_montage(path, pixel_size_um=pixel_size_um) as montage:
                image = montage.to_array()
                info["pixel_size_um"] = montage.pixel_size_um
                transform = fit_stage_transform(montage)
        except (ValueError, OSError) as exc:
            raise CommandError(f"{path}: cannot read montage: {exc}") from exc
        if transform is not None:
            info["stage_xy_um"] = transform.stage_xy_um
            info["matrix_um_per_px"] = np.asarray(transform.matrix_um_per_px)
        return image, info
    try:
        data = read_image(path)
    except ImageFormatError as exc:
        raise CommandError(str(exc)) from exc
    info["pixel_size_um"] = pixel_size_um or data.pixel_size_um
    stage = data.metadata.get("stage") if isinstance(data.metadata, dict) else None
    if isinstance(stage, dict) and "x_um" in stage and "y_um" in stage:
        info["stage_xy_um"] = (float(stage["x_um"]), float(stage["y_um"]))
    if isinstance(data.metadata, dict) and data.metadata.get("preset"):
        info["preset"] = str(data.metadata["preset"])
    return data.array, info


def stage_matrix(
    info: dict[str, Any], calibration: str | None, allow_uncalibrated: bool = False
) -> tuple[np.ndarray | None, str]:
    """The image->stage matrix and where it came from ("calibration", "montage", "uncalibrated", "none").

    A calibration file without the image's preset is a `CommandError` (the stage positions would be off by
    the camera rotation) unless `allow_uncalibrated`: then the nominal pixel size is used."""
    if "matrix_um_per_px" in info:
        return np.asarray(info["matrix_um_per_px"], dtype=np.float64), "montage"
    if calibration:
        try:
            payload = json.loads(Path(calibration).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8 text or not JSON (e.g. a binary file)
            reason = getattr(exc, "strerror", None) or str(exc)[:120]
            raise CommandError(f"{calibration}: cannot read calibration JSON ({reason})") from None
        presets = payload.get("presets", {}) if isinstance(payload, dict) else {}
        preset = info.get("preset")
        entry = presets.get(preset) if preset else None
        if entry is not None:
            try:
                matrix = np.asarray(entry["matrix_um_per_px"], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as exc:
                raise CommandError(f"{calibration}: preset {preset!r} has no valid matrix_um_per_px") from exc
            if matrix.shape != (2, 2) or not np.all(np.isfinite(matrix)):
                raise CommandError(f"{calibration}: matrix_um_per_px of {preset!r} must be 2x2 numbers")
            return matrix, "calibration"
        if not allow_uncalibrated:
            known = ", ".join(sorted(presets)) or "none"
            what = f"no preset {preset!r}" if preset else "no preset for this image (its metadata names none)"
            raise CommandError(
                f"{calibration} has {what} (it has: {known}); stage positions would be uncalibrated. "
                "Pass --allow-uncalibrated to use the nominal pixel size anyway"
            )
        logger.warning("calibration %s has no preset %r; using the nominal pixel size", calibration, preset)
    if info.get("pixel_size_um"):
        return float(info["pixel_size_um"]) * np.eye(2), "uncalibrated"
    return None, "none"


def candidates_to_stage(
    candidates: Sequence[Candidate],
    image_shape: tuple[int, ...],
    stage_xy_um: tuple[float, float],
    matrix_um_per_px: np.ndarray,
) -> list[Candidate]:
    """Copies of `candidates` with `x_um`, `y_um` from `drivers.geometry.pixel_to_stage_um` (frame of
    `image_shape` taken at `stage_xy_um` with the image->stage matrix `matrix_um_per_px`, 2x2 um per pixel).

    Raises `SettingsError` when the matrix is not an invertible finite 2x2 matrix.
    """
    from agent.locate.errors import SettingsError

    if not candidates:
        return []
    matrix = np.asarray(matrix_um_per_px, dtype=np.float64)
    if matrix.shape != (2, 2) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) == 0:
        raise SettingsError(f"matrix_um_per_px must be an invertible finite 2x2 matrix, got {matrix.tolist()}")
    pixels = np.array([[c.col_px, c.row_px] for c in candidates], dtype=np.float64)
    stage = pixel_to_stage_um(pixels, image_shape, stage_xy_um, matrix)
    return [
        dataclasses.replace(c, x_um=float(xy[0]), y_um=float(xy[1])) for c, xy in zip(candidates, stage, strict=True)
    ]


def run(args: argparse.Namespace) -> int:
    """Handler of `crystal-locator locate`."""
    started = time.perf_counter()
    check_out_folder(Path(args.out))
    for text in args.reference or ():
        _parse_reference(text)
    image, info = load_input(args.image, args.pixel_size_um)
    if image.dtype == np.bool_ or image.dtype.kind not in "uif":
        raise CommandError(f"{args.image}: unsupported pixel type {image.dtype}; use an integer or float image")
    _check_references(args.reference, image.shape)
    matrix, matrix_source = None, "none"
    if "stage_xy_um" in info:  # checked before the work
        matrix, matrix_source = stage_matrix(info, args.calibration, args.allow_uncalibrated)
    settings = _settings_from_args(args)
    located = _locate(image, settings, args)
    candidates = located.candidates
    if matrix is not None:
        if matrix_source == "uncalibrated":
            print(
                "warning: no calibration for this preset; stage positions assume pixel_size_um * identity "
                "(uncalibrated). Pass --calibration FILE for accurate x_um, y_um."
            )
        candidates = candidates_to_stage(candidates, located.analysis.image_shape, info["stage_xy_um"], matrix)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, image, args, settings, located, candidates, matrix_source)
    _print_table(located.analysis, located.crystal, candidates, time.perf_counter() - started, out)
    return 0


def _settings_from_args(args: argparse.Namespace) -> LocateSettings:
    """The `LocateSettings` the command line asks for (`CommandError` when they are invalid)."""
    from pydantic import ValidationError

    from agent.locate.analysis import LocateSettings

    values: dict[str, Any] = {"suggest_k": args.suggest_k, "method": args.method, "seed": args.seed}
    values.update(bar_filter=args.bar_filter, flatten=not args.no_flatten, max_candidates=args.max_candidates)
    values.update(outline_length_px=args.outlines)
    if args.k is not None:
        values["k"] = args.k
    if args.grid is not None:
        rows, cols = _parse_grid(args.grid)
        values.update(mode="grid", grid_rows=rows, grid_cols=cols)
    else:  # the default: sliding windows, as a session uses
        values["mode"] = "window"
        if args.window is not None:
            values["window_px"] = args.window
        if args.stride is not None:
            values["stride_px"] = args.stride
    try:
        return LocateSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CommandError(f"invalid settings: {problems}") from None


@dataclasses.dataclass(frozen=True)
class _Drafts:
    """The pictures that do not depend on the candidates: the heat map before its marks, and the bytes of
    gallery.png and bar_mask.png."""

    heatmap: HeatmapDraft
    gallery_png: bytes
    mask_png: bytes


def _load_picture_modules() -> None:
    """Import what `_make_drafts` uses (the renderer, Pillow with its file formats and fonts) on the calling
    thread: the drafting thread then imports nothing while the other imports the object search's modules
    (two threads importing at once could meet in a circular import)."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: F401

    import agent.locate.render  # noqa: F401
    import drivers.formats.images  # noqa: F401

    Image.preinit()  # the PNG writer and the other standard formats, loaded on the first save otherwise


def _make_drafts(image: np.ndarray, analysis: ClusterAnalysis, crystal: tuple[int, ...]) -> _Drafts:
    """`_Drafts` of `image` with one thread of band work (`_locate` runs this beside the candidate search,
    after `_load_picture_modules`)."""
    from agent.locate.render import HeatmapDraft, cluster_gallery_rgb, mask_png
    from drivers.formats.images import encode_png

    heatmap = HeatmapDraft.make(image, analysis, crystal, workers=1)
    return _Drafts(heatmap, encode_png(cluster_gallery_rgb(image, analysis)), mask_png(analysis.bar_mask, workers=1))


@dataclasses.dataclass(frozen=True)
class _Located:
    """What `_locate` found: the analysis, the similarity map (cell grid; None without `--reference`), the
    crystal clusters and what chose them, the candidates in pixels, and the pictures drafted meanwhile."""

    analysis: ClusterAnalysis
    similarity: np.ndarray | None
    crystal: tuple[int, ...]
    chosen_by: str
    candidates: list[Candidate]
    drafts: _Drafts


def _locate(image: np.ndarray, settings: LocateSettings, args: argparse.Namespace) -> _Located:
    """Analyse `image` and find candidates: by similarity to `--reference` patches, or in the
    `--crystal-cluster` clusters, or in the default rule's. `CommandError` for a `LocateError`.

    The pictures that do not need the candidates (`_Drafts`) are made on a second thread while the
    candidates are searched (mostly Python, one core); nothing is written before both are done."""
    from agent.locate.analysis import analyse_and_prepare
    from agent.locate.errors import LocateError
    from agent.locate.similarity import similarity_map
    from agent.locate.targets import find_candidates

    _load_picture_modules()
    with ThreadPoolExecutor(1) as pool:
        try:
            # the objects are searched on the image the analysis prepared (preparing it again took a quarter
            # of the time at 4k)
            analysis, prepared = analyse_and_prepare(image, settings)
            similarity = None
            if args.reference:
                cells = [analysis.cell_of_pixel(*_parse_reference(text)) for text in args.reference]
                similarity = similarity_map(analysis.features, analysis.grid_shape, cells, analysis.valid_cells)
                crystal, chosen_by = (), "similarity to reference patch(es) " + ", ".join(args.reference)
                drafts = pool.submit(_make_drafts, image, analysis, crystal)
                candidates = find_candidates(analysis, (), settings, score_map=similarity)
            else:
                if args.crystal_cluster:
                    crystal, chosen_by = tuple(args.crystal_cluster), "--crystal-cluster"
                else:
                    crystal = analysis.suggested_crystal_clusters
                    chosen_by = "default rule: " + analysis.suggestion_rule
                drafts = pool.submit(_make_drafts, image, analysis, crystal)
                candidates = find_candidates(analysis, crystal, settings, image=image, prepared=prepared)
        except LocateError as exc:
            raise CommandError(str(exc)) from exc
        return _Located(analysis, similarity, crystal, chosen_by, candidates, drafts.result())


def _write_outputs(
    out: Path,
    image: np.ndarray,
    args: argparse.Namespace,
    settings: LocateSettings,
    located: _Located,
    candidates: list[Candidate],
    matrix_source: str,
) -> None:
    """Write the files of the module docstring into `out` (each atomically)."""
    from agent.locate.render import similarity_rgb
    from drivers.formats.images import encode_png, write_atomic

    analysis = located.analysis
    write_atomic(out / "heatmap.png", located.drafts.heatmap.png(candidates))
    write_atomic(out / "gallery.png", located.drafts.gallery_png)
    write_atomic(out / "bar_mask.png", located.drafts.mask_png)
    similarity = located.similarity
    if similarity is not None:
        write_atomic(out / "similarity.png", encode_png(similarity_rgb(image, analysis, similarity, candidates)))
    clusters = _clusters_document(args, settings, located)
    write_atomic(out / "clusters.json", json.dumps(clusters, indent=2, allow_nan=False, default=_json_default).encode())
    rows_out = [c.to_dict() for c in candidates]
    payload = {"matrix_source": matrix_source, "candidates": rows_out}
    write_atomic(out / "candidates.json", json.dumps(payload, indent=2).encode())
    buffer = io.StringIO()
    fields = ["rank", "row_px", "col_px", "area_px", "score", "cluster_id", "x_um", "y_um"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for rank, row in enumerate(rows_out, start=1):
        writer.writerow({"rank": rank, **{k: ("" if row[k] is None else row[k]) for k in fields[1:]}})
    write_atomic(out / "candidates.csv", buffer.getvalue().encode())


def _clusters_document(args: argparse.Namespace, settings: LocateSettings, located: _Located) -> dict[str, Any]:
    """The content of clusters.json: the image, settings, features, clusters and what chose the crystal
    clusters (fractions of the image's pixels, angles in degrees)."""
    analysis = located.analysis
    return {
        "image": str(args.image),
        "image_shape": list(analysis.image_shape),
        "settings": settings.model_dump(mode="json"),
        "feature_names": list(analysis.feature_names),
        "background_cluster": analysis.background_cluster,
        "outline_cluster": analysis.outline_cluster,
        "crystal_clusters": list(located.crystal),
        "chosen_by": located.chosen_by,
        "suggested_crystal_clusters": list(analysis.suggested_crystal_clusters),
        "suggestion_rule": analysis.suggestion_rule,
        "suggested_k": analysis.suggested_k,
        "k_scores": {str(k): v for k, v in analysis.k_scores.items()},
        "bar_angle_deg": analysis.bar_angle_deg,
        "bar_fraction": float(analysis.bar_mask.mean()),
        "vacuum_fraction": float(analysis.vacuum_mask.mean()) if analysis.vacuum_mask is not None else 0.0,
        "gallery": "gallery.png",
        "clusters": [c.to_dict(analysis.feature_names) for c in analysis.clusters],
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _print_table(analysis: Any, crystal: tuple[int, ...], candidates: list[Any], elapsed_s: float, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"clusters ({analysis.grid_shape[0]}x{analysis.grid_shape[1]} cells, {elapsed_s:.2f} s)")
    for column in ("cluster", "cells", "fraction", "texture", "role"):
        table.add_column(column, justify="right" if column != "role" else "left")
    for c in analysis.clusters:
        role = (
            "crystal"
            if c.cluster_id in crystal
            else ("background" if c.cluster_id == analysis.background_cluster else "")
        )
        table.add_row(str(c.cluster_id), str(c.n_cells), f"{c.fraction:.3f}", f"{c.texture_contrast:.1f}", role)
    console.print(table)
    masked_percent = 100 * analysis.bar_mask.mean()
    console.print(f"{len(candidates)} candidates; masked (bars/black/film holes): {masked_percent:.1f} %")
    for rank, cand in enumerate(candidates[:10], start=1):
        stage = f"  x={cand.x_um:.2f} um y={cand.y_um:.2f} um" if cand.x_um is not None else ""
        console.print(f"  {rank:>3}. row {cand.row_px:.0f} col {cand.col_px:.0f}  score {cand.score:.2f}{stage}")
    console.print(f"written to {out}/")
