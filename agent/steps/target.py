"""Step `targeting`: the atlas' candidates of the crystal clusters (then of the mixed ones) as stage
targets, on a short path.

The locator gives pixel candidates (`agent.locate.targets.find_candidates`, best first, one object per
region first); this step converts them to stage micrometres with the atlas' calibrated transform, keeps
those inside the stage limits and this round's mapped box (not in an earlier round's), fills the places the
optional `targeting.max_targets` cap leaves (crystal clusters first, mixed clusters' candidates in the
places left and away from the sure ones), keeps the best-scoring ones when the budget left cannot visit
them all (`fit_to_budget`), and orders them by tier (`TargetRecord.tier`: by the crystal classifier's
probability once label memory holds outcomes, `agent.steps.learn`; before that sure clusters before mixed
ones), each tier on a short path (nearest neighbour + 2-opt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import ScreeningPlan
from agent.locate.preprocess import prepare_image
from agent.locate.targets import find_candidates
from agent.session.outcomes import TargetRecord, visiting_tier
from agent.session.records import TargetsPlanned
from agent.steps import learn
from agent.steps.context import SessionContext
from agent.steps.map import atlas_folder, in_any_box
from agent.steps.motion import order_by_tier

#: A candidate with its stage position: (candidate, x_um, y_um).
Placed = tuple[Any, float, float]


@dataclass(frozen=True)
class TargetPlan:
    """The targets to visit, in visiting order."""

    targets: list[TargetRecord]


def fill_target_places(
    sure: list[Placed], mixed: list[Placed], max_targets: int | None, min_spacing_um: float
) -> tuple[list[Placed], list[Placed]]:
    """Targets from the sure (crystal) clusters' candidates, then from the mixed clusters' ones.

    Both lists hold (candidate, x_um, y_um) in the locator's order (best first, one object per region
    first). The sure ones take up to `max_targets` places (None: no cap); mixed ones fill the places left,
    skipping any within `min_spacing_um` of a sure target (the same object seen by two clusters).
    """
    if max_targets is not None:
        sure = sure[: max(0, max_targets)]
    kept = [
        entry for entry in mixed if all(math.hypot(entry[1] - x, entry[2] - y) >= min_spacing_um for _, x, y in sure)
    ]
    if max_targets is not None:
        kept = kept[: max(0, max_targets - len(sure))]
    return sure, kept


#: Microscope seconds one target visit is assumed to take beyond its two exposures when the targets of a round
#: are fitted to the budget left. A guess, not a published figure: a stage move with settling, two camera starts
#: and a diffraction switch each way are 7-8 s on SerialEM's defaults (`simulator.timing`); what stops a session
#: at its budget is the check before every target, this only decides which targets come first.
VISIT_OVERHEAD_GUESS_S = 8.0


def visit_estimate_s(plan: ScreeningPlan) -> float:
    """The microscope seconds one target visit is assumed to take (its exposures + `VISIT_OVERHEAD_GUESS_S`)."""
    return plan.exposures.search_s + plan.exposures.diffraction_s + VISIT_OVERHEAD_GUESS_S


@dataclass(frozen=True)
class _Entry:
    """A candidate on its way to becoming a target: placed on the stage, from a mixed cluster or not, its
    features (rounded as journalled) and the classifier's probability (None without a classifier)."""

    placed: Placed
    from_mixed: bool
    features: dict[str, float]
    p_diffract: float | None

    @property
    def tier(self) -> int:
        return visiting_tier(self.from_mixed, self.p_diffract)

    @property
    def promise(self) -> tuple[int, float]:
        """Sort key, most promising first: lowest tier, then highest probability (else locator score)."""
        return self.tier, -(self.p_diffract if self.p_diffract is not None else float(self.placed[0].score))


def fit_to_budget(ctx: SessionContext, entries: list[_Entry]) -> list[_Entry]:
    """When the budget left cannot visit every target of the round, the most promising ones that fit
    (`_Entry.promise`); else all of them. Without a budget: all."""
    budget_s = ctx.plan.time_budget_s
    if budget_s is None:
        return entries
    fit = max(1, int((budget_s - ctx.clock_s()) // visit_estimate_s(ctx.plan)))
    return entries if len(entries) <= fit else sorted(entries, key=lambda entry: entry.promise)[:fit]


def plan_targets(ctx: SessionContext) -> TargetPlan:
    """Find, place and order this round's targets; records them and has the round's atlas outputs written.

    Target ids continue those of earlier rounds; a candidate in a box mapped by an earlier round, or near a
    target planned before, is left out (it was found then)."""
    if ctx.analysis is None or ctx.atlas is None or ctx.decision is None:
        raise RuntimeError("targeting needs the atlas, its analysis and the labelling decision")
    targeting = ctx.plan.targeting
    decision = ctx.decision
    places = None if targeting.max_targets is None else max(0, targeting.max_targets - len(ctx.targets))
    finder = _CandidateFinder(ctx, places)
    sure = finder.reachable(decision.crystal_clusters)
    places_left = places is None or len(sure) < places
    # the object search is the slow part: mixed clusters are searched only when places are left
    mixed = finder.reachable(decision.mixed_clusters) if decision.mixed_clusters and places_left else []
    _spread_answers(ctx, finder, sure)
    sure, mixed = fill_target_places(sure, mixed, places, targeting.min_spacing_um)
    placed = [(entry, False) for entry in sure] + [(entry, True) for entry in mixed]
    features = [{name: round(v, 6) for name, v in entry[0].feature_dict().items()} for entry, _ in placed]
    p = learn.probabilities(ctx, features)
    entries = fit_to_budget(
        ctx, [_Entry(e, mixed, f, q) for (e, mixed), f, q in zip(placed, features, p, strict=True)]
    )
    here = ctx.microscope.get_stage()
    visits = order_by_tier((here.x_um, here.y_um), entries, lambda entry: entry.tier, lambda entry: entry.placed[1:])
    first = len(ctx.targets)
    targets = [_target_record(f"T{first + rank + 1:03d}", first + rank, entry) for rank, entry in enumerate(visits)]
    round_number = max(1, ctx.rounds)
    ctx.output.record(TargetsPlanned(targets=targets, round=round_number))
    ctx.output.save_atlas_outputs(ctx.atlas, ctx.analysis, decision, targets, atlas_folder(round_number))
    return TargetPlan(targets=targets)


def _spread_answers(ctx: SessionContext, finder: _CandidateFinder, sure: list[Placed]) -> None:
    """When the operator answered this round's prompt, store the answer for the answered clusters' objects
    (`learn.remember_answers`): the crystal clusters' candidates and those of the clusters answered "not
    crystal" (the background cluster aside)."""
    decision, analysis = ctx.decision, ctx.analysis
    if ctx.labels is None or decision is None or analysis is None or not decision.answered_by:
        return
    answered = {c for c, source in decision.sources.items() if source == "operator"}
    crystal = [placed[0] for placed in sure if placed[0].cluster_id in answered]
    rejected = tuple(sorted(answered - set(decision.crystal_clusters) - {analysis.background_cluster}))
    not_crystal = [placed[0] for placed in finder.reachable(rejected)] if rejected else []
    learn.remember_answers(ctx, crystal, not_crystal, max(1, ctx.rounds))


def _target_record(target_id: str, order: int, entry: _Entry) -> TargetRecord:
    candidate, x_um, y_um = entry.placed
    return TargetRecord(
        target_id=target_id,
        order=order,
        x_um=x_um,
        y_um=y_um,
        atlas_col_px=float(candidate.col_px),
        atlas_row_px=float(candidate.row_px),
        area_px=float(candidate.area_px),
        score=float(candidate.score),
        cluster_id=int(candidate.cluster_id),
        from_mixed_cluster=entry.from_mixed,
        features=entry.features,
        p_diffract=entry.p_diffract,
    )


class _CandidateFinder:
    """The locator's candidates of some clusters, placed on the stage (see `reachable`)."""

    def __init__(self, ctx: SessionContext, places: int | None) -> None:
        assert ctx.atlas is not None and ctx.analysis is not None and ctx.decision is not None
        self.atlas, self.analysis = ctx.atlas, ctx.analysis
        pixel_um = self.atlas.pixel_size_um
        targeting = ctx.plan.targeting
        self.settings = ctx.plan.locate.model_copy(
            update={
                "min_spacing_px": max(1.0, targeting.min_spacing_um / pixel_um),
                "min_bar_distance_px": targeting.min_bar_distance_um / pixel_um,
                "max_candidates": (
                    ctx.plan.locate.max_candidates if places is None else max(places * 4, 50)
                ),
            }
        )
        self.min_spacing_um = targeting.min_spacing_um
        # what earlier rounds mapped and planned: their candidates were found then
        self.earlier_boxes_um = list(ctx.map_boxes_um[:-1])
        self.earlier_xy_um = np.array([[t.x_um, t.y_um] for t in ctx.targets], dtype=np.float64).reshape(-1, 2)
        self.limits = ctx.microscope.stage_limits()
        self.map_box_um = ctx.map_box_um
        # the image as the analysis prepared it (a resumed session has none): prepared once for every search
        self.prepared = ctx.atlas_prepared
        if self.prepared is None:
            self.prepared = prepare_image(
                self.atlas.image, self.analysis.bar_mask, flatten=self.settings.flatten, clean=self.settings.clean
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
            inside = inside and not in_any_box(float(x_um), float(y_um), self.earlier_boxes_um)
            if inside and len(self.earlier_xy_um):
                inside = float(np.min(np.hypot(*(self.earlier_xy_um - [x_um, y_um]).T))) >= self.min_spacing_um
            if inside:
                kept.append((candidate, float(x_um), float(y_um)))
        return kept
