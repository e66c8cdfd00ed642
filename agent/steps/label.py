"""Step `labelling`: which clusters hold crystals: label memory first, the operator for what memory is
unsure of, the plan's fallback when nobody answers in time (`agent.prompts.policy`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.prompts.policy import decide_crystal_clusters
from agent.session import outputs
from agent.session.records import Labelled, PromptAsked
from agent.steps.context import SessionContext


@dataclass(frozen=True)
class LabelResult:
    """The labelling decision (`LabellingDecision`) and whether the operator was asked."""

    decision: Any
    asked: bool


def label(ctx: SessionContext) -> LabelResult:
    """Decide the crystal clusters of `ctx.analysis`; a prompt, if asked, is recorded before the decision."""
    if ctx.analysis is None or ctx.atlas is None:
        raise RuntimeError("labelling needs the atlas analysis; the locating step has not run")
    analysis, atlas = ctx.analysis, ctx.atlas
    decision = decide_crystal_clusters(
        analysis,
        plan=ctx.plan.operator,
        specimen=ctx.plan.specimen or "unknown",
        preset=ctx.plan.presets.atlas,
        session_id=ctx.session_id,
        answer_source="simulated" if ctx.info.simulated else "operator",
        memory=ctx.labels,
        channel=ctx.operator,
        sample_xy_um=lambda cluster: sample_xy_um(ctx, cluster),
        prompt_images=lambda: outputs.prompt_images(atlas.image, analysis),
        reference_clusters=lambda: reference_clusters(ctx),
    )
    if decision.asked:
        ctx.output.record(PromptAsked(prompt_id=decision.prompt_id, answered_by=decision.answered_by))
    ctx.output.record(Labelled.model_validate(decision.as_dict()))
    return LabelResult(decision=decision, asked=bool(decision.asked))


def sample_xy_um(ctx: SessionContext, cluster: Any) -> list[list[float]]:
    """Stage positions (um, rounded to nm) of a cluster's example cells, shown with the prompt."""
    assert ctx.atlas is not None
    rows_cols = np.asarray(cluster.example_cells_px, dtype=np.float64).reshape(-1, 2)
    xy = ctx.atlas.pixel_to_stage_um(rows_cols[:, ::-1])
    return [[round(float(x), 3), round(float(y), 3)] for x, y in xy]


def reference_clusters(ctx: SessionContext) -> list[int]:
    """The clusters of the plan's reference cells (operator.reference_cells, (row, col) of the label grid)."""
    grid = np.asarray(ctx.analysis.label_grid)
    return sorted(
        {
            int(grid[r, c])
            for r, c in ctx.plan.operator.reference_cells
            if 0 <= r < grid.shape[0] and 0 <= c < grid.shape[1] and grid[r, c] >= 0
        }
    )
