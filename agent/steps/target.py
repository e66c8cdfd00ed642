"""Step `targeting`: the atlas' candidates of the crystal clusters (then of the mixed ones) as stage
targets, on a short path.

The locator gives pixel candidates (`agent.locate.targets.find_candidates`, best first, one object per
region first); this step converts them to stage micrometres with the atlas' calibrated transform, keeps
those inside the stage limits and the mapped box, fills `targeting.max_targets` places (crystal clusters
first, mixed clusters' candidates in the places left and away from the sure ones) and orders every sure
target before any mixed one, each tier on a short path (nearest neighbour + 2-opt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.locate.preprocess import prepare_image
from agent.locate.targets import find_candidates
from agent.session.outcomes import TargetRecord
from agent.session.records import TargetsPlanned
from agent.steps.context import SessionContext
from agent.steps.motion import plan_tiered_path

#: A candidate with its stage position: (candidate, x_um, y_um).
Placed = tuple[Any, float, float]


@dataclass(frozen=True)
class TargetPlan:
    """The targets to visit, in visiting order."""

    targets: list[TargetRecord]


def fill_target_places(
    sure: list[Placed], mixed: list[Placed], max_targets: int, min_spacing_um: float
) -> tuple[list[Placed], list[Placed]]:
    """Targets from the sure (crystal) clusters' candidates, then from the mixed clusters' ones.

    Both lists hold (candidate, x_um, y_um) in the locator's order (best first, one object per region
    first). The sure ones take up to `max_targets` places; mixed ones fill the places left, skipping any
    within `min_spacing_um` of a sure target (the same object seen by two clusters).
    """
    sure = sure[:max_targets]
    kept = [
        entry for entry in mixed if all(math.hypot(entry[1] - x, entry[2] - y) >= min_spacing_um for _, x, y in sure)
    ]
    return sure, kept[: max_targets - len(sure)]


def plan_targets(ctx: SessionContext) -> TargetPlan:
    """Find, place and order the targets; records them and has the atlas outputs written."""
    if ctx.analysis is None or ctx.atlas is None or ctx.decision is None:
        raise RuntimeError("targeting needs the atlas, its analysis and the labelling decision")
    targeting = ctx.plan.targeting
    decision = ctx.decision
    finder = _CandidateFinder(ctx)
    sure = finder.reachable(decision.crystal_clusters)
    places_left = len(sure) < targeting.max_targets
    # the object search is the slow part: mixed clusters are searched only when places are left
    mixed = finder.reachable(decision.mixed_clusters) if decision.mixed_clusters and places_left else []
    sure, mixed = fill_target_places(sure, mixed, targeting.max_targets, targeting.min_spacing_um)
    here = ctx.microscope.get_stage()
    tiers = (sure, mixed)
    order = plan_tiered_path((here.x_um, here.y_um), [np.array([[x, y] for _, x, y in t]) for t in tiers])
    visits = [(tiers[tier][index], tier == 1) for tier, index in order]
    targets = [
        TargetRecord(
            target_id=f"T{rank + 1:03d}",
            order=rank,
            x_um=x_um,
            y_um=y_um,
            atlas_col_px=float(c.col_px),
            atlas_row_px=float(c.row_px),
            area_px=float(c.area_px),
            score=float(c.score),
            cluster_id=int(c.cluster_id),
            from_mixed_cluster=from_mixed,
        )
        for rank, ((c, x_um, y_um), from_mixed) in enumerate(visits)
    ]
    ctx.output.record(TargetsPlanned(targets=targets))
    ctx.output.save_atlas_outputs(ctx.atlas, ctx.analysis, decision, targets)
    return TargetPlan(targets=targets)


class _CandidateFinder:
    """The locator's candidates of some clusters, placed on the stage (see `reachable`)."""

    def __init__(self, ctx: SessionContext) -> None:
        assert ctx.atlas is not None and ctx.analysis is not None and ctx.decision is not None
        self.atlas, self.analysis = ctx.atlas, ctx.analysis
        pixel_um = self.atlas.pixel_size_um
        targeting = ctx.plan.targeting
        self.settings = ctx.plan.locate.model_copy(
            update={
                "min_spacing_px": max(1.0, targeting.min_spacing_um / pixel_um),
                "min_bar_distance_px": targeting.min_bar_distance_um / pixel_um,
                "max_candidates": max(targeting.max_targets * 4, 50),
            }
        )
        self.limits = ctx.microscope.stage_limits()
        self.map_box_um = ctx.map_box_um
        # with candidates of two cluster sets to find, the image is prepared for them once
        both = ctx.decision.crystal_clusters and ctx.decision.mixed_clusters
        self.prepared = (
            prepare_image(
                self.atlas.image, self.analysis.bar_mask, flatten=self.settings.flatten, clean=self.settings.clean
            )
            if both
            else None
        )

    def reachable(self, clusters: tuple[int, ...]) -> list[Placed]:
        """Candidates of `clusters` (locator's order) inside the stage limits and the mapped box, with stage um."""
        kept = []
        limits = self.limits
        candidates = find_candidates(
            self.analysis, clusters, self.settings, image=self.atlas.image, prepared=self.prepared
        )
        for candidate in candidates:
            x_um, y_um = self.atlas.pixel_to_stage_um(np.array([candidate.col_px, candidate.row_px]))
            inside = limits.x_min_um <= x_um <= limits.x_max_um and limits.y_min_um <= y_um <= limits.y_max_um
            if self.map_box_um is not None:  # the atlas frame may show more than the squares asked for
                x_min, x_max, y_min, y_max = self.map_box_um
                inside = inside and x_min <= x_um <= x_max and y_min <= y_um <= y_max
            if inside:
                kept.append((candidate, float(x_um), float(y_um)))
        return kept
