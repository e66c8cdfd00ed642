"""Self-contained HTML reports: one per screening session, one per evaluation run.

Everything is in the one file: images are embedded as base64 PNG data URIs (re-encoded through Pillow,
so a corrupt or missing image becomes a visible note, never a broken picture), CSS is inline, there
is no script and nothing is fetched from a network. A report of a session that is still running or
that crashed shows what is there and says what is missing.

- `write_session_report(session_dir) -> Path` writes `session_dir/report.html` from a session folder
  (`summary.json`, `plan.json`, `calibration.json`, `journal.jsonl`, `atlas/*.png`, `targets.json` or
  `targets.csv`, `targets/<id>_thumb.png`, `targets/<id>_diffraction.png`);
- `write_evaluation_report(rows, path, ...) -> Path` writes an evaluation run's tables, target checks
  and example images with every method's detections drawn.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from drivers.formats.images import encode_png, write_atomic

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
#: Longest side (pixels) of an embedded image; larger images are shrunk to keep the file small.
MAX_IMAGE_SIDE_PX = 1600
THUMB_SIDE_PX = 256

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1280px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f2f2f2}
td.t,th.t{text-align:left;white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}
tr.fail td{background:#fde8e8}tr.ok td{background:#e8f6e8}
figure{display:inline-block;margin:.4em;vertical-align:top;text-align:center}
figure img{max-width:100%;border:1px solid #bbb;image-rendering:auto}
figcaption{font-size:.85em;color:#555}
.cards{display:flex;flex-wrap:wrap;gap:.6em}.card{border:1px solid #ccc;border-radius:6px;padding:.4em;width:270px}
.card img{width:128px;height:auto}.note{color:#a33}.muted{color:#777;font-size:.85em}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
"""


class ReportError(Exception):
    """A report cannot be written (no such session folder, unwritable path)."""


# --------------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def html_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str = "", row_classes: Sequence[str] = ()
) -> str:
    """An HTML table; text columns (non-numbers) are left-aligned. Cells are escaped."""
    head = "".join(f'<th class="t">{_e(h)}</th>' for h in headers)
    body = []
    classes = list(row_classes)
    for index, row in enumerate(rows):
        cells = "".join(
            f'<td{"" if isinstance(v, (int, float)) and not isinstance(v, bool) else " class=t"}>{_e(_fmt(v))}</td>'
            for v in row
        )
        css = f' class="{_e(classes[index])}"' if index < len(classes) and classes[index] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return (f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _shrink(image: Any, max_side_px: int) -> Any:
    from PIL import Image

    width, height = image.size
    scale = max(width, height) / max_side_px
    if scale <= 1:
        return image
    return image.resize((max(1, round(width / scale)), max(1, round(height / scale))), Image.Resampling.BOX)


def image_file_png(path: Path, max_side_px: int = MAX_IMAGE_SIDE_PX) -> bytes | None:
    """PNG bytes of an image file (PNG/TIFF/...) re-encoded and shrunk; None if missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return None
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "RGB", "RGBA"):
                if img.mode.startswith("I") or img.mode == "F":
                    return array_png(np.asarray(img), max_side_px)
                img = img.convert("RGB")
            small = _shrink(img, max_side_px)
            buffer = io.BytesIO()
            small.save(buffer, format="PNG", compress_level=6)
            return buffer.getvalue()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        logger.warning("%s: cannot embed image (%s)", path, exc)
        return None


def display_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit display of any 2-D image: robust 1-99.5 percentile stretch (NaN -> 0)."""
    data = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = np.percentile(data[finite], (1, 99.5))
    scaled = (np.where(finite, data, low) - low) / max(float(high - low), 1e-12)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def array_png(image: np.ndarray, max_side_px: int = MAX_IMAGE_SIDE_PX) -> bytes:
    """PNG bytes of a 2-D image (any dtype, stretched for display) or an RGB uint8 array, shrunk to fit."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 2 and array.dtype != np.uint8:
        array = display_uint8(array)
    small = _shrink(Image.fromarray(np.ascontiguousarray(array)), max_side_px)
    return encode_png(np.asarray(small), compress_level=6)


def _figure(png: bytes | None, caption: str, *, width_px: int | None = None, missing: str = "") -> str:
    if png is None:
        return f'<figure><p class="note">{_e(missing or caption + ": not available")}</p></figure>'
    style = f' style="width:{width_px}px"' if width_px else ""
    return (f'<figure><img src="{png_data_uri(png)}" alt="{_e(caption)}"{style}>'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def html_page(title: str, sections: Sequence[str]) -> str:
    """A whole self-contained HTML page (inline CSS, no script) with `title` and the `sections` (HTML) in order."""
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=\"muted\">generated {_e(generated)} by crystal-locator</p>"
        + "".join(sections) + "</body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# session report
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.info("%s: not read (%s)", path, exc)
        return None


def _read_targets(session_dir: Path) -> list[dict[str, Any]]:
    data = _read_json(session_dir / "targets.json")
    if isinstance(data, dict) and isinstance(data.get("targets"), list):
        return [t for t in data["targets"] if isinstance(t, dict)]
    if isinstance(data, list):
        return [t for t in data if isinstance(t, dict)]
    csv_path = session_dir / "targets.csv"
    if csv_path.is_file():
        try:
            return list(csv.DictReader(csv_path.read_text().splitlines()))
        except (OSError, csv.Error) as exc:
            logger.info("%s: not read (%s)", csv_path, exc)
    return []


def _read_journal(session_dir: Path) -> list[dict[str, Any]]:
    path = session_dir / "journal.jsonl"
    entries = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line after a crash
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def state_timings(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per state: visits, microscope seconds and wall seconds spent in it, from `transition` entries.

    The time in a state runs from its transition entry to the next transition entry. Lines a resume superseded
    (a step cut by a crash and done again) are left out, as in the session's own figures.
    """
    from agent.session.journal import live_entries

    transitions = [e for e in live_entries(list(entries)) if e.get("type") == "transition" and "state" in e]
    totals: dict[str, dict[str, Any]] = {}
    for current, following in itertools.pairwise(transitions):
        state = str(current["state"])
        item = totals.setdefault(state, {"state": state, "visits": 0, "microscope_s": 0.0, "wall_s": 0.0})
        item["visits"] += 1
        t0, t1 = current.get("microscope_time_s"), following.get("microscope_time_s")
        if isinstance(t0, (int, float)) and isinstance(t1, (int, float)):
            item["microscope_s"] += float(t1) - float(t0)
        w0, w1 = _parse_time(current.get("time_utc")), _parse_time(following.get("time_utc"))
        if w0 is not None and w1 is not None:
            item["wall_s"] += (w1 - w0).total_seconds()
    if transitions:
        last = str(transitions[-1]["state"])
        totals.setdefault(last, {"state": last, "visits": 0, "microscope_s": 0.0, "wall_s": 0.0})["visits"] += 1
    return list(totals.values())


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


_SUMMARY_KEYS = (
    "state", "specimen", "targets_found", "targets_visited", "targets_confirmed", "targets_snapped_directly",
    "diffracting_crystals",
    "diffracting_per_hour", "time_per_diffracting_s", "microscope_time_s", "per_target_time_s", "prompts",
    "time_per_confirmed_s", "confirmed_per_hour", "precision", "recall", "recall_diffracting", "faults", "wall_time_s",
)

_TARGET_COLUMNS = (
    "target_id", "outcome", "x_um", "y_um", "score", "p_diffract", "cluster_id", "from_mixed_cluster", "area_px",
    "recentre_offset_um", "n_spots", "signal_to_background", "reason",
)


def session_report_html(session_dir: str | Path) -> str:
    """The HTML text of a session report (see `write_session_report`)."""
    folder = Path(session_dir)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such session folder; pass the folder `crystal-locator screen --out` wrote")
    if not (folder / "summary.json").exists() and not (folder / "journal.jsonl").exists():
        raise ReportError(
            f"{folder}: not a session folder (no journal.jsonl, no summary.json); "
            "pass the folder `crystal-locator screen --out` wrote"
        )
    summary = _read_json(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    plan = _read_json(folder / "plan.json")
    calibration = _read_json(folder / "calibration.json")
    targets = _read_targets(folder)
    journal = _read_journal(folder)
    sections = [
        *_summary_sections(summary),
        *_atlas_sections(folder),
        *_target_sections(folder, targets),
        *_timing_sections(journal),
        *_calibration_and_plan_sections(calibration, plan),
    ]
    title = f"Screening session {summary.get('session') or folder.name}"
    return html_page(title, sections)


def _summary_sections(summary: Mapping[str, Any]) -> list[str]:
    """The summary table (`_SUMMARY_KEYS` first, then any other scalar figure), or a note that it is missing."""
    if not summary:
        return [
            '<h2>Summary</h2><p class="note">summary.json is missing or unreadable '
            "(the session may not have started or is damaged).</p>"
        ]
    keys = [k for k in _SUMMARY_KEYS if k in summary] + sorted(
        k for k in summary if k not in _SUMMARY_KEYS and k != "session" and not isinstance(summary[k], (dict, list))
    )
    rows = [(k, summary[k]) for k in keys]
    fixed = summary.get("fixed_time_s")
    if isinstance(fixed, dict):
        rows += [(f"fixed_time_s: {state}", seconds) for state, seconds in fixed.items()]
    return ["<h2>Summary</h2>" + html_table(["quantity", "value"], rows, table_id="summary")]


def _atlas_sections(folder: Path) -> list[str]:
    """The atlas figures (overview, heat map, bar mask, gallery) and the cluster table with its rule."""
    sections = []
    atlas_dir = folder / "atlas"
    figures = [
        _figure(
            image_file_png(atlas_dir / "heatmap.png"),
            "atlas: cluster heat map with targets",
            missing="atlas/heatmap.png not written yet",
        ),
        _figure(
            image_file_png(atlas_dir / "bar_mask.png", 800),
            "grid-bar mask (white: bars)",
            missing="atlas/bar_mask.png not written yet",
        ),
        _figure(
            image_file_png(atlas_dir / "gallery.png", 1000),
            "typical patches per cluster",
            missing="atlas/gallery.png not written yet",
        ),
    ]
    overview_png = image_file_png(folder / "overview.tif", 800)
    if overview_png is not None:
        figures.insert(0, _figure(overview_png, "whole-grid overview", width_px=420))
    for round_dir in sorted(atlas_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[-1] or 0)):
        heatmap = image_file_png(round_dir / "heatmap.png", 400)
        if heatmap is not None:  # a session sized by its budget maps a block of squares per round
            figures.append(_figure(heatmap, f"{round_dir.name.replace('-', ' ')}: heat map with targets", width_px=420))
    sections.append("<h2>Atlas</h2>" + "".join(figures))
    clusters = _read_json(atlas_dir / "clusters.json")
    if isinstance(clusters, dict) and isinstance(clusters.get("clusters"), list):
        rows = [
            (
                c.get("cluster_id"),
                c.get("n_cells"),
                c.get("fraction"),
                "mixed (targets last)" if c.get("mixed") else c.get("crystal"),
                c.get("label_source"),
            )
            for c in clusters["clusters"]
            if isinstance(c, dict)
        ]
        sections.append(
            "<h3>Clusters</h3>"
            + html_table(["cluster", "cells", "fraction", "crystal", "label source"], rows, table_id="clusters")
        )
        if clusters.get("suggestion_rule"):
            sections.append(f'<p class="muted">default rule: {_e(clusters["suggestion_rule"])}</p>')
    return sections


def _target_sections(folder: Path, targets: Sequence[Mapping[str, Any]]) -> list[str]:
    """The target table (rows marked by outcome) and a card per target with its search image and
    diffraction pattern, or a note that there are no targets yet."""
    sections = [f"<h2>Targets ({len(targets)})</h2>"]
    if not targets:
        sections.append('<p class="note">no targets yet.</p>')
        return sections
    classes = [
        "ok" if t.get("outcome") == "recorded" else "fail" if t.get("outcome") in ("rejected", "failed") else ""
        for t in targets
    ]
    sections.append(
        html_table(
            list(_TARGET_COLUMNS),
            [[t.get(c) for c in _TARGET_COLUMNS] for t in targets],
            table_id="targets",
            row_classes=classes,
        )
    )
    cards = []
    for target in targets:
        tid = str(target.get("target_id", ""))
        safe = Path(tid).name  # a target id never names a file outside targets/
        thumb = image_file_png(folder / "targets" / f"{safe}_thumb.png", THUMB_SIDE_PX)
        pattern = image_file_png(folder / "targets" / f"{safe}_diffraction.png", THUMB_SIDE_PX)
        if thumb is None and pattern is None:
            continue
        pictures = "".join(
            f'<img src="{png_data_uri(png)}" alt="{_e(tid)} {kind}">'
            for png, kind in ((thumb, "search image"), (pattern, "diffraction"))
            if png is not None
        )
        cards.append(
            f'<div class="card"><b>{_e(tid)}</b> {_e(target.get("outcome", ""))}<br>{pictures}<br>'
            f'<span class="muted">x {_e(_fmt(target.get("x_um")))} um, y {_e(_fmt(target.get("y_um")))}'
            f" um, spots {_e(_fmt(target.get('n_spots')))}</span></div>"
        )
    if cards:
        sections.append('<h3>Per-target images</h3><div class="cards">' + "".join(cards) + "</div>")
    return sections


def _timing_sections(journal: Sequence[Mapping[str, Any]]) -> list[str]:
    """Time per state (microscope and wall seconds, `state_timings`) and the faults, from the journal."""
    sections = []
    timings = state_timings(journal)
    if timings:
        sections.append(
            "<h2>Timings</h2>"
            + html_table(
                ["state", "visits", "microscope s", "wall s"],
                [(t["state"], t["visits"], round(t["microscope_s"], 2), round(t["wall_s"], 2)) for t in timings],
                table_id="timings",
            )
        )
    faults = [e for e in journal if e.get("type") == "fault"]
    if faults:
        sections.append(
            "<h3>Faults</h3>"
            + html_table(
                ["state", "error", "microscope s"],
                [(f.get("state"), f.get("error") or f.get("message"), f.get("microscope_time_s")) for f in faults],
                table_id="faults",
            )
        )
    return sections


def _calibration_and_plan_sections(calibration: Any, plan: Any) -> list[str]:
    """The image->stage matrix (um/px) per preset from calibration.json, and plan.json as it was saved."""
    sections = []
    if isinstance(calibration, dict):
        presets = calibration.get("presets")
        if isinstance(presets, dict) and presets:
            rows = []
            for name, entry in presets.items():
                matrix = entry.get("matrix_um_per_px") if isinstance(entry, dict) else None
                rows.append((name, _matrix_text(matrix) if matrix is not None else _fmt(entry)))
            sections.append(
                "<h2>Calibration</h2>"
                + html_table(["preset", "image->stage matrix (um/px)"], rows, table_id="calibration")
            )
    if plan is not None:
        sections.append(
            "<h2>Plan</h2><details><summary>plan.json</summary><pre>"
            + _e(json.dumps(plan, indent=2, default=str))
            + "</pre></details>"
        )
    return sections


def _matrix_text(matrix: Any) -> str:
    """A 2x2 matrix as `[[a, b], [c, d]]` with 5 significant digits (or its JSON if it is not 2x2)."""
    try:
        values = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        return json.dumps(matrix, default=str)
    if values.shape != (2, 2):
        return json.dumps(matrix, default=str)
    return "[[{:.5g}, {:.5g}], [{:.5g}, {:.5g}]]".format(*values.ravel())


def _write_report(path: Path, text: str) -> Path:
    """Write atomically; the file follows the umask like every output (it is meant to be shared)."""
    return write_atomic(path, text.encode("utf-8"))


def write_session_report_or_log(session_dir: str | Path) -> Path | None:
    """`write_session_report`, with a failure logged instead of raised (the session's data is on disk; a report
    can be written again with `crystal-locator report`); None then."""
    try:
        return write_session_report(session_dir)
    except (ReportError, OSError, ValueError) as exc:
        logger.warning("could not write the HTML report: %s (run `crystal-locator report %s`)", exc, session_dir)
        return None


def write_session_report(session_dir: str | Path) -> Path:
    """Write `session_dir/report.html` (atomically) from the session folder; returns its path."""
    folder = Path(session_dir)
    text = session_report_html(folder)
    try:
        return _write_report(folder / REPORT_NAME, text)
    except OSError as exc:
        raise ReportError(f"{folder / REPORT_NAME}: cannot write the report ({exc})") from exc


# --------------------------------------------------------------------------------------------------
# evaluation report
# --------------------------------------------------------------------------------------------------

_ROW_COLUMNS = (
    "specimen", "preset", "method", "mode", "precision", "recall", "recall_diffracting", "loc_error_um",
    "precision_unique", "precision_area", "recall_area", "bar_iou", "n_images", "n_crystals", "n_detections",
    "seconds_per_image",
)


def overlay_rgb(image: np.ndarray, truth: Any, detections: Sequence[Any], max_side_px: int = 512) -> np.ndarray:
    """RGB preview: the image (stretched), true crystals as green circles, detections as red crosses."""
    from PIL import Image, ImageDraw

    gray = display_uint8(image)
    rows, cols = gray.shape
    scale = min(1.0, max_side_px / max(rows, cols))
    canvas = Image.fromarray(gray).convert("RGB")
    if scale < 1.0:
        canvas = canvas.resize((max(1, round(cols * scale)), max(1, round(rows * scale))), Image.Resampling.BOX)
    draw = ImageDraw.Draw(canvas)
    for crystal in getattr(truth, "crystals", ()):
        r = max(3.0, (crystal.half_width_px + math.hypot(crystal.row1_px - crystal.row0_px,
                                                           crystal.col1_px - crystal.col0_px) / 2) * scale)
        y, x = crystal.row_px * scale, crystal.col_px * scale
        colour = (0, 200, 0) if crystal.countable else (0, 120, 160)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=1)
    for det in detections:
        y, x = det.row_px * scale, det.col_px * scale
        draw.line((x - 4, y, x + 4, y), fill=(230, 0, 0), width=2)
        draw.line((x, y - 4, x, y + 4), fill=(230, 0, 0), width=2)
    return np.asarray(canvas)


def evaluation_report_html(
    rows: Sequence[Mapping[str, Any]],
    *,
    targets: Sequence[Mapping[str, Any]] = (),
    examples: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    title: str = "crystal-locator evaluation",
    elapsed_s: float | None = None,
    failures: Sequence[str] = (),
) -> str:
    """The HTML text of an evaluation report (see `write_evaluation_report`)."""
    sections = []
    if config:
        sections.append("<h2>Configuration</h2>" + html_table(["setting", "value"], list(config.items()),
                                                              table_id="config"))
    if elapsed_s is not None:
        sections.append(f'<p class="muted">evaluation took {elapsed_s:.1f} s (wall time)</p>')
    tolerance = (config or {}).get("tolerance_um")
    sections.append(
        "<p>A detection is a true positive when it lies within "
        f"{_e(_fmt(tolerance) if tolerance is not None else 'the tolerance')} um of a true crystal's outline; "
        "recall counts crystals wholly inside the frame and off the grid bars; <i>precision_unique</i> counts a "
        "second detection on the same crystal as a false positive; the <i>area</i> figures use each detection's "
        "own cell or region as its tolerance. Figures are pooled over all images.</p>"
    )
    if targets:
        classes = ["ok" if t.get("met") else "fail" for t in targets]
        sections.append("<h2>Targets at atlas</h2>" + html_table(
            ["specimen", "role", "method", "mode", "precision", "recall", "precision goal", "recall goal", "met"],
            [(t.get("specimen"), t.get("role"), t.get("method"), t.get("mode"), t.get("precision"), t.get("recall"),
              t.get("precision_goal"), t.get("recall_goal"), bool(t.get("met"))) for t in targets],
            table_id="targets", row_classes=classes))
    sections.append(f"<h2>Results ({len(rows)} rows)</h2>" + html_table(
        list(_ROW_COLUMNS), [[r.get(c) for c in _ROW_COLUMNS] for r in rows], table_id="results"))
    size_rows = [r for r in rows if r.get("recall_by_size")]
    if size_rows:
        bins = list(size_rows[0]["recall_by_size"])
        sections.append("<h3>Recall by crystal length</h3>" + html_table(
            ["specimen", "preset", "method", "mode", *bins],
            [[r.get("specimen"), r.get("preset"), r.get("method"), r.get("mode"),
              *[r["recall_by_size"].get(b) for b in bins]] for r in size_rows],
            table_id="recall-by-size"))
    if examples:
        sections.append("<h2>Examples</h2><p class=\"muted\">green circles: true crystals (blue: not counted, cut by "
                        "the edge or on a bar); red crosses: detections.</p>")
        for key, example in examples.items():
            figures = [
                _figure(array_png(overlay_rgb(example.image, example.truth, dets)), f"{key}: {label}", width_px=380)
                for label, dets in example.detections.items()
            ]
            sections.append(f"<h3>{_e(key)} <span class=\"muted\">({_e(example.name)})</span></h3>" + "".join(figures))
    if failures:
        sections.append("<h2>Failures</h2><ul>" + "".join(f"<li>{_e(f)}</li>" for f in failures) + "</ul>")
    return html_page(title, sections)


def write_evaluation_report(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    targets: Sequence[Mapping[str, Any]] = (),
    examples: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    title: str = "crystal-locator evaluation",
    elapsed_s: float | None = None,
    failures: Sequence[str] = (),
) -> Path:
    """Write an evaluation report (tables, target checks, example images) to `path`, atomically."""
    text = evaluation_report_html(rows, targets=targets, examples=examples, config=config, title=title,
                                  elapsed_s=elapsed_s, failures=failures)
    try:
        return _write_report(Path(path), text)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write the report ({exc})") from exc
