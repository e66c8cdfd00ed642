"""Faster paths of the locator equal the plain computations they replace, value for value."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.locate.analysis import ClusterAnalysis, LocateSettings, analyse
from agent.locate.cluster import _upsample_mask
from agent.locate.render import HeatmapDraft, heatmap_png, heatmap_rgb
from agent.locate.targets import Candidate
from tests.synthetic_images import make_grid_image


@pytest.mark.parametrize(
    ("small_shape", "factor", "shape"),
    [((8, 6), 4, (32, 24)), ((8, 6), 4, (35, 27)), ((5, 7), 3, (15, 23)), ((3, 3), 1, (3, 5)), ((1, 4), 5, (9, 20))],
)
def test_upsample_mask_gives_each_pixel_its_block(
    small_shape: tuple[int, int], factor: int, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(factor)
    small = rng.random(small_shape) < 0.4
    rows = np.minimum(np.arange(shape[0]) // factor, small_shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // factor, small_shape[1] - 1)
    up = _upsample_mask(small, factor, shape)
    assert up.shape == shape and up.dtype == np.bool_
    assert np.array_equal(up, small[rows][:, cols])


@pytest.mark.parametrize("threaded", [False, True])
def test_gaussian_rows_on_threads_equal_the_whole_image_bit_for_bit(
    threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy import ndimage

    from agent.locate import smoothing

    monkeypatch.setattr(smoothing, "PARALLEL_MIN_PX", 0 if threaded else 1 << 62)
    rng = np.random.default_rng(5)
    image = rng.normal(1000.0, 50.0, (301, 190)) * rng.uniform(0.5, 2.0, (301, 190))
    whole = ndimage.gaussian_filter(image, 1.0)
    bands = [smoothing.gaussian_rows(image, top, bottom, 1.0) for top, bottom in ((0, 150), (150, 151), (151, 301))]
    assert np.array_equal(np.concatenate(bands), whole)


def _marks(n: int, shape: tuple[int, int]) -> list[Candidate]:
    rng = np.random.default_rng(n)
    rows, cols = rng.uniform(0, shape[0], n), rng.uniform(0, shape[1], n)
    return [
        Candidate(row_px=float(r), col_px=float(c), area_px=9.0, score=0.5, cluster_id=0)
        for r, c in zip(rows, cols, strict=True)
    ]


@pytest.mark.parametrize("k", [3, 8])  # 8: too many clusters for the palette, the RGB picture is encoded
def test_heatmap_draft_made_before_the_candidates_gives_the_same_png(k: int) -> None:
    scene = make_grid_image((260, 300), 2, n_crystals=5)
    analysis = analyse(scene.image, LocateSettings(mode="grid", grid_rows=13, grid_cols=15, k=k))
    crystal = analysis.suggested_crystal_clusters
    candidates = _marks(12, scene.image.shape)
    draft = HeatmapDraft.make(scene.image, analysis, crystal)
    before = draft.rows.copy()
    first = draft.png(candidates)
    assert first == heatmap_png(scene.image, analysis, candidates, crystal)
    assert np.array_equal(draft.rows, before)  # the marks went into a copy: the draft can make another PNG
    assert draft.png(()) == heatmap_png(scene.image, analysis, (), crystal) != first
    if k == 8:  # the RGB path is exact: the marks are where heatmap_rgb draws them
        picture = Image.open(io.BytesIO(first))
        assert picture.mode == "RGB"
        assert np.array_equal(np.asarray(picture), heatmap_rgb(scene.image, analysis, candidates, crystal))


@pytest.mark.parametrize(("window_px", "stride_px"), [(15, 4), (3, 1), (9, 9), (31, 2), (5, 7)])
def test_sliding_extremes_equal_the_clipped_windows(window_px: int, stride_px: int) -> None:
    from agent.locate.features import _sliding_extreme

    rng = np.random.default_rng(window_px * stride_px)
    raw = rng.normal(size=(40, 37))
    half = window_px // 2
    local_rows = np.arange(1, 40, stride_px)
    centres_c = np.arange(0, 37, stride_px)
    for op, reduce in ((np.minimum, np.min), (np.maximum, np.max)):
        expected = np.array(
            [
                [reduce(raw[max(r - half, 0) : r + half + 1, max(c - half, 0) : c + half + 1]) for c in centres_c]
                for r in local_rows
            ]
        )
        assert np.array_equal(_sliding_extreme(raw, window_px, op, centres_c, local_rows), expected)


def test_cluster_labels_and_distances_from_threads_equal_one_chunk_after_another() -> None:
    from agent.locate.cluster import fit_clusters

    rng = np.random.default_rng(11)
    features = np.concatenate([rng.normal(m, 1.0, (3000, 9)) for m in (0.0, 3.0, 6.0)])
    features[::97] *= 40.0  # outliers, capped
    model = fit_clusters(features, 3, seed=0, sample_size=2000)
    chunk = 257  # many chunks of the same size as the sequential loop uses
    assert model.clip_low is not None
    labels, distances = np.empty(len(features), dtype=np.int32), np.empty(len(features))
    projection = (model.components / model.scale_std[None, :]).T
    offset = (model.scale_mean / model.scale_std) @ model.components.T
    weights = (projection @ model.centroids_pca.T).astype(np.float32)
    bias = (np.sum(model.centroids_pca**2, axis=1) + 2.0 * (offset @ model.centroids_pca.T)).astype(np.float32)
    centre = (offset + model.centroids_pca[1]).astype(np.float32)[None, :]
    for start, block in model._blocks(features, chunk):
        labels[start : start + len(block)] = np.argmin(bias[None, :] - 2.0 * (block @ weights), axis=1)
        z = block @ projection.astype(np.float32) - centre
        distances[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", z, z))
    assert np.array_equal(model.predict(features, chunk=chunk), labels)
    assert np.array_equal(model.distance_to(features, 1, chunk=chunk), distances)
    assert len(np.unique(labels)) == 3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize(
    ("shape", "max_side_px"), [((400, 333), 100), ((97, 130), 40), ((64, 64), 64), ((50, 3000), 256)]
)
def test_block_mean_of_small_integers_equals_preprocess_block_mean(
    dtype: type, shape: tuple[int, int], max_side_px: int
) -> None:
    from agent.locate.cluster import _block_mean
    from agent.locate.preprocess import block_mean

    rng = np.random.default_rng(shape[0])
    top = np.iinfo(dtype).max
    image = rng.integers(0, top + 1, shape).astype(dtype)
    image[:8, :8] = top  # a block at the type's maximum: the uint32 row sums must not overflow
    small, factor = _block_mean(image, max_side_px)
    assert factor == max(1, -(-max(shape) // max_side_px))
    expected = block_mean(image, factor)
    assert small.dtype == np.float64 and small.shape == expected.shape
    assert np.array_equal(small, expected)


_DRAFTS_IMPORT_PROBE = """
import sys
from agent.commands.locate import _load_picture_modules, _make_drafts
from agent.locate.analysis import ClusterAnalysis, LocateSettings, analyse
from tests.synthetic_images import make_grid_image
scene = make_grid_image((200, 220), 1, n_crystals=3)
analysis = analyse(scene.image, LocateSettings(mode="grid", grid_rows=10, grid_cols=11, k=3))
_load_picture_modules()
before = set(sys.modules)
drafts = _make_drafts(scene.image, analysis, analysis.suggested_crystal_clusters)
drafts.heatmap.png(())
print(len(drafts.gallery_png) > 0, len(drafts.mask_png) > 0, sorted(set(sys.modules) - before))
"""


def test_the_drafting_thread_imports_nothing_after_load_picture_modules() -> None:
    """`locate` drafts its pictures on a second thread while the main one imports the object search: the
    drafting must not import (in a fresh interpreter, where nothing is loaded yet)."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _DRAFTS_IMPORT_PROBE], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True True []"


def _gallery_from_the_whole_display(image: np.ndarray, analysis: ClusterAnalysis) -> np.ndarray:
    """The gallery as it was made before: the whole image stretched (`display_uint8`), edge-padded, cropped."""
    from PIL import ImageDraw

    from agent.locate.render import _cluster_lut, display_uint8

    gray, k = display_uint8(image), len(analysis.clusters)
    lut = _cluster_lut(k, analysis.suggested_crystal_clusters)
    canvas = np.full((max(1, k) * 66 + 2, 18 + 8 * 66 + 2, 3), 24, dtype=np.uint8)
    if analysis.settings.mode == "grid":
        crop_px = int(max(image.shape[0] / analysis.grid_shape[0], image.shape[1] / analysis.grid_shape[1]))
    else:
        crop_px = analysis.settings.window_px
    crop_px = max(crop_px, 8)
    padded = np.pad(gray, crop_px // 2, mode="edge")
    sample_idx = np.linspace(0, crop_px - 1, 64).round().astype(np.intp)
    for row, summary in enumerate(analysis.clusters):
        y0 = 2 + row * 66
        canvas[y0 : y0 + 64, 2:16] = lut[summary.cluster_id + 1]
        for j, (r, c) in enumerate(summary.example_cells_px[:8]):
            crop = padded[r : r + crop_px, c : c + crop_px]
            if crop.shape == (crop_px, crop_px):
                canvas[y0 : y0 + 64, 20 + j * 66 : 84 + j * 66] = crop[sample_idx][:, sample_idx][..., None]
    picture = Image.fromarray(canvas)
    for row, summary in enumerate(analysis.clusters):
        ImageDraw.Draw(picture).text((3, 4 + row * 66), str(summary.cluster_id), fill=(255, 255, 255))
    return np.asarray(picture)


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float32"])
@pytest.mark.parametrize("mode", ["grid", "window"])
def test_gallery_equals_crops_of_the_whole_display(dtype: str, mode: str) -> None:
    from agent.locate.render import cluster_gallery_rgb

    scene = make_grid_image((230, 260), 4, n_crystals=6, bit_depth=8 if dtype == "uint8" else 16)
    image = scene.image.astype(np.float32) * 0.3 if dtype == "float32" else scene.image
    settings = LocateSettings(mode="grid", grid_rows=9, grid_cols=10, k=3)
    if mode == "window":
        settings = LocateSettings(mode="window", window_px=15, stride_px=6, k=3)
    analysis = analyse(image, settings)
    cells = [cell for summary in analysis.clusters for cell in summary.example_cells_px[:8]]
    assert any(min(r, c) < 8 or r > 222 or c > 252 for r, c in cells) or mode == "grid"  # edges padded
    assert np.array_equal(cluster_gallery_rgb(image, analysis), _gallery_from_the_whole_display(image, analysis))


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (2, 64), (5, 17), (37, 53), (64, 128), (130, 65), (300, 257)])
@pytest.mark.parametrize("erode", [True, False])
def test_packed_cross_steps_equal_binary_erosion_and_dilation(shape: tuple[int, int], erode: bool) -> None:
    from scipy import ndimage

    from agent.locate.bitmask import packed_cross_steps

    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for density in (0.1, 0.5, 0.9):
        mask = rng.random(shape) < density
        mask[: shape[0] // 3, : shape[1] // 2] = erode  # a solid block, so erosions keep something
        for iterations in (1, 2, 4):
            plain = (ndimage.binary_erosion if erode else ndimage.binary_dilation)(mask, iterations=iterations)
            packed = packed_cross_steps(mask, iterations, erode)
            assert packed.dtype == np.bool_ and packed.shape == mask.shape
            assert np.array_equal(packed, plain), (density, iterations)


def test_cross_steps_on_packed_bits_above_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.locate import objects

    rng = np.random.default_rng(3)
    mask = rng.random((97, 203)) < 0.7
    plain = {(n, e): objects.cross_steps(mask, n, e) for n in (1, 4) for e in (True, False)}
    monkeypatch.setattr(objects, "PACKED_MIN_PX", 0)
    for (n, e), expected in plain.items():
        assert np.array_equal(objects.cross_steps(mask, n, e), expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (3, 64), (5, 17), (37, 53), (130, 65), (300, 257)])
@pytest.mark.parametrize("size_px", [1, 3, 5, 9, 65])
def test_packed_square_dilation_equals_the_maximum_filter(shape: tuple[int, int], size_px: int) -> None:
    from scipy import ndimage

    from agent.locate.bitmask import packed_square_dilation
    from agent.locate.preprocess import grow_mask

    rng = np.random.default_rng(shape[0] + 7 * shape[1] + size_px)
    for density in (0.002, 0.05, 0.5):
        mask = rng.random(shape) < density
        expected = ndimage.maximum_filter(mask, size_px, mode="constant", cval=False) > 0
        assert np.array_equal(packed_square_dilation(mask, size_px), expected), density
        assert np.array_equal(grow_mask(mask, size_px), expected), density


@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (5, 17), (37, 53), (64, 128), (130, 65)])
@pytest.mark.parametrize("factor", [2, 3, 4, 5, 8])
def test_block_any_equals_the_padded_reshape(shape: tuple[int, int], factor: int) -> None:
    from agent.locate.bitmask import block_any

    rng = np.random.default_rng(shape[0] * factor + shape[1])
    for density in (0.01, 0.2):
        mask = rng.random(shape) < density
        rows, cols = -(-shape[0] // factor) * factor, -(-shape[1] // factor) * factor
        padded = np.zeros((rows, cols), dtype=bool)
        padded[: shape[0], : shape[1]] = mask
        expected = padded.reshape(rows // factor, factor, cols // factor, factor).any(axis=(1, 3))
        assert np.array_equal(block_any(mask, factor), expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (37, 53), (200, 130)])
def test_distance_to_true_equals_the_distance_transform(shape: tuple[int, int]) -> None:
    from scipy import ndimage

    from agent.locate.bitmask import distance_to_true_px

    rng = np.random.default_rng(shape[0] + shape[1])
    for density in (0.0005, 0.01, 0.3, 1.0):
        mask = rng.random(shape) < density
        mask.flat[rng.integers(mask.size)] = True
        if shape[0] > 20:
            mask[5:15, 3:9] = True  # a block, with inner pixels
        rows, cols = rng.integers(0, shape[0], 300), rng.integers(0, shape[1], 300)
        expected = ndimage.distance_transform_edt(~mask)[rows, cols]
        assert np.array_equal(distance_to_true_px(mask, rows, cols), expected), density


@pytest.mark.parametrize(
    ("shape", "small_shape", "factor"),
    [((64, 64), (4, 4), 16), ((300, 130), (18, 8), 16), ((97, 203), (24, 50), 4), ((7, 5), (7, 5), 1)],
)
def test_divide_by_upsampled_equals_dividing_by_the_indexed_background(
    shape: tuple[int, int], small_shape: tuple[int, int], factor: int
) -> None:
    from agent.locate.preprocess import _divide_by_upsampled, _interpolation_weights

    rng = np.random.default_rng(shape[0])
    data = rng.uniform(100.0, 5000.0, shape)
    background = rng.uniform(500.0, 1500.0, small_shape)
    row_low, row_high, row_frac = _interpolation_weights(shape[0], small_shape[0], factor)
    col_low, col_high, col_frac = _interpolation_weights(shape[1], small_shape[1], factor)
    tall = background[row_low] * (1 - row_frac)[:, None] + background[row_high] * row_frac[:, None]
    full = tall[:, col_low] * (1 - col_frac)
    full += tall[:, col_high] * col_frac
    expected = data / full
    expected *= 1234.5
    _divide_by_upsampled(data, background, factor, 1234.5)
    assert np.array_equal(data, expected)


def _remove_outlier_pixels_padding_each_band(data: np.ndarray, sigma: float, threshold: float = 8.0) -> int:
    """`preprocess.remove_outlier_pixels` as it was: every band padded by `np.pad` into fresh temporaries."""
    count, rows, band, limit = 0, data.shape[0], 64, threshold * sigma
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        top, bottom = max(0, r0 - 1), min(rows, r1 + 1)
        block = np.pad(data[top:bottom], ((r0 - top == 0, bottom - r1 == 0), (1, 1)), mode="reflect")
        h_max = np.maximum(np.maximum(block[:, :-2], block[:, 1:-1]), block[:, 2:])
        h_min = np.minimum(np.minimum(block[:, :-2], block[:, 1:-1]), block[:, 2:])
        n_max = np.maximum(np.maximum(h_max[:-2], h_max[2:]), np.maximum(block[1:-1, :-2], block[1:-1, 2:]))
        n_min = np.minimum(np.minimum(h_min[:-2], h_min[2:]), np.minimum(block[1:-1, :-2], block[1:-1, 2:]))
        centre = data[r0:r1]
        outliers = (centre > n_max + limit) | (centre < n_min - limit)
        if outliers.any():
            centre[outliers] = 0.5 * (n_max[outliers] + n_min[outliers])
            count += int(outliers.sum())
    return count


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 2), (64, 30), (65, 33), (130, 200), (129, 3)])
def test_remove_outlier_pixels_equals_padding_each_band(shape: tuple[int, int]) -> None:
    from agent.locate.preprocess import remove_outlier_pixels

    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    data = rng.normal(1000.0, 10.0, shape)
    spots = rng.random(shape) < 0.02
    data[spots] = rng.choice([0.0, 5000.0], int(spots.sum()))
    data[:, :1] += 300.0  # a hot first column: the mirrored column sees it
    expected = data.copy()
    n_expected = _remove_outlier_pixels_padding_each_band(expected, 10.0)
    assert remove_outlier_pixels(data, 10.0) == n_expected
    assert np.array_equal(data, expected)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32"])
def test_seam_block_steps_of_integer_images_need_no_sorting(dtype: str) -> None:
    from agent.locate.seams import _block_steps

    rng = np.random.default_rng(len(dtype))
    info = np.iinfo(dtype)
    image = rng.integers(max(info.min, -50), info.max, (96, 150), endpoint=True).astype(dtype)
    image[:, 70:] = (image[:, 70:] // 2).astype(dtype)  # a step
    image[10:30, 20:40] = rng.integers(0, 4, (20, 20)).astype(dtype)  # dark, low levels (logs 0 and ln 2)
    mask = rng.random(image.shape) < 0.3
    mask[40:, :5] = True  # blocks without pairs
    log = np.log(np.maximum(image.astype(np.float32), 1.0))
    sorted_steps = _block_steps(log, mask, 12, 8, any_order=False)
    assert np.isfinite(sorted_steps).sum() > 100
    assert np.array_equal(_block_steps(log, mask, 12, 8, any_order=True), sorted_steps, equal_nan=True)


@pytest.mark.parametrize("shape", [(2, 2), (2, 7), (9, 2), (3, 3), (17, 40), (64, 33)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradient_2d_equals_np_gradient(shape: tuple[int, int], dtype: str) -> None:
    from agent.locate.object_features import gradient_2d

    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    values = (rng.normal(0.0, 1000.0, shape) * rng.uniform(0.0, 3.0, shape)).astype(dtype)
    for view in (values, values[:, ::-1], values.T):
        expected = np.gradient(view)
        got = gradient_2d(view)
        assert all(g.dtype == e.dtype and np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_fill_holes_equals_binary_fill_holes() -> None:
    from scipy import ndimage

    from agent.locate.object_features import fill_holes

    rng = np.random.default_rng(11)
    for shape in ((1, 1), (3, 3), (20, 31), (64, 64)):
        for density in (0.3, 0.6, 0.85):
            mask = rng.random(shape) < density
            assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def _turning_concentration_with_numpy_helpers(outline_rc: np.ndarray, chord_px: float) -> float:
    """`objects.outline_turning_concentration` as it was written (linspace, roll, column_stack)."""
    steps = np.hypot(*np.diff(outline_rc, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    length = float(arc[-1])
    if length < 20.0:
        return float("nan")
    n = int(length / 0.5)
    t = np.linspace(0.0, length, n, endpoint=False)
    points = np.column_stack([np.interp(t, arc, outline_rc[:, 0]), np.interp(t, arc, outline_rc[:, 1])])
    k = max(1, round(chord_px / 0.5))
    ahead = np.roll(points, -k, axis=0) - points
    behind = points - np.roll(points, k, axis=0)
    turn = np.arctan2(ahead[:, 0], ahead[:, 1]) - np.arctan2(behind[:, 0], behind[:, 1])
    turn = np.abs((turn + np.pi) % (2.0 * np.pi) - np.pi)
    total = float(turn.sum())
    if total <= 0:
        return float("nan")
    return float(np.sort(turn)[::-1][: max(1, int(n * 0.25))].sum() / total)


def test_outline_turning_concentration_equals_the_numpy_helpers_version() -> None:
    from agent.locate.objects import outline_turning_concentration

    rng = np.random.default_rng(21)
    for _ in range(200):
        m = int(rng.integers(3, 400))
        angles = np.sort(rng.uniform(0.0, 2 * np.pi, m))
        radius = rng.uniform(2.0, 40.0) * (1 + 0.2 * rng.random(m))
        outline = np.column_stack([radius * np.sin(angles), radius * np.cos(angles)])
        outline = np.vstack([outline, outline[:1]])
        for chord in (2.0, 3.7):
            expected = _turning_concentration_with_numpy_helpers(outline, chord)
            got = outline_turning_concentration(outline, chord_px=chord)
            assert got == expected or (np.isnan(got) and np.isnan(expected))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
def test_noise_sigma_of_small_integers_equals_the_float_computation(dtype: str) -> None:
    from agent.locate.preprocess import noise_sigma

    rng = np.random.default_rng(len(dtype))
    info = np.iinfo(dtype)
    for shape in ((1, 2), (3, 4), (300, 257), (1100, 65)):
        image = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        mask = rng.random(shape) < 0.3
        for masked in (None, mask):
            step = max(1, shape[0] // 512)
            diffs = np.abs(np.diff(image[::step].astype(np.float64), axis=1))
            if masked is not None:
                diffs = diffs[~(masked[::step, 1:] | masked[::step, :-1])]
            expected = float(1.4826 * np.median(diffs) / np.sqrt(2.0)) if diffs.size else 0.0
            assert noise_sigma(image, masked) == expected


def _line_gains_out_of_place(sample: np.ndarray, exclude: np.ndarray, half: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """`preprocess._line_gains` as it was written: fresh arrays, np.pad, the columns sorted along axis 0."""
    valid = np.isfinite(sample)
    usable = valid & ~exclude[None, :]

    def window_sums(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        total = np.pad(np.cumsum(array, axis=1), ((0, 0), (half + 1, half)), mode="edge")
        total[:, : half + 1] = 0.0
        cols = array.shape[1]
        return (total[:, half : half + cols] - total[:, :cols],
                total[:, 2 * half + 1 : 2 * half + 1 + cols] - total[:, half + 1 : half + 1 + cols])

    left_sum, right_sum = window_sums(np.where(usable, sample, 0.0))
    n_left, n_right = window_sums(usable.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        left_distance, right_distance = (n_left + 1) / 2, (n_right + 1) / 2
        local = (right_distance * left_sum / n_left + left_distance * right_sum / n_right) / (
            left_distance + right_distance
        )
        ratio = np.where(valid & (n_left >= 2) & (n_right >= 2) & (local != 0), sample / local, np.nan)
    ordered = np.sort(ratio, axis=0)
    n_valid = np.sum(np.isfinite(ratio), axis=0)
    cols = np.arange(ratio.shape[1])
    low, high = np.clip((n_valid - 1) // 2, 0, ratio.shape[0] - 1), np.clip(n_valid // 2, 0, ratio.shape[0] - 1)
    gains = np.where(n_valid > 0, 0.5 * (ordered[low, cols] + ordered[high, cols]), np.nan)
    residual = (ratio - gains[None, :])[np.isfinite(ratio)]
    sigma = 1.4826 * float(np.median(np.abs(residual[:: max(1, residual.size // 200_000)]))) if residual.size else 0.0
    standard_error = 1.2533 * sigma / np.sqrt(np.maximum(n_valid, 1))
    return np.where(n_valid >= max(16, sample.shape[0] // 8), gains, np.nan), standard_error


@pytest.mark.parametrize("shape", [(20, 40), (64, 300), (256, 513)])
def test_line_gains_in_place_equal_the_out_of_place_arithmetic(shape: tuple[int, int]) -> None:
    from agent.locate.preprocess import _line_gains

    rng = np.random.default_rng(shape[1])
    sample = rng.normal(1000.0, 30.0, shape) * np.linspace(0.8, 1.2, shape[1])[None, :]
    sample[:, 7] *= 1.04  # a stripe
    sample[rng.random(shape) < 0.2] = np.nan
    sample[:, 11:14] = np.nan  # columns without a value
    exclude = rng.random(shape[1]) < 0.05
    expected = _line_gains_out_of_place(sample, exclude)
    got = _line_gains(sample, exclude)
    assert all(np.array_equal(g, e, equal_nan=True) for g, e in zip(got, expected, strict=True))


def test_dark_detectors_sharing_their_blocks_equal_each_on_its_own() -> None:
    from agent.locate.cluster import black_pixel_mask, dark_blocks, large_dark_mask

    for seed, polarity in ((0, "bright"), (1, "dark"), (2, "bright")):
        image = make_grid_image((700, 900), seed, polarity=polarity).image  # type: ignore[arg-type]
        ignore = np.zeros(image.shape, dtype=bool)
        ignore[-40:] = True  # an annotation band
        for flat in (None, ignore):
            blocks = dark_blocks(image, flat, 256)
            alone = large_dark_mask(image, 12.0, 256, ignore=flat)
            assert np.array_equal(large_dark_mask(image, 12.0, 256, ignore=flat, blocks=blocks), alone)
            alone = black_pixel_mask(image, ignore=flat, max_side_px=256)
            assert np.array_equal(black_pixel_mask(image, ignore=flat, max_side_px=256, blocks=blocks), alone)


_MESH_IMPORT_PROBE = """
import sys
import numpy as np
from agent.locate.cluster import dark_blocks, mesh_mask
from tests.synthetic_images import make_grid_image
image = make_grid_image((400, 420), 3).image
dark_blocks(image, np.zeros(image.shape, dtype=bool))
before = set(sys.modules)
mesh = mesh_mask(image, min_width_px=8.0)
print(mesh.n_bars > 0, sorted(set(sys.modules) - before))
"""


def test_the_mesh_thread_imports_nothing_after_dark_blocks() -> None:
    """`analysis.bar_and_black_mask` runs `mesh_mask` on a second thread beside the dark detectors, after
    `dark_blocks` (which imports Otsu's threshold): the mesh detector must not import (fresh interpreter)."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _MESH_IMPORT_PROBE], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True []"


def test_bar_and_black_mask_with_the_mesh_beside_equals_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.locate import parallel
    from agent.locate.analysis import bar_and_black_mask

    image = make_grid_image((500, 640), 4, bar_angle_deg=12.0).image
    settings = LocateSettings()
    threaded = bar_and_black_mask(image, settings)
    monkeypatch.setattr(parallel, "thread_count", lambda: 1)
    serial = bar_and_black_mask(image, settings)
    assert np.array_equal(threaded[0], serial[0]) and threaded[1] == serial[1]


def test_objects_with_the_film_lines_beside_equal_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """`objects.find_objects` searches the film lines on a second thread while the deviant pixels are labelled."""
    from agent.locate import parallel
    from agent.locate.targets import find_candidates

    scene = make_grid_image((1024, 1024), 1, n_crystals=6)
    rows, cols = scene.image.shape
    yy, xx = np.mgrid[:rows, :cols].astype(float)
    fold = np.abs(np.hypot(yy - rows * 1.6, xx - cols * 0.5) - rows * 1.3) < 2.5  # a gentle fold
    image = (scene.image * (1 - 0.06 * fold)).astype(scene.image.dtype)
    analysis = analyse(image, LocateSettings())
    threaded = find_candidates(analysis, analysis.suggested_crystal_clusters, image=image)
    monkeypatch.setattr(parallel, "thread_count", lambda: 1)
    serial = find_candidates(analysis, analysis.suggested_crystal_clusters, image=image)
    assert threaded and threaded == serial


_DEVIANT_IMPORT_PROBE = """
import sys
import numpy as np
from agent.locate.objects import _deviant_pixels, _label, _level_and_sigma, _polarity_vote, _smooth
image = np.random.default_rng(2).normal(1000.0, 10.0, (300, 320))
image[100:112, 100:114] = 600.0  # a dark plate in the region
regions = np.zeros(image.shape, dtype=np.uint8)
regions[40:200, 50:250] = 1
bars = np.zeros(image.shape, dtype=bool)
bars[:, :20] = True
smoothed = _smooth(image, regions == 0, regions)
level, sigma = _level_and_sigma(smoothed.film_sample)
polarity = _polarity_vote(smoothed, level, 4 * sigma, bars)
before = set(sys.modules)
labels = _label(_deviant_pixels(smoothed, level, 4 * sigma, polarity, bars, regions))
print(int(labels.max()) > 0, sorted(set(sys.modules) - before))
"""


def test_labelling_the_deviant_pixels_imports_nothing() -> None:
    """The deviant pixels are labelled while another thread searches the film lines (and imports what the
    skeletons need): the labelling must import nothing (fresh interpreter)."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _DEVIANT_IMPORT_PROBE], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True []"


def test_object_edge_width_equals_the_ndimage_band() -> None:
    from scipy import ndimage

    from agent.locate.edges import object_edge_width_px
    from agent.locate.object_features import percentile_90

    rng = np.random.default_rng(8)
    for shape in ((5, 5), (12, 30), (40, 33)):
        for _ in range(20):
            inside = rng.random(shape) < 0.6
            inside[: shape[0] // 2, : shape[1] // 2] = True  # cut by the frame on two sides
            deviation = rng.normal(5.0, 2.0, shape) + 10.0 * inside
            band = ndimage.binary_dilation(inside, iterations=2) & ~ndimage.binary_erosion(
                inside, iterations=2, border_value=1
            )
            gradient = np.hypot(*np.gradient(deviation))
            steepest = percentile_90(gradient[band]) if band.any() else 0.0
            expected = percentile_90(deviation[inside]) / steepest if steepest > 0 else float("inf")
            assert object_edge_width_px(deviation, inside) == expected


def test_region_members_from_their_boxes_equal_flatnonzero() -> None:
    from scipy import ndimage

    from agent.locate.targets import _members

    rng = np.random.default_rng(4)
    regions, n = ndimage.label(rng.random((120, 90)) < 0.45, structure=np.ones((3, 3), dtype=bool))
    boxes = ndimage.find_objects(regions)
    for label_id in range(1, n + 1):
        got = _members(regions, label_id, boxes[label_id - 1])
        assert np.array_equal(got, np.flatnonzero(regions.ravel() == label_id))


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
def test_block_sums_of_small_integers_equal_the_float_sums(dtype: str) -> None:
    from agent.locate.preprocess import _block_total, block_mean, block_sum

    info = np.iinfo(dtype)
    image = np.random.default_rng(1).integers(info.min, info.max, (301, 299), endpoint=True).astype(dtype)
    for factor in (2, 5, 16, 64):
        rows, cols = (301 // factor) * factor, (299 // factor) * factor
        blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
        expected = blocks.sum(axis=(1, 3), dtype=np.float64)
        total = _block_total(image, factor)
        assert total.dtype == np.float64 and np.array_equal(total, expected)
        assert np.array_equal(block_sum(image, factor), expected.astype(np.float32))
        assert np.array_equal(block_mean(image, factor), expected / float(factor * factor))
