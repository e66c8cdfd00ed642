"""Faint crystals by their straight edges (`agent.locate.outlines`) and the outlined cluster of `analyse`."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from agent.locate.analysis import STRAIGHT_EDGE_FEATURE, LocateSettings, analyse, bar_and_black_mask
from agent.locate.outlines import (
    N_ORIENTATIONS,
    direction_concentration,
    find_outlines,
    seam_mask,
    straight_edge_response,
)
from agent.locate.preprocess import prepare_image
from agent.locate.targets import find_candidates
from agent.locate.vacuum import vacuum_mask
from tests.synthetic_images import SyntheticImage, make_grid_image

LINE_PX = 41
SEARCH = LocateSettings(mode="window", window_px=31, stride_px=8, outline_length_px=LINE_PX)


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


@pytest.mark.parametrize("polarity", ["bright", "dark"])
@pytest.mark.parametrize("bit_depth", [16, 8])
def test_faint_plates_are_outlined_and_nothing_else_is(polarity: str, bit_depth: int) -> None:
    found = planted = wrong = 0
    for seed in range(4):
        view = _search_view(seed, polarity=polarity, bit_depth=bit_depth)
        outlines = _outlines(view)
        on, hit = _on_crystal(view, outlines.rows_px, outlines.cols_px)
        found += len(hit)
        planted += len(view.crystals)
        wrong += int((~on).sum())
        assert outlines.labels.max() == len(outlines)
        assert np.all(outlines.area_px > 0) and np.all(outlines.edge_z >= 5.0)
    assert wrong == 0, f"{wrong} outlines off the crystals ({polarity}, {bit_depth}-bit)"
    assert found >= planted / 2, f"found {found} of {planted} faint plates ({polarity}, {bit_depth}-bit)"


@pytest.mark.parametrize("seed", range(3))
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
