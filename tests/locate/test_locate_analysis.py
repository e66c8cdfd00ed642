"""The locator on real-world-like images: bars masked, planted crystals found, in both polarities."""

from __future__ import annotations

import numpy as np
import pytest

from agent.commands.locate import candidates_to_stage
from agent.locate.analysis import ClusterAnalysis, LocateSettings, analyse
from agent.locate.cluster import fit_clusters, mesh_mask, suggest_k, two_step_black_cells
from agent.locate.errors import ImageInputError, SettingsError
from agent.locate.features import FEATURE_NAMES, grid_features
from agent.locate.similarity import cosine_similarity, similarity_map
from agent.locate.targets import Candidate, find_candidates
from drivers.geometry import pixel_to_stage_um
from tests.synthetic_images import SyntheticImage, make_grid_image

WINDOW = LocateSettings(mode="window", window_px=15, stride_px=4)
GRID = LocateSettings(mode="grid", grid_rows=40, grid_cols=40)


def _score(scene: SyntheticImage, candidates: list[Candidate], margin_px: float = 6.0) -> tuple[float, float]:
    """(precision, recall): a candidate is right if it lies on a planted crystal (+margin)."""
    if not candidates:
        return 0.0, 0.0
    mask = scene.crystal_mask(margin_px)
    hits = [bool(mask[round(c.row_px), round(c.col_px)]) for c in candidates]
    found = sum(
        any(
            (c.row_px - k.row_px) ** 2 + (c.col_px - k.col_px) ** 2 <= (k.radius_px + margin_px) ** 2
            for c in candidates
        )
        for k in scene.crystals
    )
    return float(np.mean(hits)), found / max(1, len(scene.crystals))


def _bar_iou(scene: SyntheticImage, analysis: ClusterAnalysis) -> float:
    truth, found = scene.bar_mask, analysis.bar_mask
    return float((truth & found).sum() / max(1, (truth | found).sum()))


@pytest.mark.parametrize(
    ("polarity", "bit_depth", "settings"),
    [
        ("bright", 16, WINDOW),
        ("dark", 16, WINDOW),
        ("bright", 8, GRID),
        ("dark", 8, GRID),
    ],
)
def test_planted_crystals_are_found_and_bars_masked(polarity: str, bit_depth: int, settings: LocateSettings) -> None:
    recalls, precisions = [], []
    for seed in (11, 12) if settings.mode == "window" else (13,):
        scene = make_grid_image(
            (512, 512), seed, polarity=polarity, bit_depth=bit_depth, bar_pitch_px=260, bar_width_px=60, n_crystals=8
        )
        analysis = analyse(scene.image, settings)
        assert _bar_iou(scene, analysis) > 0.8
        assert analysis.suggested_crystal_clusters, "the default rule must suggest a cluster"
        assert analysis.background_cluster not in analysis.suggested_crystal_clusters
        # with the image, as `locate`, `screen` and `evaluate` call it: one candidate per object in the regions
        candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, image=scene.image)
        precision, recall = _score(scene, candidates)
        precisions.append(precision)
        recalls.append(recall)
        # candidates keep their distance from bars and from each other
        for c in candidates:
            assert not scene.bar_mask[int(c.row_px), int(c.col_px)]
    assert np.mean(recalls) >= 0.75, recalls
    # the default rule takes every object cluster (ice and debris too: the operator or label memory
    # tells them apart), so precision is bounded by the share of crystals among the objects
    assert np.mean(precisions) >= 0.4, precisions


def test_uneven_illumination_does_not_become_the_crystal_cluster() -> None:
    scene = make_grid_image((512, 512), 5, bars=False, uneven_illumination=0.6, n_crystals=10, artefacts=True)
    analysis = analyse(scene.image, WINDOW)
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters)
    precision, recall = _score(scene, candidates)
    assert recall >= 0.7 and precision >= 0.5, (precision, recall)


def test_no_bars_means_almost_nothing_masked_and_data_bar_is_masked() -> None:
    scene = make_grid_image((400, 400), 3, bars=False, data_bar=True, n_crystals=6)
    analysis = analyse(scene.image, GRID)
    assert scene.data_bar_rows is not None
    data_rows = slice(scene.data_bar_rows[0] + 1, scene.data_bar_rows[1])
    assert analysis.bar_mask[data_rows].mean() > 0.9
    film = analysis.bar_mask[: scene.data_bar_rows[0] - 10]
    assert film.mean() < 0.05


def test_mesh_detector_finds_bar_angle() -> None:
    scene = make_grid_image((512, 512), 4, bar_angle_deg=12.0, data_bar=False, artefacts=False)
    detection = mesh_mask(scene.image, min_width_px=10)
    assert detection.angle_deg is not None
    assert min(abs(detection.angle_deg - 12.0), abs(detection.angle_deg - 12.0 + 90)) < 1.0
    assert detection.n_bars >= 2
    iou = (detection.mask & scene.bar_mask).sum() / (detection.mask | scene.bar_mask).sum()
    assert iou > 0.8


def test_two_step_filter_masks_black_cells_only_when_there_are_some() -> None:
    scene = make_grid_image((480, 480), 6, data_bar=False)
    features, names = grid_features(scene.image, 24, 24)
    black = two_step_black_cells(features, names)
    truth = grid_features(scene.bar_mask.astype(np.float64), 24, 24)[0][:, 0]  # bar fraction per cell
    assert black[truth > 0.9].mean() > 0.9
    assert black[truth == 0].mean() < 0.1
    plain = make_grid_image((480, 480), 6, bars=False, data_bar=False)
    features, _ = grid_features(plain.image, 24, 24)
    assert two_step_black_cells(features, names).sum() == 0
    analysis = analyse(scene.image, LocateSettings(mode="grid", grid_rows=24, grid_cols=24, bar_filter="two-step"))
    assert _bar_iou(scene, analysis) > 0.6


def test_clustering_is_seeded_and_user_k_wins() -> None:
    scene = make_grid_image((384, 384), 7, n_crystals=6)
    a1 = analyse(scene.image, LocateSettings(mode="grid", grid_rows=32, grid_cols=32, k=4, seed=3))
    a2 = analyse(scene.image, LocateSettings(mode="grid", grid_rows=32, grid_cols=32, k=4, seed=3))
    np.testing.assert_array_equal(a1.label_grid, a2.label_grid)
    assert len(a1.clusters) == 4
    assert sorted(c.n_cells for c in a1.clusters) == sorted(np.bincount(a1.label_grid[a1.label_grid >= 0]))
    # cluster 0 is the largest
    assert a1.clusters[0].n_cells == max(c.n_cells for c in a1.clusters)
    agglo = analyse(scene.image, LocateSettings(mode="grid", grid_rows=32, grid_cols=32, k=3, method="agglomerative"))
    assert set(np.unique(agglo.label_grid)) <= {-1, 0, 1, 2}


def test_suggest_k_separates_obvious_blobs() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=float)
    points = np.concatenate([c + rng.normal(0, 0.5, (200, 3)) for c in centres])
    best, scores = suggest_k(points, seed=1)
    assert best == 4
    assert set(scores) == {2, 3, 4, 5, 6}


def test_normalised_centroids_compare_across_polarity_and_gain() -> None:
    bright = make_grid_image((400, 400), 21, polarity="bright", n_crystals=8, bar_pitch_px=200, bar_width_px=50)
    dark = make_grid_image((400, 400), 21, polarity="dark", n_crystals=8, bar_pitch_px=200, bar_width_px=50)
    a_b, a_d = analyse(bright.image, WINDOW), analyse(dark.image, WINDOW)
    for analysis in (a_b, a_d):
        background = np.array(analysis.clusters[analysis.background_cluster].normalised_centroid)
        crystal = np.array(analysis.clusters[analysis.suggested_crystal_clusters[0]].normalised_centroid)
        assert np.linalg.norm(background) < np.linalg.norm(crystal) / 10
        assert crystal[FEATURE_NAMES.index("mean")] > 0  # polarity-invariant: absolute
    # a gain change does not move normalised centroids
    scaled = (bright.image.astype(np.float64) * 0.5).astype(np.uint16)
    a_s = analyse(scaled, WINDOW)
    for c1, c2 in zip(a_b.clusters, a_s.clusters, strict=True):
        np.testing.assert_allclose(c1.normalised_centroid, c2.normalised_centroid, rtol=0.2, atol=1.0)


def test_similarity_map_finds_more_like_the_reference() -> None:
    scene = make_grid_image((512, 512), 8, n_crystals=10, n_ice=0, n_debris=0)
    analysis = analyse(scene.image, WINDOW)
    first = scene.crystals[0]
    cell = analysis.cell_of_pixel(first.row_px, first.col_px)
    similarity = similarity_map(analysis.features, analysis.grid_shape, [cell], analysis.valid_cells)
    assert similarity[cell] == pytest.approx(1.0)
    assert np.all(np.isnan(similarity.ravel()[~analysis.valid_cells]))
    candidates = find_candidates(analysis, (), score_map=similarity)
    precision, recall = _score(scene, candidates)
    assert recall >= 0.5 and precision >= 0.5, (precision, recall)
    with pytest.raises(SettingsError):
        similarity_map(analysis.features, analysis.grid_shape, [(10_000, 0)])
    with pytest.raises(SettingsError):
        similarity_map(analysis.features, analysis.grid_shape, [])
    np.testing.assert_allclose(cosine_similarity(np.eye(3), np.array([[1.0, 0, 0]])), [1, 0, 0])


def test_candidates_are_ranked_spaced_and_mapped_to_stage() -> None:
    scene = make_grid_image((512, 512), 9, n_crystals=10)
    analysis = analyse(scene.image, WINDOW)
    spaced = LocateSettings(mode="window", window_px=15, stride_px=4, min_spacing_px=120, min_bar_distance_px=20)
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, spaced)
    scores = [c.score for c in candidates]
    assert scores == sorted(scores, reverse=True)
    for i, a in enumerate(candidates):
        for b in candidates[i + 1 :]:
            assert np.hypot(a.row_px - b.row_px, a.col_px - b.col_px) >= 120
    from agent.locate.targets import bar_distance_px

    distances = bar_distance_px(analysis.bar_mask, np.array([[c.row_px, c.col_px] for c in candidates]))
    assert np.all(distances >= 20 - 2)
    capped = find_candidates(
        analysis, analysis.suggested_crystal_clusters, spaced.model_copy(update={"max_candidates": 2})
    )
    assert len(capped) <= 2
    matrix = np.array([[0.3, 0.02], [-0.02, 0.3]])
    staged = candidates_to_stage(candidates, scene.image.shape, (100.0, -50.0), matrix)
    expected = pixel_to_stage_um(
        np.array([[c.col_px, c.row_px] for c in candidates]), scene.image.shape, (100.0, -50.0), matrix
    )
    np.testing.assert_allclose([[c.x_um, c.y_um] for c in staged], expected)
    with pytest.raises(SettingsError):
        candidates_to_stage(candidates, scene.image.shape, (0.0, 0.0), np.zeros((2, 2)))
    with pytest.raises(SettingsError, match="unknown cluster"):
        find_candidates(analysis, [99])
    assert find_candidates(analysis, []) == []


def test_to_pixels_maps_cells_back_onto_the_image() -> None:
    image = make_grid_image((130, 170), 1, bars=False, data_bar=False, n_crystals=2).image
    analysis = analyse(image, LocateSettings(mode="grid", grid_rows=7, grid_cols=9, k=2))
    grid = np.arange(63).reshape(7, 9)
    pixels = analysis.to_pixels(grid)
    assert pixels.shape == image.shape
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 62
    for (col, row), value in zip(analysis.cell_centres_px, grid.ravel(), strict=True):
        assert pixels[int(row), int(col)] == value
    with pytest.raises(SettingsError):
        analysis.to_pixels(np.zeros((3, 3)))


def test_bad_inputs_and_settings_raise_clear_errors() -> None:
    image = make_grid_image((120, 120), 2, n_crystals=2).image
    with pytest.raises(ImageInputError):
        analyse(np.zeros((10, 10, 3), dtype=np.uint8))
    with pytest.raises(ImageInputError):
        analyse(np.array([[np.inf, 1.0], [1.0, 1.0]]))
    with pytest.raises(SettingsError, match="larger than the image"):
        analyse(image, LocateSettings(mode="window", window_px=201))
    with pytest.raises(SettingsError, match="too fine"):
        analyse(image, LocateSettings(mode="grid", grid_rows=100, grid_cols=100))
    with pytest.raises(SettingsError, match="larger than the number"):
        analyse(image, LocateSettings(mode="grid", grid_rows=2, grid_cols=2, k=9, bar_filter="none"))
    with pytest.raises(ValueError, match="odd"):
        LocateSettings(window_px=30)
    with pytest.raises(SettingsError):
        fit_clusters(np.zeros((5, 3)), 2)  # fewer distinct vectors than k
    flat = np.full((64, 64), 1000, dtype=np.uint16)
    analysis = analyse(flat, LocateSettings(mode="grid", grid_rows=4, grid_cols=4, k=1))
    assert analysis.suggested_crystal_clusters == ()


def test_float_and_int16_inputs_work() -> None:
    scene = make_grid_image((384, 384), 13, n_crystals=6)
    as_float = scene.image.astype(np.float32) / 65535.0
    as_int16 = (scene.image.astype(np.int32) - 20000).astype(np.int16)
    a_f = analyse(as_float, GRID)
    a_i = analyse(as_int16, GRID)
    assert a_f.label_grid.shape == a_i.label_grid.shape == (40, 40)
    assert (a_f.bar_mask == a_i.bar_mask).mean() > 0.95


def test_heatmap_png_and_gallery_render_every_cluster() -> None:
    import io

    from PIL import Image

    from agent.locate.render import cluster_gallery_rgb, display_uint8, heatmap_png, heatmap_rgb, similarity_rgb

    scene = make_grid_image((256, 320), 14, n_crystals=4)
    analysis = analyse(scene.image, LocateSettings(mode="grid", grid_rows=16, grid_cols=20))
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters)
    rgb = heatmap_rgb(scene.image, analysis, candidates, analysis.suggested_crystal_clusters)
    assert rgb.shape == (256, 320, 3) and rgb.dtype == np.uint8
    # masked pixels are tinted dark, film keeps its brightness ordering
    assert rgb[analysis.bar_mask].mean() < rgb[~analysis.bar_mask].mean()
    png = heatmap_png(scene.image, analysis, candidates, analysis.suggested_crystal_clusters)
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert decoded.shape == (256, 320, 3)
    assert np.abs(decoded[100:, 100:].astype(int) - rgb[100:, 100:].astype(int)).mean() < 12
    gallery = cluster_gallery_rgb(scene.image, analysis, per_cluster=4, patch_px=32)
    assert gallery.ndim == 3 and gallery.shape[0] >= len(analysis.clusters) * 32
    similarity = np.zeros(analysis.grid_shape)
    assert similarity_rgb(scene.image, analysis, similarity).shape == (256, 320, 3)
    stretched = display_uint8(np.array([[0.0, 1.0], [2.0, 3.0]]))
    assert stretched.dtype == np.uint8 and stretched[0, 0] == 0 and stretched[1, 1] == 255
    with pytest.raises(ImageInputError):
        heatmap_rgb(scene.image[:100], analysis)


def test_given_the_image_each_object_in_a_region_becomes_its_own_candidate() -> None:
    """Two plates in one coarse cell region give two candidates, each on its plate (not between)."""
    from agent.locate.analysis import LocateSettings, analyse
    from agent.locate.targets import find_candidates

    rng = np.random.default_rng(3)
    image = rng.normal(3000.0, 40.0, size=(256, 256))
    yy, xx = np.mgrid[:256, :256]
    plates = [(100, 100), (100, 116), (190, 60)]
    for row, col in plates:
        image[(np.abs(yy - row) < 4) & (np.abs(xx - col) < 4)] *= 0.6
    image = image.astype(np.uint16)
    settings = LocateSettings(
        mode="grid", grid_rows=8, grid_cols=8, k=2, bar_filter="none", min_spacing_px=4, min_bar_distance_px=0
    )
    analysis = analyse(image, settings)
    crystal = analysis.suggested_crystal_clusters
    coarse = find_candidates(analysis, crystal, settings)
    fine = find_candidates(analysis, crystal, settings, image=image)
    assert len(fine) > len(coarse)
    for row, col in plates:
        assert min(np.hypot(c.row_px - row, c.col_px - col) for c in fine) < 2.0
