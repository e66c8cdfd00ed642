"""The two baseline detectors on real-world-like images (uneven illumination, hot pixels, data bar,
8-bit exports, dark field), and their handling of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from agent.evaluation.baselines import DetectorInputError, find_bars, log_blobs, threshold_components
from agent.evaluation.scoring import Detection, bar_iou, score_frame
from agent.evaluation.truth import ImageTruth, PixelCrystal
from tests.synthetic_images import SyntheticImage, make_grid_image


def _truth(synthetic: SyntheticImage) -> ImageTruth:
    crystals = tuple(
        PixelCrystal(id=i, row_px=c.row_px, col_px=c.col_px, row0_px=c.row_px, col0_px=c.col_px, row1_px=c.row_px,
                     col1_px=c.col_px, half_width_px=c.radius_px)
        for i, c in enumerate(synthetic.crystals)
    )
    return ImageTruth(shape_px=synthetic.image.shape, crystals=crystals, bar_mask=synthetic.bar_mask)


CASES = [
    {"seed": 1},
    {"seed": 2, "polarity": "dark"},
    {"seed": 4, "polarity": "dark", "bit_depth": 8, "tile_seams": True},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_baselines_find_planted_crystals_in_either_polarity(options: dict) -> None:
    synthetic = make_grid_image((400, 480), **options)
    truth = _truth(synthetic)
    assert truth.n_countable >= 5
    data_rows = synthetic.data_bar_rows
    for detector in (threshold_components, log_blobs):
        output = detector(synthetic.image)
        score = score_frame(output.detections, truth, tolerance_um=None, tolerance_px_default=3.0)
        assert score.n_found / score.n_countable >= 0.75, (detector.__name__, score)
        # nothing is reported on the burned-in data bar or deep inside a grid bar
        for det in output.detections:
            if data_rows is not None:
                assert not data_rows[0] <= det.row_px < data_rows[1], (detector.__name__, det)
        deep_bar = ndimage.binary_erosion(synthetic.bar_mask, iterations=4)
        on_bar = [d for d in output.detections if deep_bar[int(d.row_px), int(d.col_px)]]
        assert not on_bar, (detector.__name__, on_bar[:3])
    bars = threshold_components(synthetic.image).bar_mask
    assert bars is not None
    assert bar_iou(bars, synthetic.bar_mask) > 0.8


def test_no_bars_found_where_there_are_none() -> None:
    synthetic = make_grid_image((384, 384), seed=5, bars=False, data_bar=False)
    bars = find_bars(synthetic.image.astype(np.float64))
    assert bars.mean() < 0.01


def test_flat_image_gives_no_detections() -> None:
    flat = np.full((128, 128), 1000, dtype=np.uint16)
    assert threshold_components(flat).detections == ()
    assert log_blobs(flat).detections == ()


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 64, 64)), "2-D"),
        (np.zeros((8, 8)), "smaller"),
        (np.array([["a", "b"]] * 32), "numeric"),
        (np.full((32, 32), np.nan), "finite"),
    ],
)
def test_bad_input_is_a_clear_error(bad: np.ndarray, message: str) -> None:
    for detector in (threshold_components, log_blobs):
        with pytest.raises(DetectorInputError, match=message):
            detector(bad)


def test_detections_are_sorted_by_score_and_within_the_image() -> None:
    synthetic = make_grid_image((256, 320), seed=6, n_crystals=6)
    for detector in (threshold_components, log_blobs):
        detections = detector(synthetic.image).detections
        assert detections
        assert all(isinstance(d, Detection) for d in detections)
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        assert all(-0.5 <= d.row_px < 256 and -0.5 <= d.col_px < 320 for d in detections)
