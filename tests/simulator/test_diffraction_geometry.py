"""Diffraction patterns drawn from the cached geometry are the same, bit for bit, as patterns computed afresh."""

from __future__ import annotations

import numpy as np
import pytest

from simulator import diffraction
from simulator.diffraction import px_per_inverse_angstrom, render_diffraction
from simulator.imaging import CameraModel, SimPreset, electrons_to_counts
from simulator.microscope import default_presets
from simulator.specimen import Specimen, generate_specimen


def _fresh_pattern(specimen: Specimen, xy_um: tuple[float, float], preset: SimPreset, camera: CameraModel,
                   seed: int, exposure_s: float) -> np.ndarray:
    """The pattern with every array computed for this call (the renderer before its geometry cache)."""
    rows, cols = camera.frame_shape(preset.optics.binning)
    cr, cc = (rows - 1) / 2.0, (cols - 1) / 2.0
    scale = px_per_inverse_angstrom(preset)
    r_px = np.hypot(np.arange(rows, dtype=np.float32)[:, None] - cr, np.arange(cols, dtype=np.float32)[None, :] - cc)
    g = r_px / np.float32(scale)
    electrons = np.zeros((rows, cols), dtype=np.float32)
    contents = diffraction.beam_contents(specimen, xy_um[0], xy_um[1], preset.beam_diameter_um)
    electrons += np.float32(2000.0 * (1.0 - float(contents["bar"]))) * np.exp(-r_px / np.float32(25.0))
    film = float(contents["film"]) * float(contents["film_thickness_nm"]) / 20.0
    ice = float(contents["ice"]) * 3.0
    for centre, width, weight in ((1 / 2.1, 0.06, film), (1 / 1.2, 0.1, 0.5 * film), (1 / 3.7, 0.05, ice),
                                  (1 / 2.25, 0.06, 0.6 * ice)):
        if weight > 0:
            electrons += np.float32(25.0 * weight) * np.exp(-(((g - np.float32(centre)) / np.float32(width)) ** 2))
    for cid, fraction in contents["crystals"].items():
        diffraction._add_bragg_spots(electrons, specimen, cid, fraction, scale, (cr, cc))
    electrons[diffraction._beam_stop_mask((rows, cols))] = 0.0
    electrons *= np.float32(exposure_s)
    return electrons_to_counts(electrons, camera, np.random.default_rng(seed))


@pytest.mark.parametrize("specimen_type", ["graphite-flakes", "protein-plates", "asbestos-fibres", "polymer-faint"])
def test_cached_geometry_gives_the_fresh_pattern(specimen_type: str) -> None:
    specimen = generate_specimen(specimen_type, 2)
    camera = CameraModel(shape_px=(256, 256))
    presets = {p.optics.name: p for p in default_presets((256, 256))}
    crystals = specimen.crystals
    positions = [(float(crystals["x_um"][i]), float(crystals["y_um"][i])) for i in range(3)] + [(0.0, 0.0)]
    positions += [(float(specimen.ice["x_um"][i]), float(specimen.ice["y_um"][i])) for i in range(2)]  # ice rings
    for k, xy in enumerate(positions):
        preset = presets[("search", "exposure")[k % 2]]
        fresh = _fresh_pattern(specimen, xy, preset, camera, k, 0.5 + k)
        cached = render_diffraction(specimen, xy, preset, camera, np.random.default_rng(k), exposure_s=0.5 + k)
        again = render_diffraction(specimen, xy, preset, camera, np.random.default_rng(k), exposure_s=0.5 + k)
        assert cached.dtype == fresh.dtype == np.uint16
        np.testing.assert_array_equal(cached, fresh)
        np.testing.assert_array_equal(again, fresh)


def test_the_geometry_is_read_only_and_kept_per_shape_and_scale() -> None:
    geometry = diffraction._pattern_geometry((64, 48), 100.0)
    assert diffraction._pattern_geometry((64, 48), 100.0) is geometry
    assert diffraction._pattern_geometry((64, 48), 50.0) is not geometry
    ring = geometry.ring(1 / 2.1, 0.06)
    assert geometry.ring(1 / 2.1, 0.06) is ring and ring.shape == (64, 48) and ring.dtype == np.float32
    for array in (geometry.halo, geometry.beam_stop, ring):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 0
