"""Files a screening session writes for people and other tools.

- `atlas/heatmap.png` (cluster heat map with targets), `atlas/bar_mask.png`, `atlas/gallery.png`,
  `atlas/clusters.json`;
- `targets.csv`, `targets.json` (stage coordinates, scores, outcomes), `targets.nav` (SerialEM navigator:
  recorded targets as points, ready to acquire);
- `targets_on_map.nav` (a session on a SerialEM map): the operator's navigator with every target drawn on the map;
- `targets/<id>_thumb.png`, `targets/<id>_diffraction.png` (8-bit previews);
- `summary.json` (see `agent.session.outcomes.SessionSummary`).

Every file is written atomically, so a crash leaves the previous version, never half a file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.session.outcomes import TargetRecord, TargetResult, rows_to_csv, target_rows
from drivers.base import Frame
from drivers.formats.images import encode_png, write_atomic

logger = logging.getLogger(__name__)

#: Longest side of PNG previews sent with prompts, pixels (phone screens, small messages).
PROMPT_IMAGE_MAX_PX = 1024


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (indented, sorted keys)."""
    return write_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def _downscale_rgb(rgb: np.ndarray, max_px: int) -> np.ndarray:
    """Shrink an RGB image so that its longest side is at most `max_px` (block mean; no-op if small)."""
    factor = int(np.ceil(max(rgb.shape[:2]) / max_px))
    if factor <= 1:
        return rgb
    rows, cols = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    blocks = rgb[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor, -1)
    return blocks.mean(axis=(1, 3)).astype(np.uint8)


def prompt_images(image: np.ndarray, analysis: Any) -> dict[str, bytes]:
    """PNG images for a labelling prompt: the cluster heat map and the gallery of typical patches."""
    from agent.locate.render import cluster_gallery_rgb, heatmap_rgb

    heat = _downscale_rgb(heatmap_rgb(image, analysis), PROMPT_IMAGE_MAX_PX)
    gallery = _downscale_rgb(cluster_gallery_rgb(image, analysis), PROMPT_IMAGE_MAX_PX)
    return {"heatmap.png": encode_png(heat), "gallery.png": encode_png(gallery)}


def write_atlas_outputs(
    session_dir: Path,
    atlas: Any,
    analysis: Any,
    decision: Any,
    targets: Sequence[TargetRecord],
    relative_folder: str = "atlas",
) -> dict[str, Path]:
    """Heat map with targets, bar mask, gallery and cluster table of the atlas in `relative_folder` of the
    session folder; returns kind -> path."""
    from agent.locate.render import cluster_gallery_rgb, heatmap_rgb
    from agent.locate.targets import Candidate

    folder = session_dir / relative_folder
    folder.mkdir(parents=True, exist_ok=True)
    marks = [
        Candidate(
            row_px=t.atlas_row_px, col_px=t.atlas_col_px, area_px=t.area_px, score=t.score, cluster_id=t.cluster_id
        )
        for t in targets
    ]
    written = {
        "heatmap": write_atomic(
            folder / "heatmap.png",
            encode_png(
                heatmap_rgb(
                    atlas.image,
                    analysis,
                    candidates=marks,
                    crystal_clusters=decision.crystal_clusters,
                    mixed_clusters=decision.mixed_clusters,
                )
            ),
        ),
        "bar_mask": write_atomic(
            folder / "bar_mask.png", encode_png(np.asarray(analysis.bar_mask, dtype=np.uint8) * 255)
        ),
        "gallery": write_atomic(folder / "gallery.png", encode_png(cluster_gallery_rgb(atlas.image, analysis))),
    }
    clusters = [
        {
            "cluster_id": int(c.cluster_id),
            "n_cells": int(c.n_cells),
            "fraction": float(c.fraction),
            "mean_features": dict(zip(analysis.feature_names, map(float, c.mean_features), strict=True)),
            "crystal": int(c.cluster_id) in decision.crystal_clusters,
            "mixed": int(c.cluster_id) in decision.mixed_clusters,
            "label_source": decision.sources.get(int(c.cluster_id)),
        }
        for c in analysis.clusters
    ]
    written["clusters"] = write_json(
        folder / "clusters.json",
        {"clusters": clusters, "suggestion_rule": analysis.suggestion_rule, "decision": decision.as_dict()},
    )
    return written


def _preview_uint8(image: np.ndarray, log_scale: bool = False) -> np.ndarray:
    """8-bit preview of a frame: the locator's robust 1-99.5 percentile stretch (log first for diffraction)."""
    from agent.locate.render import display_uint8

    data = np.asarray(image)
    if log_scale:
        data = np.asarray(data, dtype=np.float32)
        data = np.log1p(np.maximum(data - np.percentile(data, 1), 0))
    return display_uint8(data, low_percent=1.0, high_percent=99.5)


def write_target_thumbnails(
    session_dir: Path, target_id: str, search: Frame | None, diffraction: Frame | None
) -> dict[str, Path]:
    """Small PNG previews of a target's search image (none for a direct snapshot) and diffraction pattern;
    returns kind -> path."""
    folder = session_dir / "targets"
    written = {}
    if search is not None:
        thumb = _downscale_rgb(np.repeat(_preview_uint8(search.image)[..., None], 3, axis=2), 256)
        written["thumb"] = write_atomic(folder / f"{target_id}_thumb.png", encode_png(thumb))
    if diffraction is not None:
        pattern = _downscale_rgb(np.repeat(_preview_uint8(diffraction.image, True)[..., None], 3, axis=2), 256)
        written["diffraction_png"] = write_atomic(folder / f"{target_id}_diffraction.png", encode_png(pattern))
    return written


def write_target_tables(
    session_dir: Path,
    targets: Sequence[TargetRecord],
    results: dict[str, TargetResult],
    calibration: Any,
    atlas: Any,
) -> None:
    """`targets.csv`, `targets.json` and `targets.nav` (recorded targets) in the session folder."""
    rows = target_rows(targets, results)
    write_atomic(session_dir / "targets.csv", rows_to_csv(rows))
    write_json(session_dir / "targets.json", {"targets": rows})
    try:
        from drivers.formats.nav import point_item, write_nav
    except ImportError:  # pragma: no cover - the navigator writer ships with the package
        return
    items = []
    for target in targets:
        result = results.get(target.target_id)
        if result is None or not result.snapped:
            continue
        items.append(
            point_item(
                target.target_id,
                result.x_um,
                result.y_um,
                note=f"{result.outcome} score {target.score:.3f} spots {result.n_spots}",
                color=0 if result.outcome == "recorded" else 3,
                acquire=result.outcome == "recorded",
            )
        )
    write_nav(session_dir / "targets.nav", items)


#: Label prefix of the points `write_targets_on_map` adds to the operator's navigator.
MAP_POINT_PREFIX = "CL-"


def write_targets_on_map(
    session_dir: Path,
    nav_bytes: bytes,
    map_item: Any,
    targets: Sequence[TargetRecord],
    results: dict[str, TargetResult],
) -> Path:
    """`targets_on_map.nav`: the operator's navigator (`nav_bytes`, kept byte for byte) followed by one point per
    target drawn on `map_item` (a `drivers.formats.nav.NavItem`): `DrawnID` = its `MapID`, its registration and
    Z, label `CL-<target id>` (a suffix if the navigator uses that label), a note with the outcome (or "not
    visited") and p_diffract when known, at the re-centred position once visited; `Acquire = 1` only for the
    diffracting ones (outcome `recorded`), so that SerialEM's "Acquire at items" visits them. Colours: green
    diffracting, yellow found without diffraction, magenta not found or failed, red not visited. Atomic."""
    from drivers.formats.nav import format_nav, parse_nav, point_item

    try:
        nav_text = nav_bytes.decode("utf-8")
    except UnicodeDecodeError:
        nav_text = nav_bytes.decode("latin-1")  # SerialEM on Windows writes notes in the system code page
    taken = {item.label for item in parse_nav(nav_text, where="navigator")}
    colours = {"recorded": 1, "no-diffraction": 3}
    points = []
    for target in targets:
        result = results.get(target.target_id)
        label = f"{MAP_POINT_PREFIX}{target.target_id}"
        while label in taken:
            label += "-cl"
        taken.add(label)
        note = f"crystal-locator {target.target_id}: " + ("not visited" if result is None else result.outcome)
        if target.p_diffract is not None:
            note += f" p_diffract {target.p_diffract:.2f}"
        if result is not None and result.snapped:
            note += f" spots {result.n_spots}"
        x_um, y_um = (target.x_um, target.y_um) if result is None else (result.x_um, result.y_um)
        points.append(
            point_item(
                label,
                x_um,
                y_um,
                z_um=map_item.stage_xyz_um[2],
                note=note,
                color=0 if result is None else colours.get(result.outcome, 4),
                acquire=result is not None and result.outcome == "recorded",
                drawn_id=map_item.map_id,
                regis=map_item.regis,
            )
        )
    newline = "\r\n" if "\r\n" in nav_text else "\n"
    added = ""
    if points:
        formatted = format_nav(points)
        added = newline + formatted[formatted.index("[Item") :].replace("\n", newline)
        if not nav_text.endswith(("\n", "\r")):
            added = newline + added
    return write_atomic(session_dir / "targets_on_map.nav", nav_bytes + added.encode("utf-8"))
