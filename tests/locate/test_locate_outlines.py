"""Faint crystals by their straight edges (`agent.locate.outlines`) and the outlined cluster of `analyse`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from agent.locate.analysis import STRAIGHT_EDGE_FEATURE, LocateSettings, analyse, bar_and_black_mask
from agent.locate.errors import SettingsError
from agent.locate.outlines import (
    N_ORIENTATIONS,
    direction_concentration,
    find_outlines,
    seam_mask,
    straight_edge_response,
)
from agent.locate.preprocess import prepare_image
from agent.locate.render import _legend_labels
from agent.locate.targets import find_candidates
from agent.locate.vacuum import vacuum_mask
from tests.synthetic_images import SyntheticImage, make_grid_image

LINE_PX = 41
SEARCH = LocateSettings(mode="window", window_px=31, stride_px=8, k=3, outline_length_px=LINE_PX)


def _search_view(seed: int, n_crystals: int = 2, **options) -> SyntheticImage:
    """A high-magnification view: no bars, a few large faint plates (6 % contrast) on a film whose
    mottle (2 %, correlated over 6 px) and shot noise (about 3 % per pixel) are as strong as the plates,
    with ice balls, debris, tile seams, readout artefacts and a data bar."""
    values = dict(
        shape=(768, 768),
        bars=False,
        n_crystals=n_crystals,
        crystal_size_px=(90.0, 140.0),
        crystal_contrast=0.06,
        film_grain=0.02,
        noise_counts=20.0,
        n_ice=3,
        n_debris=3,
        tile_seams=True,
    )
    values.update(options)
    return make_grid_image(seed=seed, **values)


def _outlines(view: SyntheticImage):
    settings = LocateSettings()
    bars, _angle = bar_and_black_mask(view.image, settings)
    holes = vacuum_mask(view.image, bars)
    mask = bars | holes if holes is not None else bars
    return find_outlines(prepare_image(view.image, mask), mask, LINE_PX)


def _on_crystal(view: SyntheticImage, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, set[int]]:
    """Per point: on a planted crystal (its bounding circle + 5 px)? And which crystals were hit."""
    hit: set[int] = set()
    on = np.zeros(len(rows), dtype=bool)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        for j, crystal in enumerate(view.crystals):
            if (r - crystal.row_px) ** 2 + (c - crystal.col_px) ** 2 <= (crystal.radius_px + 5) ** 2:
                on[i] = True
                hit.add(j)
    return on, hit


def test_the_response_peaks_on_a_straight_step_in_its_direction() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, size=(200, 240))
    image[:, 120:] += 4.0  # a vertical step of under one noise sigma
    response, direction = straight_edge_response(image, LINE_PX)
    assert response.shape == image.shape and response.dtype == np.float32
    middle = response[60:140]
    assert np.all(np.abs(np.argmax(middle, axis=1) - 119.5) <= 2)  # the edge is the strongest answer in every row
    assert np.all(direction[60:140, 119:121] == 0)  # derivative along x: a vertical line
    turned_response, turned_direction = straight_edge_response(image.T, LINE_PX)
    assert np.all(turned_direction[119:121, 60:140] == N_ORIENTATIONS // 2)
    assert np.allclose(turned_response[119:121, 60:140].mean(), middle[:, 119:121].mean(), rtol=0.05)
    with pytest.raises(ValueError, match="length_px"):
        straight_edge_response(image, 2)


def test_direction_concentration_tells_polygons_from_circles() -> None:
    one_direction = np.zeros(50, dtype=np.int8)
    assert direction_concentration(one_direction, np.ones(50)) == 1.0
    all_directions = np.arange(N_ORIENTATIONS * 10) % N_ORIENTATIONS
    assert direction_concentration(all_directions, np.ones(all_directions.size)) == pytest.approx(0.25)
    assert direction_concentration(np.zeros(0, np.int8), np.zeros(0)) == 0.0


def test_seam_mask_covers_a_broken_axis_line_across_the_frame_and_not_a_facet() -> None:
    edges = np.zeros((300, 300), dtype=bool)
    direction = np.zeros((300, 300), dtype=np.int8)
    edges[150, 10:100] = edges[150, 200:290] = True  # a horizontal seam broken in the middle
    direction[150, :] = N_ORIENTATIONS // 2
    edges[40:100, 60] = True  # a short vertical facet elsewhere
    seams = seam_mask(edges, direction, margin_px=5)
    assert seams[150, 150] and seams[146, 20] and not seams[140, 20]
    assert not seams[40:100, 60].any()


@pytest.mark.parametrize(("polarity", "bit_depth"), [("bright", 16), ("dark", 8)])
def test_faint_plates_are_outlined_and_little_else_is(polarity: str, bit_depth: int) -> None:
    found = planted = wrong = total = 0
    for seed in range(4):
        view = _search_view(seed, polarity=polarity, bit_depth=bit_depth)
        outlines = _outlines(view)
        on, hit = _on_crystal(view, outlines.rows_px, outlines.cols_px)
        found += len(hit)
        planted += len(view.crystals)
        wrong += int((~on).sum())
        total += len(outlines)
        # every outline owns its pixels in the label image
        assert np.array_equal(np.unique(outlines.labels), np.arange(len(outlines) + 1))
        assert np.allclose(np.bincount(outlines.labels.ravel())[1:], outlines.area_px)
    # measured: none off in bright field; in dark field 1-2 of 10 (a faint debris edge that joins a plate's
    # outline, a piece of a faint seam that does not run across most of the frame)
    assert wrong <= 0.2 * total, f"{wrong} of {total} outlines off the crystals ({polarity}, {bit_depth}-bit)"
    assert found >= planted / 2, f"found {found} of {planted} faint plates ({polarity}, {bit_depth}-bit)"


def test_an_axis_aligned_plate_a_third_of_the_frame_wide_is_not_taken_for_a_seam() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(1000.0, 20.0, size=(600, 600))
    image[200:400, 200:400] -= 25.0  # a square plate, sides along the image axes, 1/3 of the frame
    outlines = find_outlines(image, np.zeros(image.shape, dtype=bool), LINE_PX)
    assert len(outlines) == 1
    assert abs(outlines.rows_px[0] - 300) < 10 and abs(outlines.cols_px[0] - 300) < 10


def test_a_needle_along_an_image_axis_is_outlined_and_a_seam_across_the_frame_is_not() -> None:
    rng = np.random.default_rng(4)
    image = rng.normal(1000.0, 20.0, size=(600, 600))
    image[150:350, 300:306] -= 30.0  # a needle along the columns, a third of the frame long
    image[:, 450:] *= 1.03  # a seam: a gain step down the whole frame
    outlines = find_outlines(image, np.zeros(image.shape, dtype=bool), LINE_PX)
    assert len(outlines) == 1
    assert 150 < outlines.rows_px[0] < 350 and 295 < outlines.cols_px[0] < 311


def test_bad_images_are_refused() -> None:
    image = np.ones((100, 100))
    mask = np.zeros((100, 100), dtype=bool)
    with pytest.raises(ValueError, match="do not fit"):
        find_outlines(image[:30], mask[:30], LINE_PX)
    image[5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        find_outlines(image, mask, LINE_PX)
    with pytest.raises(ValueError, match="shape"):
        find_outlines(np.ones((100, 100)), mask[:50], LINE_PX)


@pytest.mark.parametrize("seed", range(2))
def test_ice_balls_debris_seams_bars_and_film_alone_give_no_outline(seed: int) -> None:
    # with bars, no seams: a seam piece that bars cut short is one straight line in one square, which is
    # what a facet along an image axis looks like too (the module docstring says so)
    for options in (
        {},
        {"polarity": "dark", "bit_depth": 8},
        {"bars": True, "bar_pitch_px": 500.0, "tile_seams": False},
    ):
        view = _search_view(seed, n_crystals=0, **options)
        outlines = _outlines(view)
        assert len(outlines) == 0, f"{options}: outlines at rows {outlines.rows_px}, cols {outlines.cols_px}"


def test_analysis_adds_a_suggested_outlined_cluster_that_lands_on_the_plate() -> None:
    view = _search_view(1, n_crystals=1)
    plain = analyse(view.image, SEARCH.model_copy(update={"outline_length_px": None}))
    outlined = analyse(view.image, SEARCH)
    assert plain.outline_cluster is None and STRAIGHT_EDGE_FEATURE not in plain.feature_names
    assert outlined.feature_names == (*plain.feature_names, STRAIGHT_EDGE_FEATURE)
    k = len(plain.clusters)
    assert outlined.outline_cluster == k and len(outlined.clusters) == k + 1
    assert k in outlined.suggested_crystal_clusters
    assert outlined.background_cluster == plain.background_cluster
    # the k-means clusters are untouched: only cells inside outlines moved to the new cluster
    moved = outlined.label_grid == k
    assert moved.any()
    assert np.array_equal(outlined.label_grid[~moved], plain.label_grid[~moved])
    summary = outlined.cluster(k)
    assert summary.n_cells == int(moved.sum())
    # its straight-edge feature stands out of the film's spread (what label memory compares)
    assert summary.normalised_centroid[-1] > 1.0
    assert abs(outlined.cluster(outlined.background_cluster).normalised_centroid[-1]) < 1.0
    assert len(summary.example_cells_px) > 0
    candidates = find_candidates(outlined, (k,), image=view.image)
    assert candidates
    on, hit = _on_crystal(view, np.array([c.row_px for c in candidates]), np.array([c.col_px for c in candidates]))
    assert on.all() and hit == {0}


def test_outline_length_is_validated() -> None:
    with pytest.raises(ValidationError):
        LocateSettings(outline_length_px=5)
    assert LocateSettings().outline_length_px is None


def _plate_with_textured_core(seed: int = 0) -> np.ndarray:
    """A faint plate (5 %) whose centre holds a textured core: one k-means cluster lies wholly inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512] - 256.0
    theta = np.deg2rad(20)
    u, v = xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)
    plate = (np.abs(u) < 110) & (np.abs(v) < 90)
    core = np.hypot(xx, yy) < 50
    grain = ndimage.gaussian_filter(rng.normal(size=(512, 512)), 6)
    film = 1 + 0.01 * grain / grain.std() - 0.05 * plate - 0.08 * core * (0.5 + 0.5 * np.cos(xx / 3.0))
    return rng.poisson(film * 2000).astype(np.uint16)


@pytest.mark.parametrize("k", [2, 3])
def test_a_cluster_wholly_inside_an_outline_keeps_its_cells(k: int) -> None:
    analysis = analyse(_plate_with_textured_core(), SEARCH.model_copy(update={"k": k}))
    assert analysis.outline_cluster == k
    assert all(c.n_cells > 0 for c in analysis.clusters)  # no cluster emptied by the move
    json.dumps([c.to_dict(analysis.feature_names) for c in analysis.clusters], allow_nan=False)


def test_an_outline_over_most_of_the_frame_is_not_suggested() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:512, :512].astype(float)
    grain = ndimage.gaussian_filter(rng.normal(size=(512, 512)), 6)
    folds = (np.abs(yy - xx) < 3.5) | (np.abs(yy + xx - 511) < 3.5)  # two film folds, corner to corner
    image = rng.poisson((1 + 0.02 * grain / grain.std() - 0.08 * folds) * 400).astype(np.uint16)
    analysis = analyse(image, SEARCH)
    outlined = analysis.cluster(analysis.outline_cluster)
    assert outlined.fraction > 0.5 and analysis.outline_cluster not in analysis.suggested_crystal_clusters
    # the background is the film cluster k-means found (its normalised centroid ~0), not the outlined one
    assert analysis.background_cluster != analysis.outline_cluster
    background = analysis.cluster(analysis.background_cluster)
    assert np.all(np.abs(background.normalised_centroid) < 1.0)


def test_grid_mode_gets_the_outline_feature_and_the_legend_names_the_outlined_cluster() -> None:
    view = _search_view(1, n_crystals=1)
    grid = analyse(view.image, LocateSettings(mode="grid", grid_rows=24, grid_cols=24, k=3, outline_length_px=LINE_PX))
    assert grid.feature_names[-1] == STRAIGHT_EDGE_FEATURE and grid.features.shape[1] == len(grid.feature_names)
    assert grid.outline_cluster is not None
    legend = _legend_labels(grid, grid.suggested_crystal_clusters)
    assert sum("(outlined)" in line for line in legend) == 1


def test_an_outline_longer_than_the_image_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="do not fit"):
        analyse(np.ones((64, 64), dtype=np.uint16), LocateSettings(mode="window", window_px=15, outline_length_px=81))
