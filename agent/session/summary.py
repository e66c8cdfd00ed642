"""The session's numbers: counts, throughput per microscope hour, where the time went, truth scores.

Throughput counts what a user counts: a target is *confirmed* when its object was found again at the
search preset, and *diffracting* when its diffraction snapshot passed the plan's `confirm.min_spots`
(outcome `recorded`). Rates are per hour of microscope time, the whole session's (fixed costs included).
"""

from __future__ import annotations

from typing import Any

from agent.config import ScreeningPlan
from agent.session.outcomes import SessionSummary, TargetRecord, TargetResult
from agent.session.timing import StateTimes


def _per_hour(count: int, time_s: float) -> float | None:
    return round(3600.0 * count / time_s, 2) if count and time_s > 0 else None


def _per_item(time_s: float, count: int) -> float | None:
    return round(time_s / count, 2) if count else None


def summarise(
    *,
    session_id: str,
    state: str,
    plan: ScreeningPlan,
    targets: list[TargetRecord],
    results: dict[str, TargetResult],
    prompts: int,
    faults: int,
    microscope_time_s: float,
    wall_time_s: float,
    state_times: StateTimes,
    truth: dict[str, Any],
    rounds: int = 0,
    ranked_by: str | None = None,
) -> SessionSummary:
    """The summary of a session now (times in seconds of microscope time, but `wall_time_s`)."""
    confirmed = sum(1 for r in results.values() if r.confirmed)
    recorded = sum(1 for r in results.values() if r.outcome == "recorded")
    diffracting = recorded if plan.confirm.diffraction else None
    return SessionSummary(
        session=session_id,
        state=state,
        specimen=plan.specimen,
        targets_found=len(targets),
        targets_visited=len(results),
        targets_confirmed=confirmed,
        targets_recorded=recorded,
        targets_snapped_directly=sum(1 for r in results.values() if r.direct),
        diffracting_crystals=diffracting,
        prompts=prompts,
        microscope_time_s=round(microscope_time_s, 2),
        diffracting_per_hour=_per_hour(diffracting or 0, microscope_time_s),
        time_per_diffracting_s=_per_item(microscope_time_s, diffracting or 0),
        time_per_confirmed_s=_per_item(microscope_time_s, confirmed),
        confirmed_per_hour=_per_hour(confirmed, microscope_time_s),
        fixed_time_s=state_times.fixed_time_s(microscope_time_s),
        per_target_time_s=_per_item(state_times.target_time_s(microscope_time_s), len(results)),
        faults=faults,
        wall_time_s=round(wall_time_s, 2),
        rounds=rounds,
        time_budget_s=plan.time_budget_s,
        limited_by=_limited_by(state, plan, targets, results, microscope_time_s),
        ranked_by=ranked_by,
        **truth,
    )


def _limited_by(
    state: str, plan: ScreeningPlan, targets: list[TargetRecord], results: dict[str, TargetResult], time_s: float
) -> str | None:
    """Why a finished session did not screen more: planned targets left when the budget ran out, the budget
    spent by a session sized by it, or the target cap reached; None otherwise (or while it runs)."""
    if state != "done":
        return None
    budget_s = plan.time_budget_s
    left = len(targets) - len(results)
    if budget_s is not None and left > 0:
        return f"time budget: {left} planned targets not visited"
    if budget_s is not None and plan.sized_by_budget and time_s >= 0.9 * budget_s:
        return "time budget: no budget left for another round of squares"
    cap = plan.targeting.max_targets
    if cap is not None and len(targets) >= cap:
        return f"max_targets: the cap of {cap} targets was reached"
    return None
