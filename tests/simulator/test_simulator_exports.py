"""8-bit exports with a burned-in data bar (simulator.exports), a montage of them served as tiles, and the
shared test image made from them (tests.synthetic_images.make_simulated_export)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from simulator import create_simulated_microscope
from simulator.exports import export_8bit, nice_length_um, stretch_8bit, write_export_montage
from simulator.tiles import TileScene
from tests.synthetic_images import make_simulated_export


@pytest.mark.parametrize("band", ["dark", "bright"])
def test_export_is_8bit_stretched_with_a_data_bar_and_scale_bar(band: str) -> None:
    image = np.random.default_rng(0).normal(10000, 500, size=(200, 300)).clip(0, 65535).astype(np.uint16)
    exported = export_8bit(image, pixel_size_um=0.3, band=band)
    start, stop = exported.data_bar_rows
    assert exported.image.dtype == np.uint8 and exported.image.shape == image.shape
    assert stop == 200 and 12 <= stop - start <= 20
    np.testing.assert_array_equal(exported.image[:start], stretch_8bit(image)[0][:start])
    bar_area = exported.image[start:]
    background, ink = (8, 250) if band == "dark" else (245, 5)
    assert set(np.unique(bar_area)) == {background, ink}
    assert 0.03 < np.mean(bar_area == ink) < 0.5  # text-like blocks and the scale bar
    assert exported.scale_bar_um == nice_length_um(0.2 * 300 * 0.3) == 10.0
    assert exported.scale_bar_px == round(10.0 / 0.3)
    longest_run = max(max((len(run) for run in "".join("1" if v == ink else " " for v in row).split()), default=0)
                      for row in bar_area)
    assert longest_run == exported.scale_bar_px  # the scale bar, longer than any glyph stroke


def test_export_montage_is_served_as_tiles_with_labels(tmp_path: Path) -> None:
    microscope = create_simulated_microscope("protein-plates", 1, camera_shape_px=(128, 128), conditions="realistic")
    centre = tuple(microscope.ground_truth.square_centres_um()[3])
    tiles = write_export_montage(microscope, tmp_path, centre_xy_um=centre, grid=(2, 2))
    scene = TileScene.open(tmp_path)
    assert scene.montage.dtype == np.uint8 and len(scene.montage.pieces) == 4
    assert scene.pixel_size_um == pytest.approx(0.3)
    frame = scene.transmission((0.0, 0.0), np.eye(2) * 0.3, (64, 64), 0.3)
    assert frame.max() > 0.5
    with (tmp_path / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(len(t["crystals"]) for t in tiles) > 0
    for row in rows:
        tile = next(t for t in tiles if t["file"] == row["image"])
        assert float(row["row_px"]) < tile["data_bar_rows"][0]


def test_simulated_export_test_image_has_its_truth() -> None:
    image = make_simulated_export(192, seed=2, band="bright")
    assert image.image.dtype == np.uint8 and image.data_bar_rows is not None
    start = image.data_bar_rows[0]
    assert np.all(np.isin(image.image[start:], (245, 5)))
    assert image.bar_mask.shape == image.image.shape
    if image.bar_mask[:start].any():
        assert np.median(image.image[:start][image.bar_mask[:start]]) < 30  # bars are dark
    assert all(c.row_px < start for c in image.crystals)
