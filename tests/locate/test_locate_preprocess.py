"""Clean-up before features: hot/dead pixels, stripes, illumination, masked areas."""

from __future__ import annotations

import numpy as np

from agent.locate.preprocess import (
    flatten_illumination,
    noise_sigma,
    prepare_image,
    remove_outlier_pixels,
    remove_stripes,
)


def test_hot_and_dead_pixels_are_replaced_including_corners_and_band_edges() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(1000, 10, (300, 200))
    spots = [(0, 0), (150, 100), (299, 199), (64, 5), (63, 7)]
    values = [5000, 5000, -3000, 9000, 0]
    for (r, c), v in zip(spots, values, strict=True):
        data[r, c] = v
    clean_before = data.copy()
    assert remove_outlier_pixels(data, noise_sigma(data)) == len(spots)
    for r, c in spots:
        assert abs(data[r, c] - 1000) < 60
    untouched = np.ones(data.shape, dtype=bool)
    untouched[tuple(np.array(spots).T)] = False
    np.testing.assert_array_equal(data[untouched], clean_before[untouched])


def test_bright_column_and_uneven_light_are_removed() -> None:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:256, 0:256]
    light = 1.0 + 0.4 * (xx / 256.0) - 0.3 * ((yy - 128) / 256.0) ** 2
    data = 1000.0 * light + rng.normal(0, 5, (256, 256))
    data[:, 77] *= 1.25
    assert remove_stripes(data) >= 1
    assert abs(np.median(data[:, 77]) / np.median(data[:, 78]) - 1) < 0.02
    level = flatten_illumination(data, np.zeros(data.shape, dtype=bool))
    assert level > 0
    assert data[:, 10:40].mean() / data[:, 210:240].mean() == np.float64(
        np.clip(data[:, 10:40].mean() / data[:, 210:240].mean(), 0.97, 1.03)
    )


def test_masked_pixels_take_the_film_level() -> None:
    image = np.full((64, 64), 20000, dtype=np.uint16)
    image[:, :10] = 100
    mask = np.zeros(image.shape, dtype=bool)
    mask[:, :10] = True
    prepared = prepare_image(image, mask)
    assert prepared.dtype == np.float64
    np.testing.assert_allclose(prepared[:, :12], 20000, rtol=1e-6)


def test_tilted_bar_edge_under_uneven_light_is_not_taken_for_stripes() -> None:
    """Columns next to a tilted bar keep different rows unmasked; under a beam that falls off from top to
    bottom their plain medians differ by several percent although no column has its own gain."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:512, 0:512]
    light = 1.0 - 0.5 * (yy / 512.0)
    data = 10000.0 * light * (1 + rng.normal(0, 0.01, yy.shape))
    bar = xx > 300 + 0.25 * yy  # edge drifts one column every four rows
    data[bar] = 100.0
    untouched = data.copy()
    assert remove_stripes(data, bar) == 0
    np.testing.assert_array_equal(data, untouched)
    striped = untouched.copy()
    striped[:, 120] *= 1.06  # a real bright column is still found on the same image
    assert remove_stripes(striped, bar) >= 1
    assert abs(np.median(striped[:, 120]) / np.median(striped[:, 121]) - 1) < 0.01


def test_low_dose_counts_are_not_taken_for_stripes() -> None:
    """At a few counts per pixel most column medians are the same integer: the gains' own spread is then
    zero, and only each median's standard error tells a stripe from noise."""
    rng = np.random.default_rng(2)
    data = rng.poisson(10, (512, 512)).astype(np.float64)
    untouched = data.copy()
    assert remove_stripes(data) == 0
    np.testing.assert_array_equal(data, untouched)


def test_a_stripe_several_columns_wide_is_removed_and_its_neighbours_are_left_alone() -> None:
    rng = np.random.default_rng(5)
    clean = rng.normal(1000, 18, (512, 512))
    data = clean.copy()
    data[:, 200:204] *= 1.08
    assert remove_stripes(data) == 4
    leftover = np.abs(np.median(data / clean, axis=0) - 1)
    assert leftover.max() < 0.005
    np.testing.assert_array_equal(data[:, :200], clean[:, :200])
    np.testing.assert_array_equal(data[:, 204:], clean[:, 204:])


def test_a_crystal_wider_than_the_background_fit_stays_dark_to_its_middle() -> None:
    """A plate filling much of a search frame: its middle was flattened towards the film level (the background
    there fell back to the first pass, which the plate had pulled down); the film around it stands in now. (A
    plate of half the frame still flattens away: the fit's width is a twelfth of the frame.)"""
    rng = np.random.default_rng(0)
    image = rng.normal(4000.0, 40.0, (512, 512))
    image[196:316, 196:316] *= 0.35  # a thick plate, 120 px a side (the background fit's width is 42 px)
    prepared = prepare_image(image, np.zeros(image.shape, dtype=bool))
    film = float(np.median(prepared[:100]))
    middle = float(np.median(prepared[246:266, 246:266]))
    rim = float(np.median(prepared[200:208, 200:312]))
    # measured: middle and rim 0.35 of the film now; before, the middle 0.60 and the rim 0.48
    assert middle < 0.4 * film
    assert abs(middle - rim) < 0.03 * film


def test_a_saturated_column_and_row_are_repaired_and_a_clipped_area_is_left_alone() -> None:
    """An 8-bit export clips a bright readout column at 255: its gain is lost, so the stripe clean-up left it a
    bright line across the frame (it swung the objects' polarity vote on a 4k 8-bit image)."""
    from agent.locate.preprocess import repair_saturated_lines

    rng = np.random.default_rng(4)
    image = np.clip(rng.normal(200.0, 6.0, size=(300, 400)), 0, 254).astype(np.uint8)
    image[:, 123] = 255  # a clipped column
    image[77, :] = 255  # a clipped row
    image[200:260, 300:380] = 255  # a clipped area: film too bright for the export, not a line
    mask = np.zeros(image.shape, dtype=bool)
    mask[:40] = True  # a bar: its pixels do not count
    data = image.astype(np.float64)
    assert repair_saturated_lines(data, image, mask) == 2
    assert abs(float(np.median(data[:, 123])) - 200.0) < 3.0
    assert abs(float(np.median(data[77, :300])) - 200.0) < 3.0
    assert np.all(data[200:260, 310:370] == 255)  # the area is untouched
    untouched = np.ones(image.shape, dtype=bool)
    untouched[:, 123] = untouched[77, :] = False
    assert np.array_equal(data[untouched], image[untouched])


def test_float_images_have_no_saturated_lines() -> None:
    from agent.locate.preprocess import repair_saturated_lines

    image = np.full((64, 64), 100.0)
    image[:, 10] = 200.0
    data = image.copy()
    assert repair_saturated_lines(data, image, np.zeros(image.shape, dtype=bool)) == 0
    assert np.array_equal(data, image)
