"""Heat-map rendering: the fast palette PNG against a straightforward blend, the PNG writer, mark drawing."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from agent.locate.analysis import ClusterAnalysis, LocateSettings, analyse
from agent.locate.render import (
    _cluster_alpha_weights,
    _cluster_lut,
    _draw_ops,
    _encode_png_rows,
    _font,
    _legend_labels,
    display_uint8,
    heatmap_png,
    heatmap_rgb,
    mask_png,
)
from agent.locate.targets import Candidate, find_candidates
from tests.synthetic_images import make_grid_image


def _decode(png: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(png))
    picture.load()
    return picture


def _reference_blend(
    image: np.ndarray, analysis: ClusterAnalysis, crystal: tuple[int, ...], alpha: float = 0.45
) -> np.ndarray:
    """The heat map the obvious way: float blend of each pixel's cell colour (mask colour on the bar mask)
    over the display image, pixel by pixel over the cell grid, rounded."""
    gray = display_uint8(image).astype(np.float64)
    k = len(analysis.clusters)
    colours = _cluster_lut(k, crystal).astype(np.float64)
    weights = _cluster_alpha_weights(k, crystal, alpha) / 256.0
    out = np.empty((*image.shape, 3))
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            colour = (
                0
                if analysis.bar_mask[r, c]
                else analysis.label_grid[analysis.row_index_px[r], analysis.col_index_px[c]] + 1
            )
            out[r, c] = gray[r, c] * (1 - weights[colour]) + colours[colour] * weights[colour]
    return np.rint(out)


def _legend_rows(analysis: ClusterAnalysis) -> int:
    """Rows covered by the legend box (top left), left out of pixel comparisons."""
    scale = max(1, min(analysis.image_shape) // 512)
    return 13 * scale * (len(analysis.clusters) + 1) + 8 * scale


@pytest.fixture(scope="module")
def scene_analysis() -> tuple[np.ndarray, ClusterAnalysis]:
    scene = make_grid_image((150, 203), 3, n_crystals=4, bar_pitch_px=120, bar_width_px=25)
    return scene.image, analyse(scene.image, LocateSettings(mode="grid", grid_rows=12, grid_cols=15, k=3))


def test_palette_png_equals_the_straightforward_blend(scene_analysis: tuple[np.ndarray, ClusterAnalysis]) -> None:
    image, analysis = scene_analysis
    crystal = tuple(analysis.suggested_crystal_clusters)
    picture = _decode(heatmap_png(image, analysis, (), crystal))
    assert picture.format == "PNG" and picture.mode == "P" and picture.size == (203, 150)
    got = np.asarray(picture.convert("RGB")).astype(int)
    reference = _reference_blend(image, analysis, crystal)
    below_legend = slice(_legend_rows(analysis), None)
    assert np.abs(got[below_legend] - reference[below_legend]).max() <= 2
    # the fast path is no further from the reference than the RGB renderer
    rgb = heatmap_rgb(image, analysis, (), crystal).astype(int)
    assert np.abs(got[below_legend] - rgb[below_legend]).max() <= 2


def test_palette_png_of_a_float_image_with_marks(scene_analysis: tuple[np.ndarray, ClusterAnalysis]) -> None:
    image, analysis = scene_analysis
    as_float = image.astype(np.float32) / 7.0
    crystal = tuple(analysis.suggested_crystal_clusters)
    candidates = [*find_candidates(analysis, crystal), Candidate(-3.0, 201.5, 10.0, 0.5, 0)]  # one off the edge
    picture = _decode(heatmap_png(as_float, analysis, candidates, crystal))
    assert picture.size == (203, 150)
    got = np.asarray(picture.convert("RGB")).astype(int)
    reference = heatmap_rgb(as_float, analysis, candidates, crystal).astype(int)
    # the marks are where the RGB picture has them (its text is anti-aliased, the palette's is not) ...
    yellow_got, yellow_ref = (np.all(rgb == (255, 255, 0), axis=2) for rgb in (got, reference))
    assert yellow_ref.sum() > 20 and not (yellow_ref & ~yellow_got).any()
    # ... and away from marks and legend the pixels differ by the grey quantisation only
    away = np.ones(image.shape, dtype=bool)
    away[: _legend_rows(analysis)] = False
    for cand in candidates:
        r, c = round(cand.row_px), round(cand.col_px)
        away[max(0, r - 9) : r + 12, max(0, c - 9) : c + 30] = False
    assert away.mean() > 0.3
    assert np.abs(got - reference)[away].max() <= 2


def test_many_clusters_fall_back_to_the_exact_rgb_picture(scene_analysis: tuple[np.ndarray, ClusterAnalysis]) -> None:
    image, _ = scene_analysis
    analysis = analyse(image, LocateSettings(mode="grid", grid_rows=12, grid_cols=15, k=8))
    picture = _decode(heatmap_png(image, analysis))
    assert picture.mode == "RGB" and picture.size == (203, 150)
    assert np.array_equal(np.asarray(picture), heatmap_rgb(image, analysis))


def test_threads_do_not_change_the_bytes() -> None:
    scene = make_grid_image((1100, 1000), 5, n_crystals=6)  # over a megapixel: bands go to the thread pool
    analysis = analyse(scene.image, LocateSettings(mode="grid", grid_rows=11, grid_cols=10, k=3))
    one = heatmap_png(scene.image, analysis, workers=1)
    two = heatmap_png(scene.image, analysis, workers=2)
    assert one == two
    assert _decode(one).size == (1000, 1100)


@pytest.mark.parametrize("level", [0, 1, 6])
@pytest.mark.parametrize(("shape", "colour_type"), [((3, 5), 0), ((700, 1601), 0), ((257, 333, 3), 2)])
def test_png_writer_round_trips(shape: tuple[int, ...], colour_type: int, level: int) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2, : shape[1] // 3] = 17  # a flat area for the run-length strategy
    rows = np.zeros((shape[0], 1 + pixels[0].size), dtype=np.uint8)
    rows[:, 1:] = pixels.reshape(shape[0], -1)
    png = _encode_png_rows(rows, shape[1], colour_type, None, level, workers=2)
    assert np.array_equal(np.asarray(_decode(png)), pixels)
    if level == 0:
        assert len(png) > rows.size


def test_png_writer_palette_and_zlib_stream() -> None:
    indices = (np.arange(40 * 30).reshape(30, 40) % 7).astype(np.uint8)
    palette = np.array([[i * 30, 255 - i * 30, 7] for i in range(7)], dtype=np.uint8)
    rows = np.zeros((30, 41), dtype=np.uint8)
    rows[:, 1:] = indices
    png = _encode_png_rows(rows, 40, 3, palette)
    picture = _decode(png)
    assert picture.mode == "P" and np.array_equal(np.asarray(picture), indices)
    assert np.array_equal(np.asarray(picture.convert("RGB")), palette[indices])
    # the IDAT payloads form one valid zlib stream (checksum included) of the filtered rows
    payload, at = b"", 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        if png[at + 4 : at + 8] == b"IDAT":
            payload += png[at + 8 : at + 8 + length]
        at += 12 + length
    assert zlib.decompress(payload) == rows.tobytes()


@pytest.mark.parametrize("mode", ["P", "RGB"])
def test_marks_drawn_on_crops_equal_marks_drawn_on_the_whole_picture(mode: str) -> None:
    rng = np.random.default_rng(2)
    shape = (90, 130) if mode == "P" else (90, 130, 3)
    target = rng.integers(0, 250, shape, dtype=np.uint8)
    ink = 253 if mode == "P" else (255, 255, 0)
    font = _font(10)
    ops_list = [
        [
            ("ellipse", (c - 6, r - 6, c + 6, r + 6), {"outline": ink, "width": 2}),
            ("text", (c + 7, r - 6), {"text": "12", "fill": ink, "font": font}),
        ]
        for r, c in [(40.3, 50.7), (-2.0, 3.5), (88.6, 127.2), (45.0, 125.0), (200.0, 50.0)]
    ]
    ops_list.append([("rectangle", (0, 0, 60, 30), {"fill": 0 if mode == "P" else (0, 0, 0)})])
    whole = Image.frombytes(mode, (130, 90), target.tobytes())
    draw = ImageDraw.Draw(whole)
    for ops in ops_list:
        for method, xy, kwargs in ops:
            getattr(draw, method)(xy, **kwargs)
        _draw_ops(target, ops)
    assert np.array_equal(target, np.asarray(whole))


def test_legend_tags_crystal_and_mixed_clusters_and_the_picture_shows_the_difference(
    scene_analysis: tuple[np.ndarray, ClusterAnalysis],
) -> None:
    image, analysis = scene_analysis
    crystal, mixed = analysis.clusters[1].cluster_id, analysis.clusters[2].cluster_id
    lines = _legend_labels(analysis, [crystal], [mixed])
    assert lines[0] == "bar / black" and len(lines) == len(analysis.clusters) + 1
    assert lines[crystal + 1].endswith("% crystal") and lines[mixed + 1].endswith("% mixed")
    assert sum(line.endswith(("crystal", "mixed")) for line in lines) == 2
    tagged = heatmap_rgb(image, analysis, crystal_clusters=[crystal], mixed_clusters=[mixed])
    plain = heatmap_rgb(image, analysis, crystal_clusters=[crystal])
    legend_rows = slice(0, _legend_rows(analysis))
    assert not np.array_equal(tagged[legend_rows], plain[legend_rows])  # the tag is drawn
    assert np.array_equal(tagged[_legend_rows(analysis) :], plain[_legend_rows(analysis) :])  # colours unchanged


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (257, 1031)])
def test_mask_png_decodes_to_the_mask(shape: tuple[int, int]) -> None:
    """bar_mask.png: 255 on the mask, 0 elsewhere, whatever the size (bands of rows, threads)."""
    rng = np.random.default_rng(3)
    mask = rng.random(shape) < 0.3
    mask[: shape[0] // 2, : shape[1] // 3] = True
    decoded = np.asarray(Image.open(io.BytesIO(mask_png(mask, workers=2))))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.where(mask, 255, 0).astype(np.uint8))
