"""Which grids are worth screening: what each grid's atlas pass found, and the ranking rule.

A grid's worth is the diffracting crystals a screening session on it can be expected to find. The atlas pass
(an atlas-only session: overview, one block of squares mapped, located, labelled, targets planned) gives:

- **crystal yield per square**: the sum of the planned targets' crystal likelihood over the squares mapped. The
  likelihood is the crystal classifier's probability (`TargetRecord.p_diffract`) when label memory gave one,
  else the locator's cold-start score (`agent.locate.object_features.cold_start_score`, 0-1: faceted and
  standing out from the film), which ranks but is not a probability. Only targets of crystal clusters (as label
  memory, the operator or the fallback decided) are planned, so this counts crystal-bearing clusters' objects.
- **supply**: typical squares on the overview (`agent.steps.atlas.find_squares`: empty, broken and heavily
  contaminated squares are atypical) over the squares a screening session of the grid's budget would map (from
  the atlas pass's own time per square and `target.visit_estimate_s` per planned target), at most 1: a grid with
  few good squares runs out before its budget does.
- **ice**: the median overview brightness of the open (non-bar) area per second of exposure. Thicker ice
  transmits less; a grid whose film is below `THICK_ICE_FRACTION` of the brightest grid's in the run is called thick.

Rule (`rank_grids`): score = yield per square x supply; grids without a planned target or a typical square score
0 and are not screened; thick-ice grids come after all others; ties keep the slot order.
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

RANKING_RULE = (
    "score = crystal yield per mapped square (sum of the targets' classifier probability, else cold-start score) "
    "x supply (typical squares / squares a grid session maps, at most 1); no target or no typical square: 0, not "
    f"screened; film below {THICK_ICE_FRACTION:g} x the brightest grid's: thick ice, ranked last"
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
    expected_crystals: float = Field(default=0.0, description="sum of the targets' crystal likelihood")
    yield_per_square: float = 0.0
    squares_per_session: float = Field(default=0.0, description="squares a screening session of the budget maps")
    supply: float = 0.0
    atlas_pass_s: float = Field(default=0.0, description="microscope seconds of the atlas pass (load excluded)")
    thick_ice: bool = False
    score: float = 0.0


def assess_atlas_pass(session: Any, slot: int, label: str, grid_budget_s: float) -> GridAssessment:
    """The assessment of a finished atlas-only `ScreeningSession` on the grid of `slot` (before ice is judged
    against the other grids: `rank_grids` does that)."""
    ctx = session.ctx
    squares = find_squares(ctx.overview, bar_mask(ctx, ctx.overview)) if ctx.overview is not None else []
    typical = [s for s in squares if s.typicality >= TYPICAL_MIN]
    mapped = [s for s in squares if in_any_box(s.x_um, s.y_um, ctx.map_boxes_um)]
    likelihoods = [t.p_diffract if t.p_diffract is not None else t.score for t in ctx.targets]
    expected = float(np.sum(likelihoods)) if likelihoods else 0.0
    squares_mapped = max(len(mapped), 1 if ctx.map_boxes_um else 0)
    per_square = expected / squares_mapped if squares_mapped else 0.0
    atlas_pass_s = float(session.microscope_time_s())
    # what one more square costs a screening session: its share of the mapping, and its targets' visits
    square_s = ctx.last_mapping_s / squares_mapped if squares_mapped else 0.0
    square_s += len(ctx.targets) / max(squares_mapped, 1) * target_step.visit_estimate_s(ctx.plan)
    squares_per_session = grid_budget_s / square_s if square_s > 0 else 0.0
    supply = min(1.0, len(typical) / squares_per_session) if squares_per_session > 0 else 0.0
    return GridAssessment(
        slot=slot,
        label=label,
        squares_found=len(squares),
        typical_squares=len(typical),
        atypical_fraction=1.0 - len(typical) / len(squares) if squares else 1.0,
        film_level_per_s=_film_level_per_s(ctx, typical),
        squares_mapped=squares_mapped,
        targets=len(ctx.targets),
        crystal_clusters=len(ctx.decision.crystal_clusters) if ctx.decision is not None else 0,
        expected_crystals=round(expected, 4),
        yield_per_square=round(per_square, 4),
        squares_per_session=round(squares_per_session, 2),
        supply=round(supply, 4),
        atlas_pass_s=round(atlas_pass_s, 2),
        score=round(per_square * supply, 4) if ctx.targets and typical else 0.0,
    )


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
    """The assessments with `thick_ice` judged across the run, best first (see the module docstring)."""
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
    return sorted(judged, key=lambda a: (a.score <= 0, a.thick_ice, -a.score))
