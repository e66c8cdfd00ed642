"""Scoring rules (precision, recall, localisation, bar IoU) and ground truth in the pixel frame."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.evaluation.scoring import (
    Detection,
    bar_iou,
    capsule_distance_px,
    combine_scores,
    score_frame,
)
from agent.evaluation.truth import ImageTruth, PixelCrystal, frame_box_um, matrix_scale_um_per_px, truth_for_frame
from drivers.geometry import pixel_to_stage_um


def _round(id_: int, row: float, col: float, radius: float, *, countable: bool = True,
           diffracts: bool | None = True, length_um: float | None = None) -> PixelCrystal:
    return PixelCrystal(id=id_, row_px=row, col_px=col, row0_px=row, col0_px=col, row1_px=row, col1_px=col,
                        half_width_px=radius, countable=countable, diffracts=diffracts, length_um=length_um)


def _truth(um_per_px: float | None = 0.5, bar_mask: np.ndarray | None = None) -> ImageTruth:
    needle = PixelCrystal(id=2, row_px=50, col_px=50, row0_px=50, col0_px=30, row1_px=50, col1_px=70,
                          half_width_px=1.0, countable=True, diffracts=False, length_um=21.0)
    return ImageTruth(
        shape_px=(100, 100),
        crystals=(
            _round(0, 10, 10, 3, length_um=3.0),
            _round(1, 80, 80, 5, countable=False, length_um=5.0),  # cut by the edge: precision yes, recall no
            needle,
        ),
        um_per_px=um_per_px,
        bar_mask=bar_mask,
    )


def test_capsule_distance_is_zero_inside_and_euclidean_outside() -> None:
    truth = _truth()
    points = np.array([[10, 10], [10, 16], [50, 69], [50, 75], [53, 50]], dtype=float)
    dist = capsule_distance_px(points, truth)
    assert dist.shape == (5, 3)
    assert dist[0, 0] == 0.0
    assert dist[1, 0] == pytest.approx(3.0)  # 6 px from the centre, radius 3
    assert dist[2, 2] == 0.0  # on the needle's axis near its end
    assert dist[3, 2] == pytest.approx(4.0)  # 5 px beyond the end, half-width 1
    assert dist[4, 2] == pytest.approx(2.0)  # 3 px beside the axis


def test_score_frame_counts_and_errors() -> None:
    truth = _truth(um_per_px=0.5)  # tolerance 2 um = 4 px
    detections = [
        Detection(11, 11),  # on crystal 0: TP, error sqrt(2) px
        Detection(50, 34),  # on the needle: TP, error 16 px from its centre
        Detection(80, 80),  # on the edge-cut crystal: TP for precision, not counted in recall
        Detection(30, 90),  # nothing there: FP
    ]
    score = score_frame(detections, truth, tolerance_um=2.0)
    assert score.n_detections == 4
    assert score.true_positives == 3
    assert score.false_positives == 1
    assert score.n_countable == 2 and score.n_found == 2
    assert score.n_countable_diffracting == 1 and score.n_found_diffracting == 1
    assert sorted(score.loc_errors_px) == pytest.approx(sorted([math.sqrt(2), 16.0, 0.0]))
    summary = combine_scores([score])
    assert summary.precision == pytest.approx(0.75)
    assert summary.recall == 1.0
    assert summary.recall_diffracting == 1.0
    assert summary.loc_error_um == pytest.approx(0.5 * (math.sqrt(2) + 16.0) / 3)
    assert summary.recall_by_size["<3um"] is None and summary.recall_by_size["3-6um"] == 1.0


def test_duplicates_count_once_in_precision_unique() -> None:
    truth = _truth(um_per_px=0.5)
    detections = [Detection(10, 10), Detection(11, 10), Detection(10, 11), Detection(30, 90)]
    summary = combine_scores([score_frame(detections, truth)])
    assert summary.precision == pytest.approx(0.75)
    assert summary.precision_unique == pytest.approx(0.25)  # one crystal hit, three times


def test_tolerance_decides_a_near_miss() -> None:
    truth = _truth(um_per_px=0.5)
    near = [Detection(10, 16)]  # 3 px = 1.5 um outside crystal 0
    assert score_frame(near, truth, tolerance_um=2.0).true_positives == 1
    assert score_frame(near, truth, tolerance_um=1.0).true_positives == 0
    # without a pixel size the pixel default (4 px) applies
    assert score_frame(near, _truth(um_per_px=None), tolerance_um=2.0, tolerance_px_default=2.0).true_positives == 0


def test_area_variant_uses_the_detection_extent() -> None:
    truth = _truth(um_per_px=0.5)
    coarse = [Detection(10, 25, area_px=np.pi * 15.0**2)]  # a grid cell centred 15 px from crystal 0
    score = score_frame(coarse, truth, tolerance_um=2.0)
    assert score.true_positives == 0 and score.true_positives_area == 1
    summary = combine_scores([score])
    assert summary.precision == 0.0 and summary.precision_area == 1.0
    assert summary.recall_area == 0.5 and summary.recall == 0.0


def test_combine_is_micro_averaged_and_handles_empty() -> None:
    truth = _truth()
    good = score_frame([Detection(10, 10)], truth)
    empty = score_frame([], truth)
    summary = combine_scores([good, empty])
    assert summary.n_images == 2
    assert summary.precision == 1.0
    assert summary.recall == pytest.approx(1 / 4)  # 1 of 2 countable crystals in each of two images
    nothing = combine_scores([empty])
    assert nothing.precision is None and nothing.loc_error_um is None and nothing.recall == 0.0
    no_truth = ImageTruth(shape_px=(10, 10), crystals=())
    assert combine_scores([score_frame([Detection(1, 1)], no_truth)]).recall is None


def test_bar_iou() -> None:
    true = np.zeros((10, 10), dtype=bool)
    true[:, :4] = True
    predicted = np.zeros((10, 10), dtype=bool)
    predicted[:, 2:6] = True
    assert bar_iou(predicted, true) == pytest.approx(20 / 60)
    assert bar_iou(true, true) == 1.0
    assert bar_iou(np.zeros((10, 10), bool), np.zeros((10, 10), bool)) is None
    assert bar_iou(None, true) is None
    with pytest.raises(ValueError, match="shape"):
        bar_iou(np.zeros((5, 5), bool), true)
    score = score_frame([], _truth(bar_mask=true), bar_mask=predicted)
    assert score.bar_iou == pytest.approx(20 / 60)


@pytest.fixture(scope="module")
def specimen():  # type: ignore[no-untyped-def]
    from simulator.specimen import generate_specimen

    return generate_specimen("asbestos-fibres", seed=1)


def test_truth_for_frame_matches_the_specimen(specimen) -> None:  # type: ignore[no-untyped-def]
    """Pixel-frame truth agrees with the specimen's own queries: crystal centres map back to stage, each
    countable crystal's centre is on that crystal, and the bar mask is the specimen's."""
    angle = math.radians(3.0)
    matrix = 0.3 * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shape = (700, 800)
    centre = tuple(map(float, specimen.square_centres_um()[5]))
    truth = truth_for_frame(specimen, shape, centre, matrix)
    assert truth.um_per_px == pytest.approx(matrix_scale_um_per_px(matrix))
    assert truth.bar_mask is not None and truth.bar_mask.shape == shape
    x0, x1, y0, y1 = frame_box_um(shape, centre, matrix)
    assert truth.n_countable > 0
    # every crystal whose outline lies well inside the frame is countable (unless on a bar)
    well_inside = [c for c in specimen.crystals_in_box(x0 + 35, x1 - 35, y0 + 35, y1 - 35)]
    countable_ids = {c.id for c in truth.crystals if c.countable}
    assert {c.id for c in well_inside} <= {c.id for c in truth.crystals}
    assert len(countable_ids) >= len(well_inside) > 0
    for crystal in truth.crystals:
        xy = pixel_to_stage_um(np.array([crystal.col_px, crystal.row_px]), shape, centre, matrix)
        record = specimen.crystal_truth()[crystal.id]
        assert xy == pytest.approx([record.x_um, record.y_um], abs=1e-6)
        if crystal.countable:
            assert 0 <= crystal.row0_px < shape[0] and 0 <= crystal.col1_px < shape[1]
            assert specimen.crystal_id_xy(xy[0], xy[1], tolerance_um=0.0) >= 0
    # the bar mask is the specimen's at every pixel (spot check)
    rows, cols = np.nonzero(truth.bar_mask)
    if rows.size:
        xy = pixel_to_stage_um(np.stack([cols[:50], rows[:50]], axis=1).astype(float), shape, centre, matrix)
        assert specimen.bar_mask_xy(xy[:, 0], xy[:, 1]).all()
    # a detection on each countable crystal's centre finds every one of them
    dets = [Detection(c.row_px, c.col_px) for c in truth.crystals if c.countable]
    score = score_frame(dets, truth)
    assert score.n_found == truth.n_countable and score.true_positives == len(dets)
