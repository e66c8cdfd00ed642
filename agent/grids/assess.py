"""Which grids are worth screening: what each grid's atlas pass found, and the ranking rule.

A grid's worth is the diffracting crystals per hour a screening session on it can be expected to find. The atlas
pass (a short session: overview, one block of squares mapped, located, labelled, targets planned, and the best
`probe_targets` of them visited) gives:

- **targets per square**: the planned targets (objects of the clusters label memory, the operator or the
  fallback call crystal: the crystal-bearing clusters) over the squares mapped;
- **hit rate**: the share of targets that diffract, from the probe visits, with a prior worth `PRIOR_VISITS`
  visits: (diffracting + k m) / (probed + k). The prior m is the targets' mean crystal-classifier probability
  (`TargetRecord.p_diffract`) when label memory gave every target one, else `NEUTRAL_PRIOR` (the cold-start
  score ranks targets but is no probability: graphite flakes score high and rarely diffract). The probes measure
  what matters, diffraction, on the grid itself (ice too thick, crystals too thick or damaged show here);
- **time per square**: the atlas pass's own mapping time per square plus its targets' visits (the probes' mean
  visit time, else `target.visit_estimate_s`);
- **supply**: typical squares on the overview (`agent.steps.atlas.find_squares`: empty, broken and heavily
  contaminated squares are atypical) over the squares a screening session of the grid's budget would map, at
  most 1: a grid with few good squares runs out before its budget does;
- **ice** (reported, not ranked on: the probes see its effect): the median overview brightness of the open
  (non-bar) area per second of exposure; below `THICK_ICE_FRACTION` of the run's brightest grid it is called thick.

Rule (`rank_grids`): score = targets per square x hit rate / time per square (diffracting crystals per hour while
squares last) x supply; grids without a planned target or a typical square score 0 and are not screened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.steps import target as target_step
from agent.steps.atlas import find_squares
from agent.steps.calibrate import bar_mask
from agent.steps.map import in_any_box

#: A grid whose film transmits less than this fraction of the brightest grid's (same preset and exposure) is
#: called thick-ice. A guess, not fitted: half the transmission is about one inelastic mean free path more ice
#: (~0.3 um at 200 kV), beyond which MicroED data from sub-micron crystals is poor.
THICK_ICE_FRACTION = 0.5

#: The squares the atlas step calls typical (`agent.steps.atlas.choose_block`'s `min_typicality`).
TYPICAL_MIN = 0.2

#: How many visits the prior hit rate is worth against the probes'.
PRIOR_VISITS = 1.0

#: The prior hit rate without a classifier's probabilities: nothing known either way.
NEUTRAL_PRIOR = 0.5

RANKING_RULE = (
    "score = expected diffracting crystals per hour of screening = targets per mapped square x hit rate / "
    "microscope seconds per square (mapping plus visits) x 3600, x supply (typical squares / squares a grid "
    f"session maps, at most 1). Hit rate = (diffracting probes + {PRIOR_VISITS:g} x prior) / (probes + "
    f"{PRIOR_VISITS:g}), the prior the classifier's mean probability, else {NEUTRAL_PRIOR:g}. No target or no typical "
    "square: 0, not screened. A screened grid is left for the next one when, after its first visits, its hit rate "
    "brings its expected rate below half the next grid's score"
)

_FROZEN = ConfigDict(frozen=True, extra="ignore")


class GridAssessment(BaseModel):
    """What a grid's atlas pass found (see the module docstring); JSON-ready, journalled per grid."""

    model_config = _FROZEN

    slot: int
    label: str = ""
    squares_found: int = 0
    typical_squares: int = 0
    atypical_fraction: float = Field(default=0.0, description="empty, broken or contaminated squares / squares found")
    film_level_per_s: float | None = Field(default=None, description="median overview counts/s of the open area")
    squares_mapped: int = 0
    targets: int = 0
    crystal_clusters: int = 0
    prior: float = Field(default=NEUTRAL_PRIOR, description="the prior hit rate (see the module docstring)")
    probed: int = Field(default=0, description="targets visited by the atlas pass")
    probe_diffracting: int = Field(default=0, description="of those, diffracting (real finds, counted in the run)")
    hit_rate: float = 0.0
    square_s: float = Field(default=0.0, description="microscope seconds per square: its mapping and its visits")
    diffracting_per_hour: float = Field(default=0.0, description="expected while squares last")
    squares_per_session: float = Field(default=0.0, description="squares a screening session of the budget maps")
    supply: float = 0.0
    atlas_pass_s: float = Field(default=0.0, description="microscope seconds of the atlas pass (load excluded)")
    thick_ice: bool = False
    score: float = 0.0


def assess_atlas_pass(session: Any, slot: int, label: str, grid_budget_s: float) -> GridAssessment:
    """The assessment of a finished atlas-pass `ScreeningSession` on the grid of `slot` (see the module
    docstring; `rank_grids` judges the ice against the other grids)."""
    ctx = session.ctx
    squares = find_squares(ctx.overview, bar_mask(ctx, ctx.overview)) if ctx.overview is not None else []
    typical = [s for s in squares if s.typicality >= TYPICAL_MIN]
    mapped = [s for s in squares if in_any_box(s.x_um, s.y_um, ctx.map_boxes_um)]
    squares_mapped = max(len(mapped), 1 if ctx.map_boxes_um else 0)
    probabilities = [t.p_diffract for t in ctx.targets if t.p_diffract is not None]
    prior = float(np.mean(probabilities)) if probabilities and len(probabilities) == len(ctx.targets) else NEUTRAL_PRIOR
    results = [r for r in ctx.results.values() if r.outcome != "failed"]  # a failed visit says nothing of the grid
    diffracting = sum(1 for r in results if r.outcome == "recorded")
    hit = hit_rate(diffracting, len(results), prior) if ctx.targets else 0.0
    summary = session.summary()
    visit_s = summary.per_target_time_s or target_step.visit_estimate_s(ctx.plan)
    targets_per_square = len(ctx.targets) / squares_mapped if squares_mapped else 0.0
    square_s = (ctx.last_mapping_s / squares_mapped if squares_mapped else 0.0) + targets_per_square * visit_s
    per_hour = _rate_per_hour(targets_per_square, hit, square_s)
    squares_per_session = grid_budget_s / square_s if square_s > 0 else 0.0
    supply = min(1.0, len(typical) / squares_per_session) if squares_per_session > 0 else 0.0
    assessment = GridAssessment(
        slot=slot,
        label=label,
        squares_found=len(squares),
        typical_squares=len(typical),
        atypical_fraction=round(1.0 - len(typical) / len(squares), 4) if squares else 1.0,
        film_level_per_s=_film_level_per_s(ctx, typical),
        squares_mapped=squares_mapped,
        targets=len(ctx.targets),
        crystal_clusters=len(ctx.decision.crystal_clusters) if ctx.decision is not None else 0,
        prior=round(prior, 4),
        probed=len(results),
        probe_diffracting=diffracting,
        hit_rate=round(hit, 4),
        square_s=round(square_s, 2),
        diffracting_per_hour=round(per_hour, 3),
        squares_per_session=round(squares_per_session, 2),
        supply=round(supply, 4),
        atlas_pass_s=round(float(summary.microscope_time_s), 2),
    )
    return assessment.model_copy(update={"score": round(expected_per_hour(assessment, hit), 3)})


def hit_rate(diffracting: int, visits: int, prior: float) -> float:
    """The share of a grid's targets expected to diffract after `visits` visits found `diffracting`."""
    return (diffracting + PRIOR_VISITS * prior) / (visits + PRIOR_VISITS)


def expected_per_hour(assessment: GridAssessment, hit: float) -> float:
    """The grid's expected diffracting crystals per hour of screening (its score) at hit rate `hit`."""
    if assessment.squares_mapped <= 0 or not assessment.typical_squares:
        return 0.0
    per_square = assessment.targets / assessment.squares_mapped
    return _rate_per_hour(per_square, hit, assessment.square_s) * assessment.supply


def _rate_per_hour(targets_per_square: float, hit: float, square_s: float) -> float:
    """Diffracting crystals per hour while squares last: each square's targets x hit rate, per its seconds."""
    return targets_per_square * hit / square_s * 3600.0 if square_s > 0 else 0.0


def _film_level_per_s(ctx: Any, typical: Sequence[Any]) -> float | None:
    """Median overview counts per second of exposure over the open (non-bar) area; None without an overview or a
    typical square (the median is robust to the few bright broken squares a usable grid has)."""
    overview = ctx.overview
    if overview is None or not typical:
        return None
    image = np.asarray(overview.image, dtype=np.float64)
    open_film = ~np.asarray(bar_mask(ctx, overview), dtype=bool)
    values = image[open_film]
    if values.size == 0:
        return None
    return round(float(np.median(values)) / ctx.plan.exposures.overview_s, 3)


def rank_grids(assessments: Sequence[GridAssessment]) -> list[GridAssessment]:
    """The assessments with `thick_ice` judged across the run, best score first (ties keep their order)."""
    levels = [a.film_level_per_s for a in assessments if a.film_level_per_s]
    brightest = max(levels) if levels else None
    judged = [
        a.model_copy(
            update={
                "thick_ice": bool(
                    brightest and a.film_level_per_s is not None and a.film_level_per_s < THICK_ICE_FRACTION * brightest
                )
            }
        )
        for a in assessments
    ]
    return sorted(judged, key=lambda a: -a.score)
