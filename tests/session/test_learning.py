"""Sessions learn from the microscope: outcomes go to label memory with the object's features, the next session
ranks its targets by the crystal classifier, the targets left are re-ranked as outcomes come in, and a session
stopped after a re-ranking resumes to the same end. Real simulator (512 px camera, `test_rounds.CAMERA_PX`; three
squares, at most 12 targets: enough for rankings after 3, 6, ... outcomes), real label-memory folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.config import AreaPlan, ScreeningPlan, TargetingPlan
from agent.locate.object_features import CANDIDATE_FEATURE_NAMES
from agent.prompts.memory import LabelMemory
from agent.session.journal import read_journal
from agent.session.outcomes import visiting_tier
from agent.session.records import TargetsRanked
from agent.session.screening import ScreeningSession
from agent.steps.calibration_store import CalibrationStore
from agent.steps.learn import OUTCOME_LABELS
from tests.session.test_rounds import CAMERA_PX, true_calibration

if TYPE_CHECKING:
    from tests.conftest import MakeMicroscope

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, simulated_microscope: MakeMicroscope) -> Path:
    """A calibration store holding the simulated instrument's calibration (checked, not measured)."""
    folder = tmp_path_factory.mktemp("store") / "calibrations"
    CalibrationStore(folder).save(true_calibration(simulated_microscope(camera_px=CAMERA_PX)))
    return folder


def _plan(seed: int) -> ScreeningPlan:
    return ScreeningPlan(
        specimen="protein-plates", seed=seed, time_budget_s=None, area=AreaPlan(squares=3),
        targeting=TargetingPlan(max_targets=12),
    )


def _session(folder: Path, microscope: object, seed: int, memory: LabelMemory, store: Path) -> ScreeningSession:
    return ScreeningSession(
        microscope, _plan(seed), folder, labels=memory, calibration_store=CalibrationStore(store)  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory, simulated_microscope: MakeMicroscope, store: Path) -> Path:
    """A label memory after one session (protein plates, seed 3)."""
    folder = tmp_path_factory.mktemp("taught")
    session = _session(folder / "first", simulated_microscope("protein-plates", 3, CAMERA_PX), 3,
                       LabelMemory(folder / "labels"), store)
    session.run()
    visited = [r for r in session.results.values() if r.outcome in OUTCOME_LABELS]
    records = LabelMemory(folder / "labels").object_records()
    assert len(records) == len(visited) > 0
    by_target = {r.target_id: r for r in records}
    for result in visited:
        record = by_target[result.target_id]
        assert record.label == OUTCOME_LABELS[result.outcome] and record.feature_names == CANDIDATE_FEATURE_NAMES
        assert record.session == "first" and record.source == "simulated"
    assert {r.label for r in records} >= {"diffracting"} and len({r.label for r in records}) >= 2
    return folder / "labels"


def _taught_session(name: str, taught: Path, folder: Path, make: MakeMicroscope, store: Path) -> ScreeningSession:
    """The second session (seed 4) on a copy of the taught memory."""
    memory = LabelMemory(folder / f"labels-{name}")
    memory.add_objects(LabelMemory(taught).object_records())
    return _session(folder / name, make("protein-plates", 4, CAMERA_PX), 4, memory, store)


@pytest.fixture(scope="module")
def second(
    taught: Path, tmp_path_factory: pytest.TempPathFactory, simulated_microscope: MakeMicroscope, store: Path
) -> ScreeningSession:
    session = _taught_session("second", taught, tmp_path_factory.mktemp("second"), simulated_microscope, store)
    session.run()
    return session


def test_the_next_session_ranks_by_the_classifier_and_reranks_as_it_learns(second: ScreeningSession) -> None:
    planned = [t for t in second.targets if t.features]
    assert planned and all(t.p_diffract is not None for t in planned)
    entries = read_journal(second.session_dir / "journal.jsonl")
    first_plan = next(e for e in entries if e["type"] == "targets")["targets"]
    tiers = [visiting_tier(t["from_mixed_cluster"], t["p_diffract"]) for t in first_plan]
    assert tiers == sorted(tiers)  # planned by tier: the likely crystals first
    ranked = [TargetsRanked.model_validate(e) for e in entries if e["type"] == "ranked"]
    assert ranked and [r.after_outcomes for r in ranked] == list(range(3, 3 * len(ranked) + 1, 3))
    # the memory now holds both sessions' outcomes (the second's own are not read back into its own fit)
    assert {r.session for r in second.ctx.labels.object_records()} == {"first", "second"}


def test_a_session_stopped_after_a_reranking_resumes_to_the_same_end(
    taught: Path, second: ScreeningSession, simulated_microscope: MakeMicroscope, store: Path, tmp_path: Path
) -> None:
    stopped = _taught_session("stopped", taught, tmp_path, simulated_microscope, store)

    def stop_after_ranking(record: object) -> None:
        if isinstance(record, TargetsRanked):
            stopped.request_abort()

    stopped.subscribe(stop_after_ranking)
    stopped.run()
    assert stopped.state != "done" and len(stopped.results) < len(second.results)
    resumed = ScreeningSession.resume(
        stopped.microscope, tmp_path / "stopped", labels=LabelMemory(tmp_path / "labels-stopped"),
        calibration_store=CalibrationStore(store),
    )
    resumed.run()
    expected = [(t.target_id, t.p_diffract) for t in second.targets]
    assert [(t.target_id, t.p_diffract) for t in resumed.targets] == expected
    assert (tmp_path / "stopped" / "targets.csv").read_bytes() == (second.session_dir / "targets.csv").read_bytes()


def test_the_learning_curve_reads_each_visits_probability_from_the_journal(second: ScreeningSession) -> None:
    from agent.evaluation.learning import reliability_bins, session_figures

    figures = session_figures(second.session_dir, specimen="protein-plates", seed=4, memory_sessions=1)
    visited = [r for r in second.results.values() if r.outcome in OUTCOME_LABELS]
    assert figures.visited == len(visited) and figures.diffracting == sum(r.outcome == "recorded" for r in visited)
    assert all(p is not None for p, _ in figures.visits)  # every target had features and a classifier
    bins = reliability_bins(figures.visits)
    assert sum(b["count"] for b in bins) == len(visited)
    assert all(b["bin_low"] <= b["mean_probability"] <= b["bin_high"] for b in bins)
    assert figures.precision is None  # this session was not scored against ground truth
