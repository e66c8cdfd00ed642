"""Label memory end to end: simulated atlas frames -> locator clusters -> simulated operator over ZeroMQ
-> label memory -> a new seed of the same specimen type is labelled from memory; a new type is not.

Four answered sessions: the memory's held-out check (agent.prompts.label_votes) lowers its confidence in a label after
it has mispredicted that label on its own past answers, as it did here with two sessions (seed 2's mixed
cluster), so with two sessions the third would still be asked about."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pytest

from agent.locate.analysis import ClusterAnalysis, LocateSettings, analyse
from agent.prompts import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    LabelMemory,
    OperatorChannel,
    PolicyOperator,
    Prompt,
    PromptOption,
)
from drivers.geometry import pixel_to_stage_um
from simulator.operator import SimulatedAnswerPolicy

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope

#: The screening plan's default search-image analysis (agent.config): 32 x 32 grid, k = 3.
SETTINGS = LocateSettings(mode="grid", grid_rows=32, grid_cols=32, k=3)
PRESET = "atlas"
#: The 2018 study's graphite flakes: clusters at this setting are mostly clear-cut (protein plates at
#: atlas give clusters with 20-50 % of their cells on crystals, on which even the operator's answers flip).
SPECIMEN = "graphite-flakes"


@dataclass
class Session:
    """One simulated atlas frame, its clusters, and where each cell lies on the stage (true matrix)."""

    specimen: str
    seed: int
    microscope: object
    analysis: ClusterAnalysis
    cell_xy_um: np.ndarray

    def sample_xy_um(self, cluster_id: int, n: int = 24) -> list[list[float]]:
        """Stage positions of up to `n` cells of a cluster, spread over the cluster (as the loop sends them)."""
        cells = np.nonzero(self.analysis.label_grid.ravel() == cluster_id)[0]
        picked = cells[np.linspace(0, len(cells) - 1, min(n, len(cells))).astype(int)]
        return self.cell_xy_um[picked].tolist()

    def cells_on_crystals(self, cluster_ids: set[int] | tuple[int, ...]) -> float:
        """Ground truth: fraction of the clusters' cell centres within 3 um of a crystal (0 if none)."""
        cells = np.isin(self.analysis.label_grid.ravel(), list(cluster_ids))
        if not cells.any():
            return 0.0
        xy = self.cell_xy_um[cells]
        return float(np.mean(self.microscope.ground_truth.crystal_id_xy(xy[:, 0], xy[:, 1], tolerance_um=3.0) >= 0))


def _session(microscope: SimulatedMicroscope, specimen: str, seed: int) -> Session:
    """The atlas frame of the most crowded of the first 200 grid squares of `microscope` (of specimen, seed)."""
    microscope.set_preset(PRESET)
    truth = microscope.ground_truth
    centres = truth.square_centres_um()[:200]
    crowd = [len(truth.crystals_in_box(x - 60, x + 60, y - 60, y + 60)) for x, y in centres]
    x_um, y_um = centres[int(np.argmax(crowd))]  # a grid square with crystals, as the loop would pick
    microscope.move_stage(x_um=float(x_um), y_um=float(y_um))
    frame = microscope.acquire(0.5)
    analysis = analyse(frame.image, SETTINGS)
    stage = frame.metadata.stage
    matrix = microscope.true_image_to_stage_matrix(PRESET)  # tests only: the agent calibrates its own
    cell_xy_um = pixel_to_stage_um(analysis.cell_centres_px, frame.image.shape, (stage.x_um, stage.y_um), matrix)
    return Session(specimen, seed, microscope, analysis, cell_xy_um)


@pytest.fixture(scope="module")
def sessions(simulated_microscope: Callable[..., SimulatedMicroscope]) -> dict[tuple[str, int], Session]:
    wanted = [(SPECIMEN, seed) for seed in (1, 2, 3, 4, 5)]
    return {key: _session(simulated_microscope(*key, camera_px=1024), *key) for key in wanted}


def _ask(session: Session, channel: OperatorChannel) -> tuple[str, ...]:
    """Ask the simulated operator which clusters hold crystals; the option ids it chose."""
    clusters = session.analysis.clusters
    options = [
        PromptOption(
            id=f"cluster-{c.cluster_id}",
            label=f"cluster {c.cluster_id}",
            context={"cluster_id": c.cluster_id, "sample_xy_um": session.sample_xy_um(c.cluster_id)},
        )
        for c in clusters
    ]
    options.append(PromptOption(id="none", label="none of these"))
    handle = channel.ask(
        Prompt(
            kind="crystal-clusters",
            question="Which clusters contain crystals?",
            options=tuple(options),
            multiple=True,
            timeout_s=20,
        )
    )
    policy = SimulatedAnswerPolicy(session.microscope.ground_truth, seed=session.seed)
    with PolicyOperator(channel.prompt_endpoint, policy):
        answer = handle.wait(20)
    assert answer is not None, "the simulated operator did not answer"
    return answer.option_ids


def test_known_specimen_type_is_labelled_from_memory_and_a_new_type_is_asked(
    sessions: dict[tuple[str, int], Session], label_memory: LabelMemory, operator_channel: OperatorChannel
) -> None:
    for seed in (1, 2, 3, 4):  # sessions in which the operator labelled every cluster
        session = sessions[(SPECIMEN, seed)]
        chosen = _ask(session, operator_channel)
        assert chosen != ("none",), f"the operator saw no crystal cluster in seed {seed}"
        clusters = session.analysis.clusters
        label_memory.record_clusters(
            session.analysis.normalised_centroids(),
            session.analysis.feature_names,
            [f"cluster-{c.cluster_id}" in chosen for c in clusters],
            specimen=SPECIMEN,
            preset=PRESET,
            session=f"s{seed}",
            operator="simulated",
            cluster_ids=[c.cluster_id for c in clusters],
        )
    new_seed = sessions[(SPECIMEN, 5)]
    operator_says = _ask(new_seed, operator_channel)  # what a person would answer, for comparison only
    assert len(label_memory) == 12

    analysis = new_seed.analysis
    suggestions = label_memory.suggest(analysis.normalised_centroids(), analysis.feature_names, SPECIMEN, PRESET)
    by_id = {c.cluster_id: s for c, s in zip(analysis.clusters, suggestions, strict=True)}
    fractions = {c.cluster_id: new_seed.cells_on_crystals((c.cluster_id,)) for c in analysis.clusters}
    richest = max(fractions, key=lambda cid: fractions[cid])
    # the cluster richest in crystals is labelled crystal without asking, the background not-crystal
    assert by_id[richest].is_crystal and by_id[richest].confidence >= DEFAULT_CONFIDENCE_THRESHOLD
    background = by_id[analysis.background_cluster]
    assert not background.is_crystal and background.confidence >= DEFAULT_CONFIDENCE_THRESHOLD
    # held out (each session's answers predicted from the others'), the memory's confident labels are right at
    # least as often as it claims. (Which answer it gets wrong, if any, depends on the images: with the camera
    # errors of instrument 0 before issue 20 it missed seed 2's mixed cluster; now it misses none.)
    held_out = label_memory.held_out_precision(SPECIMEN, PRESET)
    assert held_out[False] >= DEFAULT_CONFIDENCE_THRESHOLD and held_out[True] >= DEFAULT_CONFIDENCE_THRESHOLD
    # precision at least as high as with a person: no cluster the person rejected is auto-labelled crystal,
    # and the cells of the auto-labelled crystal clusters are at least as often on crystals. (A mixed
    # cluster, about half on crystals, that the person rejected in earlier sessions may be left out.)
    auto_crystal = {cid for cid, s in by_id.items() if s.is_crystal and s.confidence >= DEFAULT_CONFIDENCE_THRESHOLD}
    person_crystal = {int(option.split("-")[1]) for option in operator_says if option != "none"}
    assert auto_crystal <= person_crystal
    assert new_seed.cells_on_crystals(auto_crystal) >= new_seed.cells_on_crystals(person_crystal)

    # a new specimen type (or preset) gets no confident suggestion from this memory: it is asked about
    for specimen, preset in (("asbestos-fibres", PRESET), ("protein-plates", PRESET), (SPECIMEN, "search")):
        unknown = label_memory.suggest(analysis.normalised_centroids(), analysis.feature_names, specimen, preset)
        assert all(s.confidence == 0.0 and s.n_support == 0 for s in unknown)
