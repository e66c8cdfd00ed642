"""Scoring a screening session against the simulator's ground truth (never used for decisions).

A confirmed target is a true positive when its final stage position lies on a crystal (within
`tolerance_um`, for stage repeat error and the crystal's blurred edge). Recall counts the crystals in the
mapped box that some confirmed target landed on; `recall_diffracting` counts only diffracting crystals and
only `recorded` targets (confirmed and diffracting). `precision_unique` counts each crystal once: distinct
crystals hit / confirmed targets (a second target on a crystal already hit is a wasted visit). Targets that
were never visited (time budget, `max_targets`) count as misses, so recall also measures how much of the area
a session screened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from simulator.specimen import Specimen

#: Outcomes of a visited target that count as confirmed (the crystal was found again at search).
CONFIRMED_OUTCOMES = frozenset({"recorded", "no-diffraction"})


def score_session(
    specimen: Specimen,
    results: Sequence[Any],
    box_um: tuple[float, float, float, float] | Sequence[tuple[float, float, float, float]],
    tolerance_um: float = 1.0,
) -> dict[str, Any]:
    """`precision`, `precision_unique`, `recall`, `recall_diffracting` (None where undefined) and the counts
    behind them.

    `results` are the visited targets: objects with `x_um`, `y_um` (final stage position) and `outcome`;
    `box_um` is the mapped box (x_min, x_max, y_min, y_max um), or a list of them (a session mapped in rounds).
    """
    confirmed = [r for r in results if r.outcome in CONFIRMED_OUTCOMES]
    hit_ids: set[int] = set()
    recorded_hit_ids: set[int] = set()
    true_positive = 0
    for result in confirmed:
        crystal_id = int(specimen.crystal_id_xy(np.array([result.x_um]), np.array([result.y_um]), tolerance_um)[0])
        if crystal_id >= 0:
            true_positive += 1
            hit_ids.add(crystal_id)
            if result.outcome == "recorded":
                recorded_hit_ids.add(crystal_id)
    boxes = [box_um] if box_um and not isinstance(box_um[0], (tuple, list)) else list(box_um)
    in_box = list({c.id: c for box in boxes for c in specimen.crystals_in_box(*box)}.values())  # type: ignore[misc]
    diffracting = [c for c in in_box if c.diffracts]
    return {
        "precision": round(true_positive / len(confirmed), 4) if confirmed else None,
        "precision_unique": round(len(hit_ids) / len(confirmed), 4) if confirmed else None,
        "recall": round(len(hit_ids & {c.id for c in in_box}) / len(in_box), 4) if in_box else None,
        "recall_diffracting": (
            round(len(recorded_hit_ids & {c.id for c in diffracting}) / len(diffracting), 4) if diffracting else None
        ),
        "crystals_in_area": len(in_box),
        "true_positives": true_positive,
    }
