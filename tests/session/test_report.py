"""HTML reports: a session report from a session folder (written here by hand, small images) and an
evaluation report; parsed with html.parser everywhere, and loaded in headless Chromium where present."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.cli import main
from agent.evaluation.runner import Example
from agent.evaluation.scoring import Detection
from agent.evaluation.truth import ImageTruth, PixelCrystal
from agent.report import ReportError, state_timings, write_evaluation_report, write_session_report
from drivers.base import Frame, FrameMetadata, StagePosition
from drivers.formats.images import encode_png, write_frame_tiff

TARGET_IDS = ("T001", "T002", "T003")


class _Collector(HTMLParser):
    """Tables (id -> body row count), images (src), links and headings of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, int] = {}
        self.images: list[str] = []
        self.urls: list[str] = []
        self.headings: list[str] = []
        self._table: str | None = None
        self._in_body = False
        self._heading = False
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)
        if tag == "table":
            self._table = values.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = 0
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table] += 1
        elif tag == "img":
            self.images.append(values.get("src") or "")
        elif tag in ("h1", "h2", "h3"):
            self._heading = True
        for key in ("href", "src"):
            if key in values and tag != "img":
                self.urls.append(values[key] or "")

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None
        elif tag in ("h1", "h2", "h3"):
            self._heading = False

    def handle_data(self, data: str) -> None:
        if self._heading and data.strip():
            self.headings.append(data.strip())


def _parse(path: Path) -> _Collector:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    collector = _Collector()
    collector.feed(text)
    collector.close()
    assert collector.stack == [], f"unclosed tags: {collector.stack}"
    return collector


def _decode_png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image


def _rgb(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(rows, cols, 3), dtype=np.uint8)


def make_session(folder: Path, *, complete: bool = True) -> Path:
    """A small screening-session folder in the layout agent.screening / agent.session.outputs write."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"session": folder.name, "state": "done" if complete else "moving", "specimen": "protein-plates",
               "targets_found": 3, "targets_visited": 3, "targets_confirmed": 2, "targets_recorded": 1, "prompts": 1,
               "microscope_time_s": 95.5, "time_per_confirmed_s": 47.75, "confirmed_per_hour": 75.4,
               "precision": 0.667, "recall": 0.5, "recall_diffracting": 0.5, "faults": 1, "wall_time_s": 12.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "plan.json").write_text(json.dumps({"name": "screening", "seed": 0, "note": "<b>not markup</b>"}))
    (folder / "source.json").write_text(json.dumps({"kind": "simulated", "specimen": "protein-plates", "seed": 0}))
    (folder / "calibration.json").write_text(json.dumps({"instrument": "sim", "presets": {
        "atlas": {"preset": "atlas", "matrix_um_per_px": [[0.3, 0.01], [-0.01, 0.3]]},
        "search": {"preset": "search", "matrix_um_per_px": [[0.04, 0.0], [0.0, 0.04]]}}}))
    states = ["calibrating", "mapping", "locating", "labelling", "targeting", "moving", "zooming", "confirming",
              "moving", "zooming", "confirming", "done"]
    lines = [json.dumps({"seq": i + 1, "type": "transition", "state": s, "microscope_time_s": 8.0 * i,
                         "time_utc": f"2026-01-01T00:00:{i:02d}+00:00"}) for i, s in enumerate(states)]
    lines.insert(5, json.dumps({"seq": 99, "type": "fault", "state": "moving", "error": "StageMoveError: stuck",
                                "microscope_time_s": 40.0}))
    lines.append('{"seq": 100, "type": "transi')  # torn last line after a crash
    (folder / "journal.jsonl").write_text("\n".join(lines))
    frame = Frame(image=np.random.default_rng(0).integers(100, 4000, size=(64, 80), dtype=np.uint16),
                  metadata=FrameMetadata(preset="overview", magnification=9.0, pixel_size_um=1.6,
                                         stage=StagePosition(x_um=0.0, y_um=0.0), exposure_s=0.5, time_s=1.0))
    write_frame_tiff(folder / "overview.tif", frame)
    atlas = folder / "atlas"
    atlas.mkdir(exist_ok=True)
    write_frame_tiff(atlas / "atlas.tif", frame)
    (atlas / "heatmap.png").write_bytes(encode_png(_rgb(120, 160, 1)))
    stripes = (np.arange(120 * 160).reshape(120, 160) % 2 * 255).astype(np.uint8)
    (atlas / "bar_mask.png").write_bytes(encode_png(stripes))
    (atlas / "gallery.png").write_bytes(encode_png(_rgb(60, 200, 2)))
    (atlas / "clusters.json").write_text(json.dumps({"suggestion_rule": "small textured cluster", "clusters": [
        {"cluster_id": 0, "n_cells": 900, "fraction": 0.9, "crystal": False, "label_source": None},
        {"cluster_id": 1, "n_cells": 60, "fraction": 0.06, "crystal": True, "label_source": "default-rule"},
        {"cluster_id": 2, "n_cells": 40, "fraction": 0.04, "crystal": False, "label_source": None}]}))
    outcomes = ("recorded", "no-diffraction", "rejected")
    rows = [{"target_id": t, "order": i, "outcome": o, "x_um": 10.0 * i, "y_um": -5.0 * i, "score": 0.9 - 0.1 * i,
             "cluster_id": 1, "area_px": 30.0, "recentre_offset_um": 0.4, "n_spots": 12 - 4 * i,
             "signal_to_background": 3.0, "reason": ""}
            for i, (t, o) in enumerate(zip(TARGET_IDS, outcomes, strict=True))]
    (folder / "targets.json").write_text(json.dumps({"targets": rows}))
    (folder / "targets.nav").write_text("AdocVersion = 2.00\n")
    targets = folder / "targets"
    targets.mkdir(exist_ok=True)
    for i, tid in enumerate(TARGET_IDS[:2]):
        (targets / f"{tid}_thumb.png").write_bytes(encode_png(_rgb(48, 48, 10 + i)))
        (targets / f"{tid}_diffraction.png").write_bytes(encode_png(_rgb(48, 48, 20 + i)))
    # corrupt: left out with a log line, never a broken picture
    (targets / "T003_thumb.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return folder


def test_session_report_is_complete_and_self_contained(tmp_path: Path) -> None:
    folder = make_session(tmp_path / "session-1")
    path = write_session_report(folder)
    assert path == folder / "report.html"
    page = _parse(path)
    # overview, heat map, bar mask, gallery + 2 x (thumb + diffraction); the corrupt thumbnail is left out
    assert len(page.images) == 8
    sizes = [_decode_png(src).size for src in page.images]
    assert all(w > 0 and h > 0 for w, h in sizes)
    assert page.tables["summary"] >= 14
    assert page.tables["targets"] == 3
    assert page.tables["clusters"] == 3
    assert page.tables["calibration"] == 2
    assert page.tables["faults"] == 1
    timing_states = {t["state"] for t in state_timings([json.loads(x) for x in (folder / "journal.jsonl")
                                                         .read_text().splitlines()[:-1]])}
    assert page.tables["timings"] == len(timing_states)
    assert not [u for u in page.urls if u.startswith(("http:", "https:", "//"))]
    text = path.read_text()
    assert "<b>not markup</b>" not in text and "&lt;b&gt;not markup&lt;/b&gt;" in text
    assert {"Summary", "Atlas", "Timings"} <= set(page.headings)


def test_state_timings_sum_microscope_time() -> None:
    entries = [{"type": "transition", "state": s, "microscope_time_s": t}
               for s, t in (("mapping", 0.0), ("moving", 10.0), ("zooming", 12.0), ("moving", 20.0), ("done", 25.0))]
    timings = {t["state"]: t for t in state_timings(entries)}
    assert timings["moving"]["microscope_s"] == pytest.approx(2.0 + 5.0)
    assert timings["moving"]["visits"] == 2
    assert timings["mapping"]["microscope_s"] == 10.0
    assert timings["done"]["visits"] == 1


def test_partial_session_report_says_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "crashed"
    folder.mkdir()
    (folder / "journal.jsonl").write_text('{"seq": 1, "type": "transition", "state": "calibrating"}\n{"seq')
    page = _parse(write_session_report(folder))
    assert page.images == []
    text = (folder / "report.html").read_text()
    assert "summary.json is missing" in text and "heatmap.png not written yet" in text


def test_report_errors_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match="no such session folder"):
        write_session_report(tmp_path / "nope")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such session folder" in capsys.readouterr().err
    folder = make_session(tmp_path / "s")
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.html").is_file()
    other = tmp_path / "elsewhere.html"
    assert main(["report", str(folder), "--out", str(other)]) == 0
    assert _parse(other).tables["targets"] == 3


def _evaluation_report(path: Path) -> Path:
    image = np.random.default_rng(3).integers(0, 60000, size=(96, 128)).astype(np.uint16)
    truth = ImageTruth(shape_px=(96, 128), crystals=(
        PixelCrystal(0, 20, 30, 20, 25, 20, 35, 3.0), PixelCrystal(1, 60, 100, 60, 100, 60, 100, 4.0, countable=False)),
        um_per_px=0.3)
    example = Example(image=image, truth=truth, name="protein-plates/seed0/atlas/0",
                      detections={"kmeans-k3 (grid)": (Detection(20, 31),), "threshold-cc (image)": ()})
    rows = [{"specimen": "protein-plates", "preset": "atlas", "method": m, "mode": "grid", "precision": 0.5,
             "recall": None, "recall_diffracting": 1.0, "loc_error_um": 1.2, "bar_iou": 0.9, "n_images": 1,
             "n_crystals": 1, "n_detections": 2, "seconds_per_image": 0.1,
             "recall_by_size": {"<3um": None, "3-6um": 1.0}} for m in ("kmeans-k3", "threshold-cc")]
    targets = [{"specimen": "protein-plates", "role": "default", "method": "kmeans-k3", "mode": "grid",
                "precision": 0.5, "recall": None, "precision_goal": 0.9, "recall_goal": 0.95, "met": False}]
    return write_evaluation_report(rows, path, targets=targets, examples={"protein-plates / atlas": example},
                                   config={"seeds": 1, "specimens": ["protein-plates"]}, elapsed_s=3.2,
                                   failures=["log-blob/image on x: RuntimeError: <boom>"])


def test_evaluation_report_tables_and_images(tmp_path: Path) -> None:
    page = _parse(_evaluation_report(tmp_path / "eval.html"))
    assert page.tables["results"] == 2 and page.tables["targets"] == 1 and page.tables["recall-by-size"] == 2
    assert page.tables["config"] == 2
    assert len(page.images) == 2
    overlay = _decode_png(page.images[0]).convert("RGB")
    pixels = np.asarray(overlay)
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 50)).any()  # a red detection mark is drawn
    assert "&lt;boom&gt;" in (tmp_path / "eval.html").read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.browser
def test_reports_render_in_headless_chromium(tmp_path: Path) -> None:
    executable = _chromium()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    session_report = write_session_report(make_session(tmp_path / "session-2"))
    evaluation_report = _evaluation_report(tmp_path / "eval.html")
    expected = {
        session_report: ({"summary": None, "targets": 3, "clusters": 3, "calibration": 2}, 8),
        evaluation_report: ({"results": 2, "targets": 1, "recall-by-size": 2}, 2),
    }
    try:
        playwright = sync_api.sync_playwright().start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"playwright cannot start: {exc}")
    try:
        browser = playwright.chromium.launch(
            executable_path=executable, timeout=30_000,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )
        try:
            page = browser.new_page()
            requests: list[str] = []

            def block(route) -> None:  # type: ignore[no-untyped-def]
                url = route.request.url
                if url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    requests.append(url)
                    route.abort()

            page.route("**/*", block)
            for path, (tables, n_images) in expected.items():
                page.goto(path.as_uri(), wait_until="load", timeout=30_000)
                state = page.evaluate("""() => ({
                    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
                    tables: Object.fromEntries(Array.from(document.querySelectorAll('table[id]')).map(
                        t => [t.id, t.tBodies[0] ? t.tBodies[0].rows.length : 0])),
                    title: document.title,
                })""")
                assert len(state["images"]) == n_images
                assert all(complete and w > 0 and h > 0 for complete, w, h in state["images"]), state["images"]
                for table_id, rows in tables.items():
                    assert table_id in state["tables"]
                    if rows is not None:
                        assert state["tables"][table_id] == rows, (table_id, state["tables"])
                assert state["title"]
            assert requests == []  # nothing fetched from a network
        finally:
            browser.close()
    finally:
        playwright.stop()
