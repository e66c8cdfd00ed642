"""Pixel-level objects in candidate regions (`agent.locate.objects`) and the clustering's outlier cap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from agent.locate.analysis import LocateSettings, analyse
from agent.locate.cluster import fit_clusters, outlier_bounds
from agent.locate.errors import SettingsError
from agent.locate.objects import (
    find_objects,
    is_compound,
    object_polarity,
    outline_turning_concentration,
    split_compound,
)
from agent.locate.targets import find_candidates
from tests.synthetic_images import make_grid_image


def _disc(shape: tuple[int, int], row: float, col: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - row) ** 2 + (xx - col) ** 2 <= radius**2


def _polygon_mask(shape: tuple[int, int], row: float, col: float, radius: float, sides: int, turn: float) -> np.ndarray:
    from skimage.draw import polygon

    angles = turn + np.arange(sides) * 2 * np.pi / sides
    rr, cc = polygon(row + radius * np.sin(angles), col + radius * np.cos(angles), shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def test_two_touching_discs_are_split_and_a_single_plate_stays_whole() -> None:
    shape = (80, 120)
    pair = _disc(shape, 40, 40, 10) | _disc(shape, 40, 57, 10)  # touching: a neck between them
    plate = np.zeros(shape, dtype=bool)
    plate[30:50, 85:105] = True  # one convex crystal
    assert is_compound(pair) and not is_compound(plate)
    parts = split_compound(pair, min_distance_px=5)
    assert parts.max() == 2 and parts[40, 40] != parts[40, 57] and parts[40, 40] > 0 and parts[40, 57] > 0
    assert np.array_equal(parts > 0, pair), "splitting loses no pixel"
    whole = split_compound(plate, min_distance_px=5)
    assert whole.max() == 1 and np.array_equal(whole > 0, plate), "a single convex plate must not be cut"


def test_polarity_follows_the_objects_not_an_assumption() -> None:
    rng = np.random.default_rng(0)
    shape = (200, 200)
    deviation = rng.normal(0, 1, shape)
    dark = np.zeros(shape, dtype=bool)
    for row, col in rng.uniform(20, 180, size=(8, 2)):
        dark |= _disc(shape, row, col, 4)
    fringe = np.zeros(shape, dtype=bool)
    fringe[100:102, 10:16] = True  # a faint bright fringe: many pixels of little contrast
    deviation[dark] = -30.0
    deviation[fringe] = 5.0
    assert object_polarity(dark, fringe, deviation) == "dark"
    assert object_polarity(fringe, dark, -deviation) == "bright"  # dark field: the same, mirrored
    assert object_polarity(dark, dark, deviation) == "both"  # undecided: both signs make objects


def test_find_objects_ignores_the_bright_side_of_a_hole_in_bright_field() -> None:
    rng = np.random.default_rng(1)
    shape = (256, 256)
    image = rng.normal(1000.0, 10.0, shape)
    crystals = [(60, 60), (60, 190), (190, 60), (120, 120), (200, 200), (40, 120)]
    for row, col in crystals:
        image[_polygon_mask(shape, row, col, 8, 4, 0.3)] -= 300.0  # crystals are faceted
    hole = _disc(shape, 256, 256, 40)  # torn film in a corner: brighter than the film
    image[hole] += 400.0
    regions = np.ones(shape, dtype=np.int32)
    table = find_objects(image, ~hole, regions, np.zeros(shape, dtype=bool))
    assert table is not None and table.polarity == "dark"
    centres = np.stack([table.row_px, table.col_px], 1)
    assert len(table) == len(crystals)
    for row, col in crystals:
        assert np.min(np.hypot(centres[:, 0] - row, centres[:, 1] - col)) < 1.0


def test_outlier_cap_bounds_and_bad_cap() -> None:
    sample = np.column_stack([np.arange(100.0), np.full(100, 5.0)])
    low, high = outlier_bounds(sample, 2.0)
    assert low[0] < np.median(sample[:, 0]) < high[0]
    assert np.isinf(low[1]) and np.isinf(high[1]), "a constant feature is not clipped"
    with pytest.raises(SettingsError):
        outlier_bounds(sample, 0.0)
    model = fit_clusters(np.random.default_rng(0).normal(size=(500, 3)), 2, outlier_cap_sigma=3.0)
    capped = model.capped(np.array([[1e9, 0.0, 0.0]]))
    assert capped[0, 0] == pytest.approx(model.clip_high[0])


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_faint_crystals_are_found_next_to_very_dark_ice(polarity: str) -> None:
    """Faint plates (5 % contrast) in an image with near-opaque ice: with the outlier cap the ice does not
    take all clusters, and candidates land on the faint plates in either contrast polarity."""
    scene = make_grid_image(
        (512, 512), 7, polarity=polarity, bars=False, data_bar=False, n_crystals=10, crystal_contrast=0.05, n_ice=6
    )
    settings = LocateSettings(mode="window", window_px=15, stride_px=4, k=3, min_bar_distance_px=0)
    analysis = analyse(scene.image, settings)
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, settings, image=scene.image)
    points = np.array([[c.row_px, c.col_px] for c in candidates]).reshape(-1, 2)
    found = sum(
        bool(len(points)) and np.min(np.hypot(points[:, 0] - c.row_px, points[:, 1] - c.col_px)) <= c.radius_px + 3
        for c in scene.crystals
    )
    assert found >= 0.7 * len(scene.crystals), f"found {found} of {len(scene.crystals)} faint plates"


def test_too_thick_objects_are_dropped_only_when_asked() -> None:
    """Bright field with bars (the camera's dark level) and an offset: a near-opaque ball (5 % transmission)
    is dropped with `max_object_od=2`, thin plates (60 %) are kept; without the option all are kept."""
    rng = np.random.default_rng(2)
    shape = (320, 320)
    offset, film = 500.0, 4000.0
    transmission = np.ones(shape)
    transmission[:, :40] = 0.0  # a grid bar
    plates = [(80, 120), (80, 240), (240, 240), (160, 180), (160, 280)]  # enough to measure the polarity
    for row, col in plates:
        transmission[_polygon_mask(shape, row, col, 9, 6, 0.2)] = 0.6  # hexagonal plates
    transmission[_polygon_mask(shape, 240, 120, 9, 6, 0.2)] = 0.05  # as dark as an ice ball, but faceted
    image = (offset + film * transmission + rng.normal(0, 20, shape)).astype(np.uint16)
    kept = LocateSettings(mode="window", window_px=15, stride_px=4, k=3, min_bar_distance_px=0)
    strict = kept.model_copy(update={"max_object_od": 2.0})
    analysis = analyse(image, kept)
    crystal = analysis.suggested_crystal_clusters

    def near_ice(settings: LocateSettings) -> bool:
        points = [(c.row_px, c.col_px) for c in find_candidates(analysis, crystal, settings, image=image)]
        for row, col in plates:
            assert any(np.hypot(r - row, c - col) < 3 for r, c in points), "a thin plate was lost"
        return any(np.hypot(r - 240, c - 120) < 10 for r, c in points)

    assert near_ice(kept)
    assert not near_ice(strict)


def test_turning_concentration_tells_circles_from_polygons() -> None:
    angles = np.linspace(0, 2 * np.pi, 400)
    circle = np.column_stack([30 + 20 * np.sin(angles), 30 + 20 * np.cos(angles)])
    corners = np.array([[10, 10], [10, 50], [50, 50], [50, 10], [10, 10]], float)
    square = np.concatenate([np.linspace(a, b, 80, endpoint=False) for a, b in itertools.pairwise(corners)])
    square = np.vstack([square, square[:1]])
    assert abs(outline_turning_concentration(circle) - 0.25) < 0.05
    assert outline_turning_concentration(square) > 0.8
    assert np.isnan(outline_turning_concentration(circle[:5] * 0.1))


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_round_ice_is_dropped_and_faceted_plates_are_kept(polarity: str) -> None:
    """Blurred, noisy discs (ice) and hexagons / squares / rods (crystals) of the same size and contrast."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    shape = (360, 360)
    objects = np.zeros(shape)
    ice = [(60, 60), (60, 300), (300, 180)]
    crystals = [
        _polygon_mask(shape, 60, 180, 14, 6, 0.3),
        _polygon_mask(shape, 180, 60, 13, 4, 0.5),
        _polygon_mask(shape, 180, 300, 15, 6, 0.0),
        _polygon_mask(shape, 300, 60, 12, 4, 0.1),
    ]
    for row, col in ice:
        objects[_disc(shape, row, col, 12)] = 1.0
    for mask in crystals:
        objects[mask] = 1.0
    contrast = -0.4 if polarity == "bright" else 0.4
    image = 2000.0 * (1.0 + contrast * ndimage.gaussian_filter(objects, 1.2)) + rng.normal(0, 15, shape)
    regions = np.ones(shape, dtype=np.int32)
    table = find_objects(image, objects == 0, regions, np.zeros(shape, dtype=bool))
    assert table is not None
    centres = np.stack([table.row_px, table.col_px], 1)
    assert table.dropped.get("round") == len(ice)
    for row, col in ice:
        assert np.min(np.hypot(centres[:, 0] - row, centres[:, 1] - col)) > 20, "an ice ball was kept"
    for mask in crystals:
        row, col = np.argwhere(mask).mean(axis=0)
        assert np.min(np.hypot(centres[:, 0] - row, centres[:, 1] - col)) < 2, "a faceted crystal was dropped"
    kept = find_objects(image, objects == 0, regions, np.zeros(shape, dtype=bool), drop_round=False)
    assert kept is not None and len(kept) == len(ice) + len(crystals)


def test_a_crystal_touching_an_ice_ball_is_kept() -> None:
    """The round test judges single objects only: a ball touching a hexagon is split, not dropped."""
    from scipy import ndimage

    rng = np.random.default_rng(8)
    shape = (200, 200)
    objects = np.zeros(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - 100.0) ** 2 + (xx - 80.0) ** 2) / 22.0**2
    od = 1.5 * np.sqrt(np.clip(1 - r2, 0, 1))  # an ice ball
    hexagon = _polygon_mask(shape, 100, 118, 16, 6, 0.0)
    od[hexagon] = np.maximum(od[hexagon], 0.5)
    image = 2000.0 * np.exp(-ndimage.gaussian_filter(od, 1.0)) + rng.normal(0, 15, shape)
    objects = od > 0
    table = find_objects(image, ~objects, np.ones(shape, dtype=np.int32), np.zeros(shape, dtype=bool))
    assert table is not None and not table.dropped
    centres = np.stack([table.row_px, table.col_px], 1)
    assert np.min(np.hypot(centres[:, 0] - 100, centres[:, 1] - 118)) < 6, "the hexagon must stay a candidate"


def test_lone_noisy_pixels_do_not_decide_the_polarity() -> None:
    """A bright-field image with one bright tear and three faint dark crystals: too few objects of either
    sign to decide, so both signs make objects and the crystals are kept."""
    rng = np.random.default_rng(9)
    shape = (512, 512)
    image = rng.normal(1000.0, 10.0, shape)
    image[_disc(shape, 100, 100, 30)] += 200.0  # a tear in the film: brighter
    crystals = [(300, 300), (400, 150), (200, 400)]
    for row, col in crystals:
        image[_polygon_mask(shape, row, col, 12, 6, 0.0)] -= 150.0
    table = find_objects(image, np.ones(shape, dtype=bool), np.ones(shape, dtype=np.int32), np.zeros(shape, bool))
    assert table is not None and table.polarity == "both"
    centres = np.stack([table.row_px, table.col_px], 1)
    for row, col in crystals:
        assert np.min(np.hypot(centres[:, 0] - row, centres[:, 1] - col)) < 2


def test_each_region_gives_its_first_object_before_any_region_gives_a_second() -> None:
    """A row of dark blobs close enough to make one candidate region holds several objects that share the
    region's score; they must not take every target slot before a fainter crystal elsewhere gets one."""
    rng = np.random.default_rng(4)
    shape = (256, 256)
    transmission = np.ones(shape)
    row_of_blobs = np.zeros(shape, dtype=bool)
    for k in range(5):
        row_of_blobs |= _disc(shape, 70, 60 + 14 * k, 5)  # 4 px gaps: one region, five objects
    transmission[row_of_blobs] = 0.55
    plate = _polygon_mask(shape, 180, 170, 9, 6, 0.2)
    transmission[plate] = 0.8
    image = np.clip(rng.poisson(4000 * transmission).astype(np.float64), 0, 65535).astype(np.uint16)
    settings = LocateSettings(mode="window", window_px=9, stride_px=2, k=3, max_candidates=2, min_spacing_px=6)
    analysis = analyse(image, settings)
    labels = analysis.to_pixels(analysis.label_grid)
    crystal = sorted({int(v) for v in labels[row_of_blobs | plate]} - {analysis.background_cluster, -1})
    everything = find_candidates(analysis, crystal, settings.model_copy(update={"max_candidates": 10_000}), image=image)
    assert sum(row_of_blobs[round(c.row_px), round(c.col_px)] for c in everything) == 5
    top_two = find_candidates(analysis, crystal, settings, image=image)
    assert len(top_two) == 2
    assert sum(row_of_blobs[round(c.row_px), round(c.col_px)] for c in top_two) == 1
    assert sum(plate[round(c.row_px), round(c.col_px)] for c in top_two) == 1


def test_a_prepared_image_given_once_gives_the_same_candidates_and_is_not_changed() -> None:
    from agent.locate.preprocess import prepare_image

    image = make_grid_image(seed=4).image
    settings = LocateSettings(mode="window", window_px=15, stride_px=4, k=4)
    analysis = analyse(image, settings)
    prepared = prepare_image(image, analysis.bar_mask, flatten=settings.flatten, clean=settings.clean)
    before = prepared.copy()
    for clusters in ([c.cluster_id for c in analysis.clusters[1:]], analysis.suggested_crystal_clusters):
        expected = find_candidates(analysis, clusters, settings, image=image)
        assert expected and find_candidates(analysis, clusters, settings, image=image, prepared=prepared) == expected
    assert np.array_equal(prepared, before)


def test_noise_over_a_film_patch_a_little_off_is_flat_a_faint_crystal_is_not() -> None:
    """Where the flattening leaves the film a few sigmas off, mottle and noise cross the 4-sigma threshold in
    clusters that stand only 1-2 sigmas above their own surroundings (17 false candidates on a crystal-free 4k
    dark-field image); faint plates, 6 sigmas above the film around them, are kept."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    shape = (300, 300)
    mottle = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 3.0)
    image = 1000.0 + rng.normal(0.0, 10.0, shape) + 10.0 * mottle / mottle.std()
    sigma = float(ndimage.gaussian_filter(image, 1.0).std())  # sigmas are counted after the locator's smoothing
    image[20:80, 20:200] -= 3.0 * sigma  # a patch of film 3 sigmas darker than the rest
    plates = [(150, 60), (160, 150), (150, 240), (240, 60), (250, 150), (240, 240)]
    for row, col in plates:
        image[_polygon_mask(shape, row, col, 9, 4, 0.3)] -= 6.0 * sigma  # faint plates
    regions = np.ones(shape, dtype=np.int32)
    table = find_objects(image, np.ones(shape, dtype=bool), regions, np.zeros(shape, dtype=bool))
    assert table is not None and table.polarity == "dark"
    centres = np.stack([table.row_px, table.col_px], 1)
    for row, col in plates:
        assert np.min(np.hypot(centres[:, 0] - row, centres[:, 1] - col)) < 5.0
    assert not (table.row_px < 90).any(), table.dropped
    assert table.dropped.get("flat", 0) > 0
