"""Which clusters hold crystals: label memory first, then the operator, then the plan's fallback.

1. Label memory (`agent.prompts.memory.LabelMemory`) suggests a label for every cluster from clusters
   labelled in earlier sessions of the same specimen type and preset. Confident suggestions are taken as
   they are. A cluster memory calls mixed (look-alike clusters answered both ways before, so often that one
   more answer could not make memory sure at `plan.min_confidence`: typically a flake or fibre edge with
   some of its cells on crystals) is handled by `plan.mixed`: by default no prompt is asked for it alone,
   since the answer would be a coin toss, and its targets fill the places the crystal clusters' targets
   leave (`targeting.max_targets`) and are visited after them (`LabellingDecision.mixed_clusters`,
   `TargetRecord.from_mixed_cluster`), so the search-preset check decides object by object. When a prompt
   goes out for other clusters anyway, mixed clusters are put in it too: their answers keep accumulating,
   so a cluster made mixed by one careless answer among few can become sure again. `plan.mixed` is applied
   whatever `plan.fallback` says (set it and `plan.fallback` to "skip" for a run that draws targets only
   from clusters someone is sure about).
2. Clusters left unsure are put to the operator as one prompt (heat map + gallery images, one option per
   unsure cluster, several may be chosen, plus "none of these"). The loop waits at most `operator.wait_s`
   real seconds; the prompt stays open until its deadline.
3. Without an answer the plan's fallback decides: `label-memory` (the best guess even below the
   confidence threshold, else the locator's default rule), `default-rule`, `reference` (clusters of the
   plan's reference cells), or `skip` (no targets from unsure clusters). The decision and its source are
   recorded; answers are stored in label memory so the next session asks less (the agent's own labels
   are stored too, as source "auto", which label memory keeps for context but never counts as a vote).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import OperatorPlan
from agent.prompts.wire import Prompt, PromptOption

logger = logging.getLogger(__name__)

NONE_OPTION = "none"


@dataclass(frozen=True)
class LabellingDecision:
    """The crystal clusters chosen, the mixed clusters whose targets come after theirs (`plan.mixed` "last"),
    and for each cluster where its label came from."""

    crystal_clusters: tuple[int, ...]
    sources: dict[int, str]
    confidences: dict[int, float]
    prompt_id: str | None = None
    answered_by: str | None = None
    asked: bool = False
    notes: list[str] = field(default_factory=list)
    mixed_clusters: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form for the journal."""
        return {
            "crystal_clusters": list(self.crystal_clusters),
            "mixed_clusters": list(self.mixed_clusters),
            "sources": {str(k): v for k, v in self.sources.items()},
            "confidences": {str(k): round(v, 3) for k, v in self.confidences.items()},
            "prompt_id": self.prompt_id,
            "answered_by": self.answered_by,
            "asked": self.asked,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class _Where:
    """What the labels are about: the specimen type, optics preset and session they are stored under."""

    specimen: str
    preset: str
    session_id: str
    answer_source: str = "operator"


@dataclass
class _Labels:
    """The labels decided so far, per cluster id: crystal or not, where from, memory's confidence, and the
    mixed clusters not worth a prompt of their own (`plan.mixed` "last" or "skip")."""

    labels: dict[int, bool] = field(default_factory=dict)
    sources: dict[int, str] = field(default_factory=dict)
    confidences: dict[int, float] = field(default_factory=dict)
    mixed: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    prompt_id: str | None = None
    answered_by: str | None = None
    asked: bool = False


def decide_crystal_clusters(
    analysis: Any,
    *,
    plan: OperatorPlan,
    specimen: str,
    preset: str,
    session_id: str,
    memory: Any | None,
    channel: Any | None,
    sample_xy_um: Callable[[Any], list[list[float]]],
    prompt_images: Callable[[], dict[str, bytes]],
    reference_clusters: Callable[[], Sequence[int]] = lambda: (),
    answer_source: str = "operator",
) -> LabellingDecision:
    """Decide which of `analysis.clusters` hold crystals (see module docstring).

    `answer_source` is how answers are stored in label memory: `operator`, or `simulated` in a session on a
    simulated microscope (its answers must never count as a person's on a real one).

    `sample_xy_um(cluster)` gives stage positions of typical cells of a cluster (sent with the prompt so
    tools and simulated operators can look there); `prompt_images()` renders the PNGs for a prompt only
    when one is asked.
    """
    clusters = list(analysis.clusters)
    cluster_ids = [int(c.cluster_id) for c in clusters]
    where = _Where(specimen, preset, session_id, answer_source)
    state = _Labels()
    suggestions: list[Any] = [None] * len(clusters)
    if memory is not None and clusters:
        suggestions = _take_memory_labels(memory, analysis, clusters, plan, where, state)
    split = {cid for cid, s in zip(cluster_ids, suggestions, strict=True) if s is not None and s.mixed}

    unsure = [c for c in clusters if int(c.cluster_id) not in state.labels and int(c.cluster_id) not in state.mixed]
    if unsure and plan.ask and channel is not None:
        # a prompt goes out anyway: mixed clusters ride along, so their answers keep accumulating (one
        # careless answer among few must not make a cluster mixed for good) at no extra prompt
        unsure = [c for c in clusters if int(c.cluster_id) not in state.labels]
        prompt = _cluster_prompt(unsure, split, plan, where, sample_xy_um, prompt_images)
        _ask_operator(channel, prompt, memory, analysis, unsure, plan, where, state)

    for cluster_id in state.mixed:  # not answered: the plan's handling of mixed clusters, not the fallback
        state.labels[cluster_id] = False
        state.sources[cluster_id] = f"label-memory:mixed-{plan.mixed}"
    still_unsure = [c for c in clusters if int(c.cluster_id) not in state.labels]
    if still_unsure:
        fallback = _fallback_labels(analysis, still_unsure, plan, suggestions, cluster_ids, reference_clusters)
        for cluster_id, (is_crystal, source) in fallback.items():
            state.labels[cluster_id] = is_crystal
            state.sources[cluster_id] = source
    crystal = tuple(sorted(cid for cid, is_crystal in state.labels.items() if is_crystal))
    if memory is not None:  # the agent's own labels are kept too, with no vote (source "auto")
        automatic = [c for c in clusters if state.sources.get(int(c.cluster_id)) != "operator"]
        if automatic:
            _remember(memory, analysis, automatic, state.labels, where, "auto")
    return LabellingDecision(
        crystal_clusters=crystal,
        mixed_clusters=tuple(sorted(state.mixed)) if plan.mixed == "last" else (),
        sources=state.sources,
        confidences=state.confidences,
        prompt_id=state.prompt_id,
        answered_by=state.answered_by,
        asked=state.asked,
        notes=state.notes,
    )


def _take_memory_labels(
    memory: Any, analysis: Any, clusters: Sequence[Any], plan: OperatorPlan, where: _Where, state: _Labels
) -> list[Any]:
    """Ask label memory about every cluster; take its confident labels into `state`, note the mixed clusters
    (unless `plan.mixed` is "ask") and every confidence. Returns the suggestions, in cluster order."""
    centroids = np.array([np.asarray(c.normalised_centroid, dtype=np.float64) for c in clusters])
    suggestions = list(
        memory.suggest(
            centroids,
            tuple(analysis.feature_names),
            where.specimen,
            where.preset,
            confidence_threshold=plan.min_confidence,
        )
    )
    for cluster, suggestion in zip(clusters, suggestions, strict=True):
        cluster_id = int(cluster.cluster_id)
        state.confidences[cluster_id] = float(suggestion.confidence)
        if suggestion.confidence >= plan.min_confidence:
            state.labels[cluster_id] = bool(suggestion.is_crystal)
            state.sources[cluster_id] = "label-memory"
        elif suggestion.mixed and plan.mixed != "ask":
            state.mixed.add(cluster_id)
    return suggestions


def _cluster_prompt(
    unsure: Sequence[Any],
    split: set[int],
    plan: OperatorPlan,
    where: _Where,
    sample_xy_um: Callable[[Any], list[list[float]]],
    prompt_images: Callable[[], dict[str, bytes]],
) -> Prompt:
    """The prompt that asks which of the `unsure` clusters contain crystals (several may be chosen, or none);
    clusters in `split` are marked as answered both ways before."""
    options = [
        PromptOption(
            id=f"cluster-{c.cluster_id}",
            label=f"cluster {c.cluster_id} ({100 * c.fraction:.1f} % of the atlas)",
            description="contains crystals"
            + ("; clusters like it were answered both ways before" if int(c.cluster_id) in split else ""),
            context={
                "cluster_id": int(c.cluster_id),
                "sample_xy_um": sample_xy_um(c),
                "answered_both_ways": int(c.cluster_id) in split,
            },
        )
        for c in unsure
    ]
    options.append(PromptOption(id=NONE_OPTION, label="none of these contain crystals"))
    return Prompt(
        kind="crystal-clusters",
        question="Which of these clusters contain crystals? (choose all that do)",
        options=tuple(options),
        multiple=True,
        timeout_s=plan.deadline_s,
        images=prompt_images(),
        context={"specimen": where.specimen, "preset": where.preset, "session": where.session_id},
    )


def _ask_operator(
    channel: Any,
    prompt: Prompt,
    memory: Any | None,
    analysis: Any,
    unsure: Sequence[Any],
    plan: OperatorPlan,
    where: _Where,
    state: _Labels,
) -> None:
    """Ask `prompt`, wait at most `plan.wait_s` seconds, and take the answer's labels for the `unsure`
    clusters into `state` (stored in label memory as the operator's); without an answer, a note."""
    handle = channel.ask(prompt)
    state.asked = True
    state.prompt_id = handle.id
    answer = handle.wait(plan.wait_s)
    if answer is None:
        state.notes.append(
            f"prompt {state.prompt_id} not answered within {plan.wait_s:.0f} s; fallback {plan.fallback}"
        )
        return
    state.answered_by = answer.operator
    chosen = set(answer.option_ids)
    for c in unsure:
        state.labels[int(c.cluster_id)] = f"cluster-{c.cluster_id}" in chosen
        state.sources[int(c.cluster_id)] = "operator"
        state.mixed.discard(int(c.cluster_id))
    if memory is not None:
        _remember(memory, analysis, unsure, state.labels, where, where.answer_source)


def _fallback_labels(
    analysis: Any,
    unsure: Sequence[Any],
    plan: OperatorPlan,
    suggestions: Sequence[Any],
    cluster_ids: Sequence[int],
    reference_clusters: Callable[[], Sequence[int]],
) -> dict[int, tuple[bool, str]]:
    """Labels for clusters nobody was sure about, following `plan.fallback`."""
    default = set(int(c) for c in analysis.suggested_crystal_clusters)
    by_id = dict(zip(cluster_ids, suggestions, strict=True))
    result: dict[int, tuple[bool, str]] = {}
    for cluster in unsure:
        cid = int(cluster.cluster_id)
        if plan.fallback == "skip":
            result[cid] = (False, "fallback:skip")
        elif plan.fallback == "reference":
            result[cid] = (cid in set(reference_clusters()), "fallback:reference")
        elif plan.fallback == "label-memory" and by_id.get(cid) is not None and by_id[cid].n_support > 0:
            result[cid] = (bool(by_id[cid].is_crystal), "fallback:label-memory")
        else:
            result[cid] = (cid in default, "fallback:default-rule")
    return result


def _remember(
    memory: Any, analysis: Any, clusters: Sequence[Any], labels: dict[int, bool], where: _Where, source: str
) -> None:
    """Store the labels of `clusters` in label memory (`LabelMemory.record_clusters`)."""
    memory.record_clusters(
        np.array([np.asarray(c.normalised_centroid, dtype=np.float64) for c in clusters]),
        tuple(analysis.feature_names),
        [labels[int(c.cluster_id)] for c in clusters],
        specimen=where.specimen,
        preset=where.preset,
        session=where.session_id,
        source=source,
        cluster_ids=[int(c.cluster_id) for c in clusters],
    )
