"""`decide_crystal_clusters`: label memory first, then the operator, and what happens to mixed clusters.

Real parts only: the locator's analysis of a real-world-like image, a label memory in a temporary folder
and an `OperatorChannel` on loopback with nobody connected (so any prompt goes unanswered).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.config import OperatorPlan
from agent.locate.analysis import ClusterAnalysis, LocateSettings, analyse
from agent.prompts import LabelMemory, OperatorChannel, OperatorClient, PromptInfo, decide_crystal_clusters
from tests.synthetic_images import make_grid_image


@pytest.fixture(scope="module")
def analysis() -> ClusterAnalysis:
    image = make_grid_image(seed=3).image
    return analyse(image, LocateSettings(mode="window", window_px=15, stride_px=4, k=4))


def _remember(memory: LabelMemory, analysis: ClusterAnalysis, flipped_in_one_session: int) -> LabelMemory:
    """`memory` after three earlier sessions saw exactly these clusters; cluster `flipped_in_one_session` was
    answered "crystal" in two of them and "not crystal" in the third, every other cluster the same way each time."""
    centroids = np.array([c.normalised_centroid for c in analysis.clusters])
    ids = [int(c.cluster_id) for c in analysis.clusters]
    for session in ("s1", "s2", "s3"):
        labels = [cid == flipped_in_one_session and session != "s3" for cid in ids]
        memory.record_clusters(
            centroids, analysis.feature_names, labels, specimen="p", preset="atlas", session=session, cluster_ids=ids
        )
    return memory


def _decide(analysis: ClusterAnalysis, memory: LabelMemory, plan: OperatorPlan, channel: OperatorChannel):
    return decide_crystal_clusters(
        analysis,
        plan=plan,
        specimen="p",
        preset="atlas",
        session_id="new",
        memory=memory,
        channel=channel,
        sample_xy_um=lambda cluster: [[0.0, 0.0]],
        prompt_images=lambda: {},
    )


def test_a_cluster_answered_both_ways_is_not_asked_about_and_is_handed_to_targeting_as_mixed(
    analysis: ClusterAnalysis, label_memory: LabelMemory, operator_channel: OperatorChannel
) -> None:
    mixed_id = int(analysis.clusters[-1].cluster_id)
    memory = _remember(label_memory, analysis, mixed_id)
    suggestions = memory.suggest(
        np.array([c.normalised_centroid for c in analysis.clusters]), analysis.feature_names, "p", "atlas"
    )
    assert [s.mixed for s in suggestions] == [int(c.cluster_id) == mixed_id for c in analysis.clusters]

    plan = OperatorPlan(wait_s=0.2)
    last = _decide(analysis, memory, plan, operator_channel)
    assert not last.asked and last.prompt_id is None
    assert last.mixed_clusters == (mixed_id,) and mixed_id not in last.crystal_clusters
    assert last.sources[mixed_id] == "label-memory:mixed-last"
    assert all(last.sources[int(c.cluster_id)] == "label-memory" for c in analysis.clusters[:-1])
    assert last.as_dict()["mixed_clusters"] == [mixed_id]

    skip = _decide(analysis, memory, plan.model_copy(update={"mixed": "skip"}), operator_channel)
    assert not skip.asked and skip.mixed_clusters == () and mixed_id not in skip.crystal_clusters
    assert skip.sources[mixed_id] == "label-memory:mixed-skip"

    ask = _decide(analysis, memory, plan.model_copy(update={"mixed": "ask"}), operator_channel)
    assert ask.asked and ask.answered_by is None and ask.prompt_id is not None  # nobody is connected
    assert ask.mixed_clusters == () and ask.sources[mixed_id].startswith("fallback:")
    options = operator_channel.handle(ask.prompt_id).prompt.options
    flagged = [o for o in options if o.context.get("answered_both_ways")]
    assert [o.id for o in flagged] == [f"cluster-{mixed_id}"] and "both ways" in flagged[0].description


def test_a_cluster_answered_the_same_way_every_time_is_not_mixed(
    analysis: ClusterAnalysis, label_memory: LabelMemory, operator_channel: OperatorChannel
) -> None:
    memory = _remember(label_memory, analysis, flipped_in_one_session=-1)  # no cluster flipped
    decision = _decide(analysis, memory, OperatorPlan(wait_s=0.2), operator_channel)
    assert not decision.asked and decision.mixed_clusters == () and decision.crystal_clusters == ()
    assert set(decision.sources.values()) == {"label-memory"}


def test_mixed_clusters_ride_along_on_a_prompt_asked_anyway_and_the_answer_settles_them(
    analysis: ClusterAnalysis, label_memory: LabelMemory, operator_channel: OperatorChannel
) -> None:
    """A stricter confidence threshold leaves the other clusters unsure, so a prompt goes out: the mixed
    cluster is in it too, and the operator's answer labels it (and is stored) instead of "mixed"."""
    mixed_id = int(analysis.clusters[-1].cluster_id)
    memory = _remember(label_memory, analysis, mixed_id)
    seen: list[dict[str, bool]] = []
    with OperatorClient(operator_channel.prompt_endpoint) as client:

        def operator() -> None:
            for _ in range(50):  # bounded: about 10 s
                event = client.next_event(timeout_s=0.2)
                if isinstance(event, PromptInfo):
                    seen.append({o.id: bool(o.context.get("answered_both_ways")) for o in event.options})
                    client.answer(event.id, [f"cluster-{mixed_id}"], operator="alice")
                    return

        answering = threading.Thread(target=operator, daemon=True)
        answering.start()
        decision = _decide(analysis, memory, OperatorPlan(wait_s=10.0, min_confidence=0.95), operator_channel)
        answering.join(timeout=10.0)
    assert decision.asked and decision.answered_by == "alice"
    # every cluster is in the prompt (and "none"), the mixed one marked as such for the operator
    assert seen and len(seen[0]) == len(analysis.clusters) + 1
    assert [option for option, both_ways in seen[0].items() if both_ways] == [f"cluster-{mixed_id}"]
    assert decision.mixed_clusters == () and decision.crystal_clusters == (mixed_id,)
    assert set(decision.sources.values()) == {"operator"}
    stored = [r for r in memory.list_records() if r.session == "new" and r.source == "operator"]
    assert {r.cluster_id for r in stored if r.is_crystal} == {mixed_id}
