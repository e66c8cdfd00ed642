"""Diffraction patterns drawn from the cached geometry are the same, bit for bit, as patterns computed afresh."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_simulator import plain_diffraction  # the renderer with no geometry cache
from simulator import diffraction
from simulator.diffraction import render_diffraction
from simulator.imaging import CameraModel
from simulator.microscope import default_presets
from simulator.specimen import generate_specimen


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
        fresh = plain_diffraction(specimen, xy, preset, camera, np.random.default_rng(k), 0.5 + k)
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
