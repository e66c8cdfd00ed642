"""Confirmation at the search preset finds the object at the centre whatever its polarity or size."""

from __future__ import annotations

import numpy as np
import pytest

from agent.steps.object_near_centre import find_object_near_centre


def _film(seed: int, size: int = 256, level: float = 3000.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    illumination = 1.0 + 0.15 * (xx / size) - 0.1 * (yy / size)  # uneven illumination
    return level * illumination, rng


def _poisson(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(np.clip(signal, 0, None)).astype(np.uint16)


@pytest.mark.parametrize("dark_field", [False, True])
def test_a_plate_near_the_centre_is_found_in_either_polarity(dark_field: bool) -> None:
    signal, rng = _film(0)
    yy, xx = np.mgrid[:256, :256]
    plate = (np.abs(xx - 140) < 25) & (np.abs(yy - 120) < 15)
    signal = signal * (1.3 if dark_field else 0.7) ** plate
    found = find_object_near_centre(_poisson(signal, rng), radius_px=60, min_contrast_sigma=3)
    assert found is not None
    assert abs(found.col_px - 140) < 2 and abs(found.row_px - 120) < 2
    assert found.contrast_sigma > 5


def test_empty_film_is_rejected() -> None:
    signal, rng = _film(1)
    assert find_object_near_centre(_poisson(signal, rng), radius_px=60, min_contrast_sigma=3) is None


def test_an_object_larger_than_the_field_counts_when_the_centre_is_on_it() -> None:
    signal, rng = _film(2)
    yy, xx = np.mgrid[:256, :256]
    flake = xx + yy > 180  # covers the centre and most of the frame
    found = find_object_near_centre(_poisson(signal * 0.75**flake, rng), radius_px=20, min_contrast_sigma=3)
    assert found is not None and found.touches_border


def test_grid_bar_in_view_is_never_the_target() -> None:
    signal, rng = _film(3)
    _yy, xx = np.mgrid[:256, :256]
    bar = xx < 100
    image = _poisson(signal * np.where(bar, 0.02, 1.0), rng)
    assert find_object_near_centre(image, radius_px=60, min_contrast_sigma=3, exclude_mask=bar) is None
    # without the bar mask, the bar's edge would be taken for an object
    assert find_object_near_centre(image, radius_px=60, min_contrast_sigma=3) is not None


def test_the_nearest_of_several_objects_wins_and_far_ones_are_ignored() -> None:
    signal, rng = _film(4)
    yy, xx = np.mgrid[:256, :256]
    near = np.hypot(xx - 135, yy - 130) < 10
    far = np.hypot(xx - 30, yy - 30) < 20  # an ice ball in the corner
    image = _poisson(signal * np.where(near, 0.6, 1.0) * np.where(far, 0.2, 1.0), rng)
    found = find_object_near_centre(image, radius_px=40, min_contrast_sigma=3)
    assert found is not None and abs(found.col_px - 135) < 2
    only_far = _poisson(signal * np.where(far, 0.2, 1.0), rng)
    assert find_object_near_centre(only_far, radius_px=40, min_contrast_sigma=3) is None
    # looked for near another point of the frame (a target seen off-centre in an earlier target's image)
    found = find_object_near_centre(image, radius_px=40, min_contrast_sigma=3, point_px=(40.0, 35.0))
    assert found is not None and abs(found.col_px - 30) < 3 and abs(found.row_px - 30) < 3


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        find_object_near_centre(np.zeros((4, 4)), radius_px=3)


def test_film_known_from_the_atlas_sets_the_level_when_objects_cover_the_border() -> None:
    """Two flakes larger than the field cover most of the border; the film is only a strip between."""
    signal, rng = _film(5)
    _yy, xx = np.mgrid[:256, :256]
    left, right = xx < 110, xx > 150
    image = _poisson(signal * np.where(left | right, 0.7, 1.0), rng)
    film = (xx > 118) & (xx < 142)
    found = find_object_near_centre(image, radius_px=40, min_contrast_sigma=3, film_mask=film, min_area_px=50)
    assert found is not None
    assert left[round(found.row_px), round(found.col_px)] or right[round(found.row_px), round(found.col_px)]


def _ball(shape: tuple[int, int], row: float, col: float, radius: float) -> np.ndarray:
    """Transmission of an ice ball (a sphere of centre OD 1.5) on clear film."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - row) ** 2 + (xx - col) ** 2) / radius**2
    return np.exp(-1.5 * np.sqrt(np.clip(1 - r2, 0, 1)))


def _hexagon_plate(shape: tuple[int, int], row: float, col: float, radius: float, turn: float) -> np.ndarray:
    """Transmission of a hexagonal plate (0.6) on clear film."""
    from skimage.draw import polygon

    angles = turn + np.arange(6) * np.pi / 3
    rows, cols = polygon(row + radius * np.sin(angles), col + radius * np.cos(angles), shape)
    plate = np.ones(shape)
    plate[rows, cols] = 0.6
    return plate


def test_a_round_ball_is_flagged_and_a_faceted_plate_is_not() -> None:
    """At search magnification an ice ball (a sphere: round, darker towards its centre) is told from a
    hexagonal plate of the same size and contrast by its outline."""
    rng = np.random.default_rng(5)
    ball = _ball((256, 256), 128.0, 128.0, 40.0)
    found = find_object_near_centre(_poisson(400.0 * ball, rng), radius_px=60, min_contrast_sigma=3)
    assert found is not None and found.round_outline

    plate = _hexagon_plate((256, 256), 128, 128, 42, turn=0.2)
    found = find_object_near_centre(_poisson(400.0 * plate, rng), radius_px=60, min_contrast_sigma=3)
    assert found is not None and not found.round_outline


def test_a_small_faceted_crystal_on_a_large_frame_is_not_called_round() -> None:
    """On a 2048 px frame the object is found after an 8 px smoothing; the outline test must not see that
    blur, or a hexagon of 20 px radius loses its corners and is rejected as ice."""
    rng = np.random.default_rng(6)
    plate = _hexagon_plate((2048, 2048), 1024, 1024, 20, turn=0.2)
    found = find_object_near_centre(_poisson(400.0 * plate, rng), radius_px=200, min_contrast_sigma=3)
    assert found is not None and not found.round_outline


def test_a_crystal_touching_an_ice_ball_is_not_called_round() -> None:
    rng = np.random.default_rng(7)
    # a hexagon touching the ball
    image = np.minimum(_ball((256, 256), 128.0, 128.0, 22.0), _hexagon_plate((256, 256), 128, 166, 16, turn=0.0))
    found = find_object_near_centre(_poisson(400.0 * image, rng), radius_px=60, min_contrast_sigma=3)
    assert found is not None and not found.round_outline


def test_points_on_the_object_found_are_reported_so_one_object_is_snapped_once() -> None:
    signal, rng = _film(5)
    yy, xx = np.mgrid[:256, :256]
    needle = (np.abs(yy - 128) < 5) & (np.abs(xx - 128) < 90)  # one long crystal through the centre
    other = np.hypot(xx - 60, yy - 200) < 10  # a separate one
    image = _poisson(signal * np.where(needle, 0.6, 1.0) * np.where(other, 0.6, 1.0), rng)
    points = [(60.0, 127.0), (200.0, 131.0), (60.0, 200.0), (128.0, 60.0), (-5.0, 128.0)]
    found = find_object_near_centre(image, radius_px=40, min_contrast_sigma=3, others_px=points)
    assert found is not None and abs(found.row_px - 128) < 2
    assert found.holds == (0, 1)  # both ends of the needle; not the other crystal, the film, or off the frame
    assert find_object_near_centre(image, radius_px=40, min_contrast_sigma=3).holds == ()
