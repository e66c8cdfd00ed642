"""The crystal classifier and the object records it learns from: real label-memory folders on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.locate.object_features import CANDIDATE_FEATURE_NAMES
from agent.prompts.crystal_classifier import fit_classifier
from agent.prompts.label_records import LabelMemoryError
from agent.prompts.memory import LabelMemory
from agent.prompts.object_records import OBJECTS_FILE_NAME, ObjectRecord

NAMES = CANDIDATE_FEATURE_NAMES
CONTRAST = NAMES.index("contrast_sigma")


def _features(rng: np.random.Generator, contrast: float) -> tuple[float, ...]:
    values = rng.normal(1.0, 0.3, size=len(NAMES))
    values[CONTRAST] = contrast + rng.normal(0, 1.0)
    return tuple(float(v) for v in values)


def _records(
    rng: np.random.Generator, n: int, *, specimen: str = "protein-plates", high_diffracts: bool = True,
    source: str = "simulated", session: str = "s1",
) -> list[ObjectRecord]:
    """Visit outcomes where high-contrast objects diffract (or, with `high_diffracts` False, do not)."""
    records = []
    for i in range(n):
        high = i % 2 == 0
        diffracting = high == high_diffracts
        records.append(
            ObjectRecord(
                features=_features(rng, 20.0 if high else 8.0), feature_names=NAMES,
                label="diffracting" if diffracting else "no-spots", source=source,  # type: ignore[arg-type]
                specimen=specimen, preset="atlas", session=session, target_id=f"T{i:03d}",
            )
        )
    return records


def _probe(contrast: float) -> np.ndarray:
    values = np.ones(len(NAMES))
    values[CONTRAST] = contrast
    return values


def test_no_classifier_until_each_class_has_a_few_records() -> None:
    rng = np.random.default_rng(0)
    records = _records(rng, 4)  # 2 positive, 2 negative
    assert fit_classifier(records, specimen="protein-plates", preset="atlas", feature_names=NAMES) is None
    fitted = fit_classifier(records + _records(rng, 4), specimen="protein-plates", preset="atlas", feature_names=NAMES)
    assert fitted is not None and fitted.n_positive == 4 and fitted.n_negative == 4


def test_it_learns_what_diffracts_and_fits_the_same_model_twice() -> None:
    records = _records(np.random.default_rng(1), 30)
    first = fit_classifier(records, specimen="protein-plates", preset="atlas", feature_names=NAMES)
    again = fit_classifier(records, specimen="protein-plates", preset="atlas", feature_names=NAMES)
    assert first is not None and again is not None
    p_high, p_low = first.probability(np.stack([_probe(20.0), _probe(8.0)]))
    assert p_high > 0.6 and p_low < 0.4  # regularised (REGULARISATION_C): confident only with more records
    np.testing.assert_array_equal(first.probability(_probe(14.0)), again.probability(_probe(14.0)))
    with pytest.raises(ValueError, match="feature columns"):
        first.probability(np.ones(3))


def test_the_specimens_own_records_outweigh_the_global_prior() -> None:
    rng = np.random.default_rng(2)
    others = _records(rng, 40, specimen="graphite-flakes", high_diffracts=True)
    own = _records(rng, 16, specimen="protein-plates", high_diffracts=False)
    prior_only = fit_classifier(others, specimen="protein-plates", preset="atlas", feature_names=NAMES)
    assert prior_only is not None and prior_only.probability(_probe(20.0))[0] > 0.5  # the prior says high diffracts
    fitted = fit_classifier(others + own, specimen="protein-plates", preset="atlas", feature_names=NAMES)
    assert fitted is not None and fitted.n_specimen == 16
    assert fitted.probability(_probe(20.0))[0] < 0.5  # this specimen's own outcomes say the opposite


def test_simulated_records_do_not_teach_a_real_microscope_and_presets_do_not_mix() -> None:
    records = _records(np.random.default_rng(3), 20, source="simulated")
    assert fit_classifier(records, specimen="protein-plates", preset="atlas", feature_names=NAMES,
                          real_microscope=True) is None
    assert fit_classifier(records, specimen="protein-plates", preset="search", feature_names=NAMES) is None
    assert fit_classifier(records, specimen="protein-plates", preset="atlas", feature_names=NAMES[:-1]) is None


def test_object_records_are_kept_beside_the_cluster_labels(tmp_path: Path) -> None:
    memory = LabelMemory(tmp_path / "labels")
    records = _records(np.random.default_rng(4), 6, session="s1") + _records(np.random.default_rng(5), 2, session="s2")
    memory.add_objects(records)
    again = LabelMemory(tmp_path / "labels")
    assert [r.id for r in again.object_records()] == [r.id for r in records]
    assert len(again.object_records(exclude_session="s1")) == 2 and again.object_records(preset="search") == []
    assert len(again) == 0  # no cluster label was written
    assert again.prune(session="s1") == 6 and len(again.object_records()) == 2
    assert again.clear() == 2 and again.object_records() == []


def test_a_record_of_another_layout_is_refused_with_file_and_line_a_torn_line_is_skipped(tmp_path: Path) -> None:
    memory = LabelMemory(tmp_path / "labels")
    memory.add_objects(_records(np.random.default_rng(6), 2))
    path = memory.folder / OBJECTS_FILE_NAME
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[0][:40])  # a crash mid-write
    assert len(LabelMemory(memory.folder).object_records()) == 2
    newer = json.loads(whole.splitlines()[0])
    newer.update(format=2, id="from-a-newer-release")
    path.write_bytes(whole + json.dumps(newer).encode() + b"\n")
    with pytest.raises(LabelMemoryError, match=r"objects\.jsonl line 3: record format 2 .*reads format 1"):
        LabelMemory(memory.folder).object_records()


def test_answers_serve_the_cold_start_and_outcomes_decide_once_there_are_enough() -> None:
    rng = np.random.default_rng(7)
    answers = [
        ObjectRecord(features=_features(rng, 20.0 if i % 2 else 8.0), feature_names=NAMES,
                     label="not-crystal" if i % 2 else "crystal", source="simulated", specimen="protein-plates",
                     preset="atlas", session="s0")
        for i in range(40)
    ]  # the answers say low contrast is the crystal
    alone = fit_classifier(answers, specimen="protein-plates", preset="atlas", feature_names=NAMES)
    assert alone is not None and alone.probability(_probe(8.0))[0] > alone.probability(_probe(20.0))[0]
    outcomes = _records(rng, 12)  # the microscope says high contrast diffracts
    fitted = fit_classifier(answers + outcomes, specimen="protein-plates", preset="atlas", feature_names=NAMES)
    assert fitted is not None and fitted.n_outcomes == 12 == fitted.n_positive + fitted.n_negative
    assert fitted.probability(_probe(20.0))[0] > 0.5 > fitted.probability(_probe(8.0))[0]
