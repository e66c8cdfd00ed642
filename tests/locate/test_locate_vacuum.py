"""Holes in the support film (`agent.locate.vacuum`): found in bright field, masked like bars, and not
confused with film that thickens, the beam's fall-off, montage seams or dark field."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from agent.locate.analysis import LocateSettings, analyse, bar_and_black_mask
from agent.locate.targets import find_candidates
from agent.locate.vacuum import vacuum_mask
from tests.synthetic_images import make_grid_image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("bit_depth", [16, 8])
def test_a_torn_film_hole_is_found_in_bright_field(bit_depth: int) -> None:
    scene = make_grid_image(seed=0, torn_film_hole=True, bit_depth=bit_depth)
    bars, _ = bar_and_black_mask(scene.image, LocateSettings())
    found = vacuum_mask(scene.image, bars)
    assert scene.hole_mask is not None
    assert _iou(found, scene.hole_mask) > 0.85
    assert not (found & bars).any()


@pytest.mark.parametrize(
    "options",
    [
        {},  # film that thickens smoothly, uneven illumination, readout artefacts, data bar
        {"tile_seams": True},  # mis-stitched tiles of different gain: a sharp, straight step
        {"polarity": "dark"},
        {"bit_depth": 8, "uneven_illumination": 0.4},
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_no_film_is_taken_for_vacuum(options: dict, seed: int) -> None:
    scene = make_grid_image(seed=seed, **options)
    bars, _ = bar_and_black_mask(scene.image, LocateSettings())
    assert not vacuum_mask(scene.image, bars).any()


def test_a_hole_is_masked_and_leaves_no_targets_along_its_edge() -> None:
    """Masked, the hole leaves no target along its edge and the crystals on the film are still found. (Without
    the mask the flattening spread the hole's brightness onto the film around it and the darker band became a
    row of false targets; since the film level and noise are measured on all the film outside the candidate
    regions, that band no longer stands out on this image either, so the unmasked run is only checked to run.)"""
    scene = make_grid_image(seed=2, torn_film_hole=True)
    assert scene.hole_mask is not None
    near_edge = ndimage.binary_dilation(scene.hole_mask, iterations=25) & ~ndimage.binary_erosion(
        scene.hole_mask, iterations=3
    )
    counts = {}
    for mask_vacuum in (False, True):
        settings = LocateSettings(mode="window", window_px=15, stride_px=4, k=3, mask_vacuum=mask_vacuum)
        analysis = analyse(scene.image, settings)
        candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, settings, image=scene.image)
        counts[mask_vacuum] = sum(near_edge[round(c.row_px), round(c.col_px)] for c in candidates)
        if mask_vacuum:
            assert analysis.vacuum_mask is not None and _iou(analysis.vacuum_mask, scene.hole_mask) > 0.85
            assert analysis.bar_mask[scene.hole_mask].mean() > 0.95  # to within a block of its edge
            found = sum(
                any(np.hypot(c.row_px - p.row_px, c.col_px - p.col_px) <= p.radius_px + 3 for c in candidates)
                for p in scene.crystals
            )
            assert found >= len(scene.crystals) - 1  # the crystals on the film are still found
        else:
            assert analysis.vacuum_mask is None
    assert counts[True] == 0
