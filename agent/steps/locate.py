"""Step `locating`: cluster the atlas' image patches (`agent.locate.analysis.analyse`, pixels only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.locate.analysis import analyse_and_prepare
from agent.session.records import ClusterCount, Located
from agent.steps.context import SessionContext


@dataclass(frozen=True)
class LocateResult:
    """The atlas' cluster analysis (`agent.locate.analysis.ClusterAnalysis`) and the atlas as the analysis
    prepared it (float64; the object search of the targeting step starts from it instead of preparing the
    image again)."""

    analysis: Any
    prepared: np.ndarray | None = None


def locate(ctx: SessionContext) -> LocateResult:
    """Analyse the atlas with the plan's locator settings and record the cluster sizes and suggestion."""
    if ctx.atlas is None:
        raise RuntimeError("locating needs an atlas; the mapping step has not run")
    analysis, prepared = analyse_and_prepare(ctx.atlas.image, ctx.plan.locate)
    ctx.output.record(
        Located(
            clusters=[
                ClusterCount(cluster_id=int(c.cluster_id), n_cells=int(c.n_cells), fraction=float(c.fraction))
                for c in analysis.clusters
            ],
            suggested=list(analysis.suggested_crystal_clusters),
            rule=analysis.suggestion_rule,
        )
    )
    return LocateResult(analysis=analysis, prepared=prepared)
