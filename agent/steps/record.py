"""Step `recording`: a visited target's outcome, from what the visit found, with its previews written.

`outcome_of` turns a visit into a `TargetResult`; the session records it (journal, events, tables).
"""

from __future__ import annotations

from agent.session.outcomes import Outcome, TargetResult
from agent.steps.context import SessionContext, VisitState


def record_target(ctx: SessionContext) -> TargetResult:
    """The outcome of a confirmed (or directly snapped) target: `recorded` when its snapshot has at least
    `confirm.min_spots` spots (or diffraction is off), else `no-diffraction`; its PNG previews are written
    first."""
    visit = ctx.require_visit()
    assert (visit.search is not None or visit.direct) and visit.x_um is not None and visit.y_um is not None
    plan = ctx.plan.confirm
    diffracting = not plan.diffraction or visit.n_spots >= plan.min_spots
    previews = ctx.output.save_target_previews(visit.target.target_id, visit.search, visit.diffraction)
    visit.images.update(previews)
    return outcome_of(
        ctx,
        visit,
        "recorded" if diffracting else "no-diffraction",
        visit.x_um,
        visit.y_um,
        reason="" if diffracting else f"{visit.n_spots} spots < {plan.min_spots}",
    )


def outcome_of(
    ctx: SessionContext, visit: VisitState, outcome: Outcome, x_um: float, y_um: float, reason: str = ""
) -> TargetResult:
    """A `TargetResult` from a visit at any point: what it found so far, the final stage position (um) and
    the session's microscope time now."""
    return TargetResult(
        target_id=visit.target.target_id,
        outcome=outcome,
        x_um=float(x_um),
        y_um=float(y_um),
        recentre_offset_um=float(visit.offset_um),
        confirm_score=float(visit.confirm_score),
        n_spots=int(visit.n_spots),
        signal_to_background=float(visit.signal_to_background),
        reason=reason,
        images=dict(visit.images),
        microscope_time_s=ctx.clock_s(),
        direct=visit.direct,
    )
