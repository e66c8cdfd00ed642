"""The simulated instrument: its optics errors and name come from `instrument_seed`, not the specimen seed."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.base import InvalidParameterError
from simulator import create_simulated_microscope

PRESETS = ("overview", "atlas", "search", "exposure")


def test_the_instrument_seed_decides_the_optics_errors() -> None:
    grid_a = create_simulated_microscope("protein-plates", seed=1, camera_shape_px=(64, 64))
    grid_b = create_simulated_microscope("graphite-flakes", seed=2, camera_shape_px=(64, 64))
    other = create_simulated_microscope("protein-plates", seed=1, camera_shape_px=(64, 64), instrument_seed=3)
    assert grid_a.info().name == grid_b.info().name == "simulated-tem"
    assert other.info().name == "simulated-tem-3"
    for preset in PRESETS:
        np.testing.assert_array_equal(
            grid_a.true_image_to_stage_matrix(preset), grid_b.true_image_to_stage_matrix(preset)
        )
        assert not np.allclose(grid_a.true_image_to_stage_matrix(preset), other.true_image_to_stage_matrix(preset))
    grid_a.set_preset("atlas")
    assert grid_a.acquire(0.1).metadata.instrument == "simulated-tem"


def test_the_default_instrument_has_clear_camera_errors() -> None:
    """Instrument 0 (everyone's default) must need a calibration: a few degrees and a percent or more."""
    scope = create_simulated_microscope("protein-plates", seed=0, camera_shape_px=(64, 64))
    for preset in PRESETS:
        matrix = scope.true_image_to_stage_matrix(preset)
        rotation_deg = np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))
        scale = np.sqrt(abs(np.linalg.det(matrix))) / scope.info().preset(preset).pixel_size_um
        assert abs(rotation_deg) > 2.0
        assert abs(scale - 1.0) > 0.009


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_instrument_seed_is_refused(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="instrument_seed"):
        create_simulated_microscope("protein-plates", seed=0, camera_shape_px=(64, 64), instrument_seed=bad)  # type: ignore[arg-type]
