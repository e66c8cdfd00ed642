"""Montage seams are found and flattened tile by tile; masks do not leak into the flattened film; a mottled film
keeps the objects' polarity. Every image is a real-world-like synthetic one (`tests.synthetic_images`)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.locate.analysis import LocateSettings, analyse, bar_and_black_mask
from agent.locate.preprocess import flatten_illumination
from agent.locate.seams import Seams, find_seams, seam_band, tile_labels
from agent.locate.targets import find_candidates
from tests.synthetic_images import make_grid_image

SIZE = 1024
GRID = {"bar_pitch_px": 300 * SIZE / 768, "bar_width_px": 70 * SIZE / 768}


def _seams_of(**kwargs: object) -> Seams:
    scene = make_grid_image((SIZE, SIZE), **GRID, **kwargs)  # type: ignore[arg-type]
    mask, _angle = bar_and_black_mask(scene.image, LocateSettings())
    return find_seams(scene.image, mask)


@pytest.mark.parametrize(("seed", "bit_depth"), [(0, 16), (1, 16), (0, 8)])
def test_the_seams_of_a_two_by_two_montage_are_found_where_the_tiles_meet(seed: int, bit_depth: int) -> None:
    # the generator's tiles meet at half the size, and the stitching shift rolls the frame 3 px to the right
    seams = _seams_of(seed=seed, tile_seams=True, bit_depth=bit_depth)
    assert set(seams.columns) == {3, SIZE // 2 + 3}
    assert set(seams.rows) == {SIZE // 2}


@pytest.mark.parametrize(
    "conditions",
    [
        {},
        {"bit_depth": 8},
        {"polarity": "dark"},
        {"bit_depth": 8, "polarity": "dark"},  # dim 8-bit film: its grey levels are a few % apart
        {"torn_film_hole": True},
        {"bar_angle_deg": 0.0},
        {"n_ice": 10},
        {"film_grain": 0.03},
    ],
)
def test_images_without_seams_have_none_bright_columns_and_axis_parallel_bars_included(
    conditions: dict[str, object],
) -> None:
    for seed in (0, 1):
        assert not _seams_of(seed=seed, **conditions), (seed, conditions)


def test_tiles_and_bands_follow_the_seams() -> None:
    seams = Seams(shape=(40, 60), columns=(3, 30), rows=(20,))
    tiles = tile_labels(seams)
    assert len(np.unique(tiles)) == 6
    assert tiles[0, 0] != tiles[0, 3] and tiles[0, 29] != tiles[0, 30] and tiles[19, 10] != tiles[20, 10]
    band = seam_band(seams, 2)
    assert band[:, 28:32].all() and band[18:22, :].all()
    assert band[:, :3].all()  # the 3-px sliver between the frame and a seam
    assert not band[:, 10].all()


def test_a_bright_data_bar_does_not_leak_into_the_flattened_film() -> None:
    """Blocks straddling a mask used to average the masked pixels in: beside a 60000-count data bar the film
    was read several per cent too dark, a band of false objects in dark field."""
    rng = np.random.default_rng(0)
    image = rng.normal(1000.0, 10.0, size=(512, 512))
    image[480:] = 60000.0
    mask = np.zeros(image.shape, dtype=bool)
    mask[481:] = True  # the mask stops one line short of the bar's first line, as a data-bar finder may
    data = image.copy()
    mask[480] = True
    level = flatten_illumination(data, mask)
    film_beside_bar = data[440:479]
    assert abs(float(np.median(film_beside_bar)) / level - 1.0) < 0.003


def test_a_crystal_free_montage_gives_few_candidates_and_crystals_on_one_are_all_found() -> None:
    """A 2x2 montage with tiles of different gain: 48 candidates along the seams before seams were found (2048 px);
    now a few at most, on ice and debris (11 and 7 measured)."""
    settings = LocateSettings()
    for seed in (0,):
        scene = make_grid_image((SIZE, SIZE), seed, n_crystals=0, tile_seams=True, **GRID)  # type: ignore[arg-type]
        analysis = analyse(scene.image, settings)
        candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, settings, image=scene.image)
        assert len(candidates) <= 12, (seed, [(round(c.row_px), round(c.col_px)) for c in candidates])
        scene = make_grid_image((SIZE, SIZE), seed, tile_seams=True, **GRID)  # type: ignore[arg-type]
        analysis = analyse(scene.image, settings)
        candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, settings, image=scene.image)
        on_crystal = scene.crystal_mask(3)
        found = {
            min(range(len(scene.crystals)), key=lambda i: np.hypot(scene.crystals[i].row_px - c.row_px,
                                                                   scene.crystals[i].col_px - c.col_px))
            for c in candidates
            if on_crystal[int(c.row_px), int(c.col_px)]
        }
        assert len(found) >= len(scene.crystals) - 1


def test_a_mottled_film_keeps_dark_objects_dark() -> None:
    """The film level was taken from the largest cluster alone; a mottled film splits into several, and on this
    image the level of one of them made the objects' polarity bright: 1 of 12 crystals was found."""
    scene = make_grid_image((2048, 2048), 0, film_grain=0.03, bar_pitch_px=800, bar_width_px=187)
    settings = LocateSettings()
    analysis = analyse(scene.image, settings)
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, settings, image=scene.image)
    on_crystal = scene.crystal_mask(3)
    assert sum(on_crystal[int(c.row_px), int(c.col_px)] for c in candidates) >= 11


def test_block_tile_labels_are_the_tiles_of_the_block_centres() -> None:
    seams = Seams(shape=(40, 60), columns=(3, 30), rows=(20,))
    full = tile_labels(seams)
    assert np.array_equal(tile_labels(seams, 4), full[2:40:4, 2:60:4])
    assert tile_labels(seams, 7).shape == (5, 8)  # blocks that do not fill 7 px are cropped
