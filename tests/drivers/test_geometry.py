"""Image <-> stage geometry (`drivers.geometry`) and the atlas that uses it."""

from __future__ import annotations

import numpy as np

from agent.steps.atlas import Atlas
from drivers.geometry import (
    image_centre_px,
    pixel_to_stage_about_um,
    pixel_to_stage_um,
    stage_to_pixel,
    stage_to_pixel_about,
)


def _matrix() -> np.ndarray:
    angle = np.deg2rad(17.0)
    return 0.25 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1, -1])


def test_pixel_stage_round_trip_with_rotation_and_flip() -> None:
    matrix = _matrix()
    shape = (100, 200)
    np.testing.assert_array_equal(image_centre_px(shape), [99.5, 49.5])
    centre_stage = pixel_to_stage_um(np.array([99.5, 49.5]), shape, (10.0, -5.0), matrix)
    np.testing.assert_allclose(centre_stage, [10.0, -5.0])
    pixels = np.array([[0.0, 0.0], [199.0, 99.0], [13.0, 71.0]])
    back = stage_to_pixel(pixel_to_stage_um(pixels, shape, (10.0, -5.0), matrix), shape, (10.0, -5.0), matrix)
    np.testing.assert_allclose(back, pixels, atol=1e-9)


def test_reference_pixel_form_matches_the_image_centre_form() -> None:
    matrix = _matrix()
    pixels = np.random.default_rng(0).uniform(0, 200, (50, 2))
    about_centre = pixel_to_stage_about_um(pixels, image_centre_px((100, 200)), (3.0, 4.0), matrix)
    np.testing.assert_array_equal(about_centre, pixel_to_stage_um(pixels, (100, 200), (3.0, 4.0), matrix))
    back = stage_to_pixel_about(about_centre, (99.5, 49.5), (3.0, 4.0), matrix)
    np.testing.assert_array_equal(back, stage_to_pixel(about_centre, (100, 200), (3.0, 4.0), matrix))


def test_atlas_maps_with_the_same_arithmetic() -> None:
    """Bit for bit what the atlas computed with its own arithmetic before it used `drivers.geometry`."""
    matrix = _matrix()
    atlas = Atlas(np.zeros((100, 120), np.uint16), "atlas", matrix, (12.5, -3.25), (60.3, 49.5))
    pixels = np.random.default_rng(1).uniform(0, 120, (100, 2))
    expected = np.asarray((12.5, -3.25)) + (pixels - np.asarray((60.3, 49.5))) @ matrix.T
    np.testing.assert_array_equal(atlas.pixel_to_stage_um(pixels), expected)
    expected_back = np.asarray((60.3, 49.5)) + (expected - np.asarray((12.5, -3.25))) @ np.linalg.inv(matrix).T
    np.testing.assert_array_equal(atlas.stage_to_pixel(expected), expected_back)
