"""Scoring detections against ground truth: precision, recall, localisation error, bar-mask IoU.

Matching rule (documented in the README, "Evaluating on your own images"):

- A detection is a point (row_px, col_px). Its distance to a crystal is the distance from the point to
  the crystal's outline, modelled as a capsule (the crystal's long axis with rounded ends of its
  half-width; a circle of the labelled radius for user labels); 0 inside.
- A detection is a **true positive** when it lies within `tolerance_um` of *any* true crystal (also
  crystals cut by the frame edge, which recall does not count); otherwise a false positive.
- A countable crystal is **found** when any detection lies within `tolerance_um` of it. Recall counts
  countable crystals only (wholly inside the frame, not on a bar); `recall_diffracting` counts those
  that diffract.
- **Localisation error**: for each true positive, the distance (um) from the detection to the centre of
  the nearest crystal it matched.
- **Bar IoU**: |predicted & true| / |predicted | true| of the grid-bar masks (None when both are empty).
- `precision_unique`: distinct crystals hit / detections, i.e. a second detection on the same crystal
  counts as a false positive (it would cost a second visit); `precision` counts it as a true positive.
- *Area* variants (`precision_area`, `recall_area`): the same with each detection's own extent as the
  tolerance (the radius of a disc of its `area_px`, at least the tolerance): "the crystal is in the
  cell / region the method reported", which tells a coarse-but-right grid cell from a wrong one.

The default tolerance, 2 um, is about the size of the beam used to check diffraction (a selected
area of 1-2 um) and well inside the search preset's field of view, where the screening loop re-centres
on the crystal: a detection that close puts the crystal under the beam after re-centring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.evaluation.truth import ImageTruth

#: Default matching tolerance, micrometres (see the module docstring for why).
DEFAULT_TOLERANCE_UM = 2.0
#: Matching tolerance when the pixel size is unknown, pixels.
DEFAULT_TOLERANCE_PX = 4.0


@dataclass(frozen=True)
class Detection:
    """A detected object: centre in pixels (row, col), area in pixels, score (higher: more confident)."""

    row_px: float
    col_px: float
    area_px: float = 0.0
    score: float = 0.0


@dataclass
class FrameScore:
    """Counts and errors of one method on one image (sums; aggregate with `combine_scores`)."""

    n_detections: int = 0
    true_positives: int = 0
    n_countable: int = 0
    n_found: int = 0
    n_countable_diffracting: int = 0
    n_found_diffracting: int = 0
    loc_errors_px: list[float] = field(default_factory=list)
    #: (length_um or None, found) of every countable crystal, for recall by size
    countable_found: list[tuple[float | None, bool]] = field(default_factory=list)
    true_positives_area: int = 0
    n_found_area: int = 0
    unique_hits: int = 0
    um_per_px: float | None = None
    bar_iou: float | None = None
    seconds: float = 0.0

    @property
    def false_positives(self) -> int:
        """Detections that are not on (or near) a crystal."""
        return self.n_detections - self.true_positives


def capsule_distance_px(points_rc: np.ndarray, truth: ImageTruth) -> np.ndarray:
    """(n_points, n_crystals) distance in pixels from each point to each crystal's outline (0 inside)."""
    points = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
    n = len(truth.crystals)
    if n == 0 or points.shape[0] == 0:
        return np.zeros((points.shape[0], n))
    a = np.array([[c.row0_px, c.col0_px] for c in truth.crystals])
    b = np.array([[c.row1_px, c.col1_px] for c in truth.crystals])
    half_width = np.array([c.half_width_px for c in truth.crystals])
    ab = b - a
    ab_len2 = np.maximum(np.sum(ab * ab, axis=1), 1e-12)
    ap = points[:, None, :] - a[None, :, :]
    t = np.clip(np.sum(ap * ab[None], axis=2) / ab_len2[None], 0.0, 1.0)
    nearest = a[None] + t[..., None] * ab[None]
    dist = np.hypot(points[:, None, 0] - nearest[..., 0], points[:, None, 1] - nearest[..., 1])
    return np.maximum(dist - half_width[None], 0.0)


def tolerance_px(
    truth: ImageTruth, tolerance_um: float | None, tolerance_px_default: float = DEFAULT_TOLERANCE_PX
) -> float:
    """The matching tolerance in pixels: `tolerance_um` converted with the pixel size, else the px default."""
    if truth.um_per_px is not None and tolerance_um is not None:
        return float(tolerance_um) / truth.um_per_px
    return float(tolerance_px_default)


def bar_iou(predicted: np.ndarray | None, true: np.ndarray | None) -> float | None:
    """Intersection over union of two bool masks of one shape; None if either is missing or both empty."""
    if predicted is None or true is None:
        return None
    p = np.asarray(predicted, dtype=bool)
    t = np.asarray(true, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"bar masks differ in shape: predicted {p.shape}, true {t.shape}")
    union = int(np.count_nonzero(p | t))
    if union == 0:
        return None
    return int(np.count_nonzero(p & t)) / union


def score_frame(
    detections: Sequence[Detection],
    truth: ImageTruth,
    *,
    tolerance_um: float | None = DEFAULT_TOLERANCE_UM,
    tolerance_px_default: float = DEFAULT_TOLERANCE_PX,
    bar_mask: np.ndarray | None = None,
    seconds: float = 0.0,
) -> FrameScore:
    """Score one image's detections against its truth (see the module docstring for the rules)."""
    tol = tolerance_px(truth, tolerance_um, tolerance_px_default)
    points = np.array([[d.row_px, d.col_px] for d in detections], dtype=np.float64).reshape(-1, 2)
    dist = capsule_distance_px(points, truth)
    score = FrameScore(n_detections=len(detections), um_per_px=truth.um_per_px, seconds=seconds)
    countable = np.array([c.countable for c in truth.crystals], dtype=bool)
    diffracting = np.array([bool(c.diffracts) for c in truth.crystals], dtype=bool)
    score.n_countable = int(countable.sum())
    score.n_countable_diffracting = int((countable & diffracting).sum())
    score.bar_iou = bar_iou(bar_mask, truth.bar_mask)
    if dist.size == 0:
        score.countable_found = [(c.length_um, False) for c in truth.crystals if c.countable]
        return score
    matched = dist <= tol
    is_tp = matched.any(axis=1)
    score.true_positives = int(is_tp.sum())
    score.unique_hits = _unique_hits(matched, dist)
    found = matched.any(axis=0)
    score.n_found = int((found & countable).sum())
    score.n_found_diffracting = int((found & countable & diffracting).sum())
    score.countable_found = [(c.length_um, bool(f)) for c, f in zip(truth.crystals, found, strict=True) if c.countable]
    areas = np.array([max(d.area_px, 0.0) for d in detections], dtype=np.float64)
    matched_area = dist <= np.maximum(tol, np.sqrt(areas / np.pi))[:, None]
    score.true_positives_area = int(matched_area.any(axis=1).sum())
    score.n_found_area = int((matched_area.any(axis=0) & countable).sum())
    centres = np.array([[c.row_px, c.col_px] for c in truth.crystals])
    for i in np.nonzero(is_tp)[0]:
        candidates = np.nonzero(matched[i])[0]
        best = candidates[np.argmin(dist[i, candidates])]
        score.loc_errors_px.append(float(np.hypot(*(points[i] - centres[best]))))
    return score


def _unique_hits(matched: np.ndarray, dist: np.ndarray) -> int:
    """Distinct crystals hit when every true-positive detection is assigned to its nearest matched crystal."""
    hits: set[int] = set()
    for i in np.nonzero(matched.any(axis=1))[0]:
        candidates = np.nonzero(matched[i])[0]
        hits.add(int(candidates[np.argmin(dist[i, candidates])]))
    return len(hits)


@dataclass(frozen=True)
class Summary:
    """Aggregated figures of one method over many images (micro-averaged counts)."""

    n_images: int
    n_detections: int
    true_positives: int
    n_countable: int
    n_found: int
    precision: float | None
    recall: float | None
    recall_diffracting: float | None
    loc_error_um: float | None
    loc_error_px: float | None
    bar_iou: float | None
    seconds_per_image: float
    recall_by_size: dict[str, float | None] = field(default_factory=dict)
    precision_area: float | None = None
    recall_area: float | None = None
    precision_unique: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready dict (rounded)."""
        def r(value: float | None, digits: int = 4) -> float | None:
            return None if value is None else round(float(value), digits)

        return {
            "n_images": self.n_images, "n_detections": self.n_detections, "true_positives": self.true_positives,
            "n_crystals": self.n_countable, "n_found": self.n_found, "precision": r(self.precision),
            "recall": r(self.recall), "recall_diffracting": r(self.recall_diffracting),
            "loc_error_um": r(self.loc_error_um, 3), "loc_error_px": r(self.loc_error_px, 2),
            "bar_iou": r(self.bar_iou), "seconds_per_image": r(self.seconds_per_image, 3),
            "recall_by_size": {k: r(v) for k, v in self.recall_by_size.items()},
            "precision_area": r(self.precision_area), "recall_area": r(self.recall_area),
            "precision_unique": r(self.precision_unique),
        }


def combine_scores(scores: Iterable[FrameScore]) -> Summary:
    """Micro-average frame scores: precision = sum TP / sum detections, recall = sum found / sum countable.

    Precision is None when there were no detections; recall None when there was nothing to find.
    Localisation error is the mean over all true positives; bar IoU the mean over images that had one.
    """
    items = list(scores)
    detections = sum(s.n_detections for s in items)
    tp = sum(s.true_positives for s in items)
    countable = sum(s.n_countable for s in items)
    found = sum(s.n_found for s in items)
    countable_d = sum(s.n_countable_diffracting for s in items)
    found_d = sum(s.n_found_diffracting for s in items)
    errors_px = [e for s in items for e in s.loc_errors_px]
    errors_um = [e * s.um_per_px for s in items if s.um_per_px is not None for e in s.loc_errors_px]
    ious = [s.bar_iou for s in items if s.bar_iou is not None]
    return Summary(
        n_images=len(items),
        n_detections=detections,
        true_positives=tp,
        n_countable=countable,
        n_found=found,
        precision=tp / detections if detections else None,
        recall=found / countable if countable else None,
        recall_diffracting=found_d / countable_d if countable_d else None,
        loc_error_um=float(np.mean(errors_um)) if errors_um else None,
        loc_error_px=float(np.mean(errors_px)) if errors_px else None,
        bar_iou=float(np.mean(ious)) if ious else None,
        seconds_per_image=float(np.mean([s.seconds for s in items])) if items else 0.0,
        recall_by_size=_recall_by_size([pair for s in items for pair in s.countable_found]),
        precision_area=sum(s.true_positives_area for s in items) / detections if detections else None,
        recall_area=sum(s.n_found_area for s in items) / countable if countable else None,
        precision_unique=sum(s.unique_hits for s in items) / detections if detections else None,
    )


#: Crystal length bins (um) for `Summary.recall_by_size`: label -> [low, high).
SIZE_BINS_UM: dict[str, tuple[float, float]] = {
    "<3um": (0.0, 3.0), "3-6um": (3.0, 6.0), "6-12um": (6.0, 12.0), ">=12um": (12.0, float("inf")),
}


def _recall_by_size(pairs: list[tuple[float | None, bool]]) -> dict[str, float | None]:
    """Recall per crystal length bin (um); empty when no crystal has a known length."""
    sized = [(length, found) for length, found in pairs if length is not None]
    if not sized:
        return {}
    result: dict[str, float | None] = {}
    for label, (low, high) in SIZE_BINS_UM.items():
        inside = [found for length, found in sized if low <= length < high]
        result[label] = sum(inside) / len(inside) if inside else None
    return result
