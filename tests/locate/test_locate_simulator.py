"""The locator on simulator frames with ground truth: atlas and search presets, every specimen type."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

from agent.commands.locate import candidates_to_stage
from agent.locate.analysis import LocateSettings, analyse
from agent.locate.targets import find_candidates
from drivers.geometry import pixel_to_stage_um

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope

ALL_TYPES = ("graphite-flakes", "asbestos-fibres", "protein-plates", "polymer-faint")
ATLAS = LocateSettings(mode="window", window_px=15, stride_px=4)
# at search magnification crystals are tens of windows wide: faint ones are found by their straight edges
# (lines of 41 px = 1.6 um at the simulator's 0.04 um/px, about the shortest facet of its crystals)
SEARCH = LocateSettings(mode="window", window_px=31, stride_px=8, outline_length_px=41)


def _frame(scope: SimulatedMicroscope, preset: str, centre_on_crystal: bool):
    scope.set_preset(preset)
    squares = scope.ground_truth.square_centres_um()
    x_um, y_um = squares[len(squares) // 2]
    if centre_on_crystal:
        for sx, sy in squares[len(squares) // 2 :]:
            # a crystal thin enough for diffraction: a nearly opaque one (simulator.thickness) is masked as a
            # black area at search magnification, which is what a thick crystal deserves
            box = scope.ground_truth.crystals_in_box(sx - 50, sx + 50, sy - 50, sy + 50)
            nearby = [c for c in box if c.contrast < 0.7]
            if nearby:
                x_um, y_um = nearby[0].x_um, nearby[0].y_um
                break
        else:
            pytest.fail("the simulator should put crystals on intact squares")
    scope.move_stage(x_um=float(x_um), y_um=float(y_um))
    frame = scope.acquire(0.5)
    return scope, frame, scope.true_image_to_stage_matrix(preset)


def _truth_in_view(scope, frame, matrix, margin_um: float):
    shape = frame.image.shape
    stage = scope.true_stage_xy_um()  # where the specimen really is (backlash, repeat error), as the evaluation does
    corners = np.array([[0, 0], [shape[1] - 1, 0], [0, shape[0] - 1], [shape[1] - 1, shape[0] - 1]], float)
    xy = pixel_to_stage_um(corners, shape, stage, matrix)
    inside = scope.ground_truth.crystals_in_box(
        xy[:, 0].min() + margin_um, xy[:, 0].max() - margin_um, xy[:, 1].min() + margin_um, xy[:, 1].max() - margin_um
    )
    rows, cols = np.mgrid[0 : shape[0] : 4, 0 : shape[1] : 4]
    pix = np.stack([cols.ravel(), rows.ravel()], 1)
    bars = scope.ground_truth.bar_mask_xy(*pixel_to_stage_um(pix, shape, stage, matrix).T).reshape(rows.shape)
    return inside, bars


def _evaluate(scope: SimulatedMicroscope, preset: str, settings: LocateSettings, tolerance_um: float):
    """Locate on one frame of `scope` at `preset`: (found, in view, candidates, crystal id per candidate, bar IoU,
    bar fraction)."""
    scope, frame, matrix = _frame(scope, preset, centre_on_crystal=preset == "search")
    analysis = analyse(np.asarray(frame.image), settings)
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, image=np.asarray(frame.image))
    # scored where the specimen really is: at search magnification the stage's repeat error (about 1 um)
    # is larger than a fibre is wide, and the locator cannot know it
    candidates = candidates_to_stage(candidates, frame.image.shape, scope.true_stage_xy_um(), matrix)
    inside, true_bars = _truth_in_view(scope, frame, matrix, margin_um=2.0 if preset == "atlas" else 0.5)
    xs = np.array([c.x_um for c in candidates])
    ys = np.array([c.y_um for c in candidates])
    hit_ids = scope.ground_truth.crystal_id_xy(xs, ys, tolerance_um=tolerance_um) if candidates else np.zeros(0, int)
    found = {int(i) for i in hit_ids if i >= 0} & {c.id for c in inside}
    found_bars = analysis.bar_mask[::4, ::4]
    iou = (found_bars & true_bars).sum() / max(1, (found_bars | true_bars).sum())
    return len(found), len(inside), candidates, hit_ids, iou, true_bars.mean()


@pytest.mark.slow
@pytest.mark.parametrize("specimen", ALL_TYPES)
def test_atlas_candidates_overlap_most_crystals_and_bars_are_masked(
    simulated_microscope: Callable[..., SimulatedMicroscope], specimen: str
) -> None:
    scope = simulated_microscope(specimen, seed=1, camera_px=768)
    found, total, _candidates, hit_ids, iou, bar_fraction = _evaluate(scope, "atlas", ATLAS, 2.0)
    assert total > 0
    assert found / total >= 0.5, f"{specimen}: found {found} of {total} crystals"
    assert np.mean(hit_ids >= 0) >= 0.4, f"{specimen}: precision {np.mean(hit_ids >= 0):.2f}"
    assert bar_fraction > 0.2 and iou > 0.85, f"bar IoU {iou:.2f}"


@pytest.mark.slow
def test_search_frames_find_the_crystal_under_the_beam(
    simulated_microscope: Callable[..., SimulatedMicroscope],
) -> None:
    hits = {}
    for specimen in ALL_TYPES:
        scope = simulated_microscope(specimen, seed=1, camera_px=512)
        found, _total, _candidates, _, _, _ = _evaluate(scope, "search", SEARCH, 0.5)
        hits[specimen] = found
    # faint polymer crystals are as dark as the film's mottle in every window statistic: the outlined
    # cluster (agent.locate.outlines) finds them by their straight edges
    assert all(hits[s] > 0 for s in ALL_TYPES), f"crystals found per type at search: {hits}"
