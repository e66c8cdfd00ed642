"""Learning from the microscope during a session: the crystal classifier (`agent.prompts.crystal_classifier`)
fitted from label memory and from this session's own outcomes, the probabilities it gives the targets, and
the re-ranking of the targets not visited yet.

- At the first targeting the memory's object records are read once (`SessionLearning.prior`): every record
  except those this session wrote itself (same session id, written since it started), so that a resumed
  session starts from the same records as the uninterrupted one would have.
- This session's outcomes are not read back from the memory but rebuilt from its targets and results
  (`session_records`), which resume restores from the journal: the fits are the same either way.
- Every visited target's outcome goes to the memory (`remember`): "diffracting", "no-spots" or
  "not-found", with the object's features; a failed or skipped visit says nothing about the object.
- An operator's cluster answers are spread to the answered clusters' objects (`remember_answers`):
  "crystal" or "not-crystal", for later sessions.
- The classifier is always the fit on the prior and the session's first n outcomes, n the largest multiple
  of `REFIT_EVERY` reached (`classifier`): a pure function of the journal, so resume gets the same one.
- When the n-th outcome is in, n a multiple of `REFIT_EVERY`, the targets left are re-ranked (`rerank`,
  from `ScreeningEngine.advance`): their probabilities replaced, tiers by probability (`TargetRecord.tier`),
  each tier on a short path from where the stage is. The `TargetsRanked` record holds the new order;
  resume applies it as recorded, and re-ranks at once if the kill came between the outcome and its ranking.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from agent.locate.object_features import CANDIDATE_FEATURE_NAMES
from agent.prompts.crystal_classifier import CrystalClassifier, fit_classifier
from agent.prompts.label_records import LabelMemoryError
from agent.prompts.object_records import ObjectLabel, ObjectRecord
from agent.session.outcomes import TargetRecord, TargetResult
from agent.session.records import RankedTarget, TargetsRanked
from agent.steps.context import SessionContext
from agent.steps.motion import order_by_tier

logger = logging.getLogger(__name__)

#: Outcomes between two refits of the classifier during a session: often enough that a session learns from
#: its first results, seldom enough that one odd result does not reorder everything.
REFIT_EVERY = 3

#: A visited target's outcome as an object label (failed and skipped visits say nothing about the object).
OUTCOME_LABELS: dict[str, ObjectLabel] = {
    "recorded": "diffracting",
    "no-diffraction": "no-spots",
    "rejected": "not-found",
}


@dataclass
class SessionLearning:
    """What the session learnt so far: the memory's records at its start (`prior`), the classifier fitted on
    them and the session's first `fitted_on` outcomes (None: too few records; the cold-start rule ranks), and
    after how many outcomes the targets were last re-ranked (`ranked_at`)."""

    prior: list[ObjectRecord] = field(default_factory=list)
    model: CrystalClassifier | None = None
    fitted_on: int = -1
    ranked_at: int = 0


def learning(ctx: SessionContext) -> SessionLearning:
    """The session's learning state, created (memory read once) on first use."""
    if ctx.learning is None:
        ctx.learning = SessionLearning(prior=_prior_records(ctx))
    return ctx.learning


def classifier(ctx: SessionContext) -> CrystalClassifier | None:
    """The classifier on the memory's records and the session's first n outcomes, n the largest multiple of
    `REFIT_EVERY` reached (refit when n grew)."""
    state = learning(ctx)
    outcomes = session_records(ctx)
    n = len(outcomes) // REFIT_EVERY * REFIT_EVERY
    if state.fitted_on != n:
        state.model, state.fitted_on = _fit(ctx, state.prior + outcomes[:n]), n
        if state.model is not None:
            logger.info("%s", state.model.describe())
    return state.model


def ranked_by(ctx: SessionContext) -> str | None:
    """What ranks the targets now, for the summary: the classifier's description, or the cold-start rule
    (None before the first targeting)."""
    if ctx.learning is None:
        return None
    model = classifier(ctx)  # the fit for the outcomes so far (a pure function of them: the same after resume)
    return model.describe() if model is not None else "cold-start rule (too few outcomes in label memory)"


def _prior_records(ctx: SessionContext) -> list[ObjectRecord]:
    """The memory's object records of the atlas preset, without those this session wrote."""
    if ctx.labels is None or not hasattr(ctx.labels, "object_records"):
        return []
    started: datetime | None = ctx.started_utc
    try:
        records = ctx.labels.object_records(preset=ctx.plan.presets.atlas)
    except LabelMemoryError as exc:
        logger.warning("label memory: object records not used (%s)", exc)
        return []
    return [r for r in records if not (r.session == ctx.session_id and (started is None or r.time_utc >= started))]


def _fit(ctx: SessionContext, records: list[ObjectRecord]) -> CrystalClassifier | None:
    return fit_classifier(
        records,
        specimen=ctx.plan.specimen or "unknown",
        preset=ctx.plan.presets.atlas,
        feature_names=CANDIDATE_FEATURE_NAMES,
        real_microscope=not ctx.info.simulated,
    )


def _record(ctx: SessionContext, target: TargetRecord, result: TargetResult) -> ObjectRecord | None:
    """The object record of one visited target, None when the outcome or the features say nothing."""
    label = OUTCOME_LABELS.get(result.outcome)
    if label is None or not target.features:
        return None
    return ObjectRecord(
        features=tuple(float(target.features[name]) for name in CANDIDATE_FEATURE_NAMES),
        feature_names=CANDIDATE_FEATURE_NAMES,
        label=label,
        source="simulated" if ctx.info.simulated else "microscope",
        specimen=ctx.plan.specimen or "unknown",
        preset=ctx.plan.presets.atlas,
        session=ctx.session_id,
        target_id=target.target_id,
    )


def session_records(ctx: SessionContext) -> list[ObjectRecord]:
    """This session's outcomes as object records, in the order the targets finished."""
    planned = {t.target_id: t for t in ctx.targets}
    records = []
    for target_id, result in ctx.results.items():
        target = planned.get(target_id)
        record = _record(ctx, target, result) if target is not None else None
        if record is not None:
            records.append(record)
    return records


def remember(ctx: SessionContext, target: TargetRecord, result: TargetResult) -> None:
    """Store a visited target's outcome in the label memory (if the session has one)."""
    record = _record(ctx, target, result)
    if record is None or ctx.labels is None or not hasattr(ctx.labels, "add_objects"):
        return
    try:
        ctx.labels.add_objects([record])
    except (LabelMemoryError, OSError) as exc:  # the session goes on; the outcome is in the journal
        logger.warning("label memory: outcome of %s not stored (%s)", target.target_id, exc)


def probabilities(ctx: SessionContext, features: list[dict[str, float]]) -> list[float | None]:
    """The current classifier's probability for each feature dict; None for all without a classifier and
    for entries without features."""
    model = classifier(ctx)
    if model is None:
        return [None] * len(features)
    rows = [i for i, f in enumerate(features) if f]
    out: list[float | None] = [None] * len(features)
    if rows:
        table = np.array([[features[i][name] for name in CANDIDATE_FEATURE_NAMES] for i in rows])
        for i, p in zip(rows, model.probability(table), strict=True):
            out[i] = round(float(p), 6)
    return out


def rerank(ctx: SessionContext) -> TargetsRanked | None:
    """Re-rank the targets not visited yet when the session's outcomes reached a new multiple of
    `REFIT_EVERY`; returns the record of the new order (None when not due, no classifier, or nothing left)."""
    state = learning(ctx)
    n = len(session_records(ctx))
    if n == 0 or n % REFIT_EVERY or n == state.ranked_at:
        return None
    state.ranked_at = n
    model = classifier(ctx)
    pending = [t for t in ctx.targets if t.target_id not in ctx.results]
    if model is None or not pending:
        return None
    p = probabilities(ctx, [t.features for t in pending])
    updated = [t.model_copy(update={"p_diffract": q}) if q is not None else t for t, q in zip(pending, p, strict=True)]
    here = ctx.microscope.get_stage()
    order = order_by_tier((here.x_um, here.y_um), updated, lambda t: t.tier, lambda t: (t.x_um, t.y_um))
    record = TargetsRanked(
        after_outcomes=n,
        classifier=model.describe(),
        targets=[RankedTarget(target_id=t.target_id, p_diffract=t.p_diffract) for t in order],
    )
    apply_ranking(ctx, record)
    return record


def apply_ranking(ctx: SessionContext, record: TargetsRanked) -> None:
    """Put the pending targets in `record`'s order with its probabilities (finished ones stay as they are);
    resume calls it for every such record, in journal order."""
    learning(ctx).ranked_at = record.after_outcomes
    ranked = {r.target_id: r.p_diffract for r in record.targets}
    finished = [t for t in ctx.targets if t.target_id not in ranked]
    by_id = {t.target_id: t for t in ctx.targets}
    reordered = [
        by_id[r.target_id].model_copy(update={"p_diffract": ranked[r.target_id], "order": len(finished) + rank})
        for rank, r in enumerate(record.targets)
        if r.target_id in by_id
    ]
    ctx.targets[:] = finished + reordered


#: Most objects one operator answer spreads to, per label: a cluster answer is about a region, so its many
#: objects should not outnumber the visit outcomes in the memory.
MAX_SPREAD_PER_LABEL = 40


def remember_answers(ctx: SessionContext, crystal: list[Any], not_crystal: list[Any], round_number: int) -> int:
    """Store the operator's cluster answers of this round as object records: the objects (`Candidate`s with
    features) of clusters answered "crystal" and of clusters answered "not crystal", at most
    `MAX_SPREAD_PER_LABEL` of each, evenly over the locator's order. Later sessions learn from them (this
    session ranks by the memory it started with and its own outcomes). Record ids are derived from the
    session, round and object, so a round planned again after a restart adds nothing twice. Returns how
    many records were written."""
    if ctx.labels is None or not hasattr(ctx.labels, "add_objects"):
        return 0
    source = "simulated" if ctx.info.simulated else "operator"
    records = []
    for label, candidates in (("crystal", crystal), ("not-crystal", not_crystal)):
        usable = [c for c in candidates if c.features]
        step = max(1, -(-len(usable) // MAX_SPREAD_PER_LABEL))
        for index, candidate in enumerate(usable[::step][:MAX_SPREAD_PER_LABEL]):
            key = f"{ctx.session_id}/{round_number}/{label}/{index}/{candidate.row_px:.2f}/{candidate.col_px:.2f}"
            records.append(
                ObjectRecord(
                    id=uuid.uuid5(uuid.NAMESPACE_URL, key).hex,
                    features=tuple(float(v) for v in candidate.features),
                    feature_names=CANDIDATE_FEATURE_NAMES,
                    label=label,  # type: ignore[arg-type]
                    source=source,  # type: ignore[arg-type]
                    specimen=ctx.plan.specimen or "unknown",
                    preset=ctx.plan.presets.atlas,
                    session=ctx.session_id,
                )
            )
    try:
        known = {r.id for r in ctx.labels.object_records(preset=ctx.plan.presets.atlas)}
        new = [r for r in records if r.id not in known]
        ctx.labels.add_objects(new)
    except (LabelMemoryError, OSError) as exc:
        logger.warning("label memory: answers not spread to objects (%s)", exc)
        return 0
    return len(new)
