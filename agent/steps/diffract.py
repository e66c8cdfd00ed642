"""Step `diffraction`: a diffraction snapshot of the confirmed target, scored by its Bragg spot count."""

from __future__ import annotations

from agent.steps.context import SessionContext
from agent.steps.diffraction_score import score_diffraction


def diffract(ctx: SessionContext) -> None:
    """Take and score the snapshot (saved; the visit holds the spot count and signal-to-background).

    With `confirm.diffraction` off, nothing is acquired and the target counts as diffracting."""
    visit = ctx.require_visit()
    if not ctx.plan.confirm.diffraction:
        visit.n_spots, visit.signal_to_background = 0, 0.0
        return
    frame = ctx.microscope.acquire_diffraction(ctx.plan.exposures.diffraction_s)
    target_id = visit.target.target_id
    visit.images["diffraction"] = ctx.output.save_frame(
        "diffraction", f"targets/{target_id}_diffraction.tif", frame, target_id
    )
    score = score_diffraction(frame.image)
    visit.n_spots, visit.signal_to_background = score.n_spots, score.signal_to_background
    visit.diffraction = frame
