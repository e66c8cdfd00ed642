"""Label memory: durable append log, torn lines, prune/export, and suggestions from memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from agent.prompts import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    LABELS_FILE_NAME,
    LabelMemory,
    LabelMemoryError,
    LabelRecord,
    default_labels_dir,
)
from agent.prompts.label_votes import (
    AUTO_BANDWIDTH_FRACTION,
    BANDWIDTH_LIMITS,
    CALIBRATION_CONFIDENCE,
    DEFAULT_BANDWIDTH,
    MIN_SHARED_FEATURE_FRACTION,
    MIN_VOTE_WEIGHT,
    signed_log,
    trimmed_rms_distance,
)

NAMES = ("mean", "std", "rel_std", "skewness", "kurtosis", "range")
CRYSTAL = np.array([-2.5, 4.0, 3.0, 1.5, 8.0, 6.0])
FILM = np.array([0.0, 0.1, 0.0, 0.0, 0.2, 0.1])
BAR = np.array([-12.0, -0.8, 2.0, 0.3, -0.5, -0.9])


def _jitter(vector: np.ndarray, rng: np.random.Generator, scale: float = 0.15) -> np.ndarray:
    """The same kind of cluster seen in another image: each feature off by ~15 %."""
    return vector * (1.0 + scale * rng.standard_normal(vector.shape)) + 0.05 * rng.standard_normal(vector.shape)


def _session(memory: LabelMemory, rng: np.random.Generator, session: str, specimen: str = "protein-plates") -> None:
    centroids = np.array([_jitter(FILM, rng), _jitter(CRYSTAL, rng), _jitter(BAR, rng)])
    memory.record_clusters(
        centroids,
        NAMES,
        [False, True, False],
        specimen=specimen,
        preset="atlas",
        session=session,
        operator="alice",
        cluster_ids=[0, 1, 2],
    )


def test_records_persist_and_reload_across_processes(label_memory: LabelMemory) -> None:
    _session(label_memory, np.random.default_rng(0), "s1")
    script = textwrap.dedent(
        f"""
        import json, numpy as np
        from agent.prompts import LabelMemory
        memory = LabelMemory({str(label_memory.folder)!r})
        records = memory.list_records()
        memory.record_clusters(np.array([[1.0, 2, 3, 4, 5, 6]]), {list(NAMES)!r}, [True],
                               specimen="asbestos-fibres", preset="atlas", session="s2", source="console")
        print(json.dumps([[r.is_crystal, r.session, r.cluster_id] for r in records]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == [[False, "s1", 0], [True, "s1", 1], [False, "s1", 2]]
    records = label_memory.list_records()  # sees what the other process appended
    assert len(records) == 4 and records[-1].specimen == "asbestos-fibres" and records[-1].source == "console"
    assert label_memory.list_records(specimen="protein-plates", session="s1")[1].feature_names == NAMES


def test_torn_last_line_is_tolerated_and_stepped_over(label_memory: LabelMemory) -> None:
    _session(label_memory, np.random.default_rng(1), "s1")
    path = label_memory.folder / LABELS_FILE_NAME
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[0][:37])  # a crash mid-write
    fresh = LabelMemory(label_memory.folder)
    assert len(fresh.list_records()) == 3 and fresh.skipped_lines == 1
    _session(fresh, np.random.default_rng(2), "s2")
    again = LabelMemory(label_memory.folder)
    assert [r.session for r in again.list_records()] == ["s1"] * 3 + ["s2"] * 3
    assert again.skipped_lines == 1  # the torn fragment stays on its own line, nothing else is lost


def test_corrupt_middle_line_is_skipped_and_kept_by_prune(label_memory: LabelMemory) -> None:
    _session(label_memory, np.random.default_rng(3), "s1")
    path = label_memory.folder / LABELS_FILE_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{this is not json}\n" + b"".join(lines[1:]))
    assert len(label_memory.list_records()) == 3 and label_memory.skipped_lines == 1
    assert label_memory.prune(session="nope") == 0
    assert b"{this is not json}" in path.read_bytes()


def test_prune_export_import_and_clear(tmp_path: Path) -> None:
    memory = LabelMemory(tmp_path / "a")
    rng = np.random.default_rng(4)
    _session(memory, rng, "s1")
    _session(memory, rng, "s2")
    _session(memory, rng, "s3", specimen="graphite-flakes")
    old = LabelRecord(
        feature_vector=(1.0,),
        feature_names=("mean",),
        is_crystal=True,
        specimen="polymer-faint",
        preset="atlas",
        time_utc=datetime.now(timezone.utc) - timedelta(days=30),
    )
    memory.add(old)
    assert len(memory) == 10
    exported = memory.export(tmp_path / "export.json")
    document = json.loads(exported.read_text())
    assert document["format"] == "crystal-locator-labels" and len(document["records"]) == 10

    with pytest.raises(LabelMemoryError):
        memory.prune()
    assert memory.prune(older_than_s=7 * 24 * 3600) == 1
    assert memory.prune(specimen="graphite-flakes") == 3
    assert memory.prune(specimen="protein-plates", session="s1") == 3
    assert {r.session for r in memory.list_records()} == {"s2"}

    other = LabelMemory(tmp_path / "b")
    assert other.import_file(exported) == 10
    assert other.import_file(exported) == 0  # ids already there
    assert memory.clear() == 3 and len(memory) == 0 and len(other) == 10
    with pytest.raises(LabelMemoryError):
        other.import_file(tmp_path / "b" / "missing.json")


def test_new_memory_and_bad_input(label_memory: LabelMemory, tmp_path: Path) -> None:
    assert label_memory.list_records() == [] and len(label_memory) == 0
    suggestion = label_memory.suggest(np.array([CRYSTAL]), NAMES, "protein-plates", "atlas")[0]
    assert suggestion.confidence == 0.0 and suggestion.n_support == 0 and suggestion.nearest_distance is None
    with pytest.raises(LabelMemoryError):
        label_memory.suggest(np.array([[1.0, 2.0]]), NAMES, "protein-plates", "atlas")
    with pytest.raises(LabelMemoryError):
        label_memory.suggest(np.array([[np.nan] * 6]), NAMES, "protein-plates", "atlas")
    with pytest.raises(LabelMemoryError):
        label_memory.record_clusters(
            np.array([CRYSTAL]), NAMES, [True, False], specimen="x", preset="atlas", session="s"
        )
    with pytest.raises(ValueError):
        LabelRecord(feature_vector=(1.0, 2.0), feature_names=("a",), is_crystal=True, specimen="x", preset="p")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LabelMemoryError):
        LabelMemory(tmp_path / "file")


def test_default_labels_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CRYSTAL_LOCATOR_LABELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_labels_dir() == tmp_path / "xdg" / "crystal-locator" / "labels"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_labels_dir() == Path.home() / ".local" / "share" / "crystal-locator" / "labels"
    monkeypatch.setenv("CRYSTAL_LOCATOR_LABELS", str(tmp_path / "mine"))
    assert default_labels_dir() == tmp_path / "mine"


def test_suggestions_grow_confident_with_sessions_and_pick_the_crystal_cluster(label_memory: LabelMemory) -> None:
    rng = np.random.default_rng(5)
    query = np.array([_jitter(BAR, rng), _jitter(CRYSTAL, rng), _jitter(FILM, rng)])
    confidences = []
    for session in ("s1", "s2", "s3"):
        suggestions = label_memory.suggest(query, NAMES, "protein-plates", "atlas")
        confidences.append(min(s.confidence for s in suggestions))
        _session(label_memory, rng, session)
    suggestions = label_memory.suggest(query, NAMES, "protein-plates", "atlas")
    assert [s.is_crystal for s in suggestions] == [False, True, False]
    assert confidences[0] == 0.0
    assert confidences[0] < confidences[1] < confidences[2] < min(s.confidence for s in suggestions)
    assert all(s.n_support == 3 for s in suggestions)
    assert suggestions[1].p_crystal > 0.8 and suggestions[0].p_crystal < 0.2


def test_unknown_specimen_preset_or_far_away_cluster_is_not_confident(label_memory: LabelMemory) -> None:
    rng = np.random.default_rng(6)
    for session in ("s1", "s2", "s3"):
        _session(label_memory, rng, session)
    query = np.array([_jitter(CRYSTAL, rng)])
    assert label_memory.suggest(query, NAMES, "protein-plates", "atlas")[0].confidence > 0.6
    assert label_memory.suggest(query, NAMES, "asbestos-fibres", "atlas")[0].confidence == 0.0
    assert label_memory.suggest(query, NAMES, "protein-plates", "search")[0].confidence == 0.0
    alien = np.array([[30.0, 0.5, -4.0, -6.0, 40.0, 0.2]])  # looks like nothing labelled before
    far = label_memory.suggest(alien, NAMES, "protein-plates", "atlas")[0]
    assert far.confidence < 0.2 and far.nearest_distance is not None and far.nearest_distance > 1.0


def test_conflicting_memory_gives_low_confidence(label_memory: LabelMemory) -> None:
    for session, label in (("s1", True), ("s2", False), ("s3", True), ("s4", False)):
        label_memory.record_clusters(np.array([CRYSTAL]), NAMES, [label], specimen="p", preset="atlas", session=session)
    suggestion = label_memory.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas")[0]
    assert suggestion.confidence < 0.1 and 0.4 < suggestion.p_crystal < 0.6
    assert suggestion.mixed  # answered both ways: asking again would be a coin toss


@pytest.mark.parametrize(("agreeing", "mixed"), [(6, True), (10, False)])
def test_a_split_vote_is_mixed_only_when_one_more_answer_could_not_settle_it(
    label_memory: LabelMemory, agreeing: int, mixed: bool
) -> None:
    """Six sessions said crystal, one said not: below the threshold, and one more "crystal" answer would
    leave it below (6 / 8.3), so asking is pointless (mixed). Ten to one is below the threshold too, but
    one more answer settles it (10 / 12.3), so it is asked (not mixed). Under a lower threshold the
    six-to-one split is confident without asking."""
    for session in range(agreeing + 1):
        label_memory.record_clusters(
            np.array([CRYSTAL]), NAMES, [session > 0], specimen="p", preset="atlas", session=f"s{session}"
        )
    suggestion = label_memory.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas")[0]
    assert suggestion.is_crystal and suggestion.n_support == agreeing
    assert suggestion.confidence < DEFAULT_CONFIDENCE_THRESHOLD
    assert suggestion.mixed is mixed
    lenient = label_memory.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas", confidence_threshold=0.6)[0]
    assert lenient.confidence >= 0.6 and not lenient.mixed


def test_features_are_matched_by_name_and_auto_labels_carry_no_weight(
    label_memory: LabelMemory, tmp_path: Path
) -> None:
    rng = np.random.default_rng(8)
    for session in ("s1", "s2", "s3"):
        _session(label_memory, rng, session)
    order = [5, 3, 0, 1, 4, 2]  # same features, another order, plus one new feature
    names = (*(NAMES[i] for i in order), "glcm_contrast")
    query = np.concatenate([_jitter(CRYSTAL, rng)[order], [3.0]])[None, :]
    by_name = label_memory.suggest(query, names, "protein-plates", "atlas")[0]
    assert by_name.is_crystal and by_name.confidence > 0.6
    too_different = label_memory.suggest(np.array([[1.0, 2.0, 3.0]]), ("mean", "a", "b"), "protein-plates", "atlas")[0]
    assert too_different.confidence == 0.0

    auto_only = LabelMemory(tmp_path / "auto")
    for session in ("s1", "s2", "s3"):
        auto_only.record_clusters(
            np.array([CRYSTAL]), NAMES, [True], specimen="p", preset="atlas", session=session, source="auto"
        )
    assert len(auto_only) == 3
    assert auto_only.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas")[0].confidence == 0.0


def test_one_image_many_clusters_count_once_per_session(label_memory: LabelMemory) -> None:
    rng = np.random.default_rng(9)
    same_image = np.array([_jitter(CRYSTAL, rng, 0.02) for _ in range(6)])
    label_memory.record_clusters(same_image, NAMES, [True] * 6, specimen="p", preset="atlas", session="s1")
    one = label_memory.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas")[0]
    assert one.n_support == 1
    label_memory.record_clusters(same_image[:1], NAMES, [True], specimen="p", preset="atlas", session="s2")
    two = label_memory.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas")[0]
    assert two.n_support == 2 and two.confidence > one.confidence


def test_one_wild_feature_does_not_hide_a_close_match(label_memory: LabelMemory) -> None:
    rng = np.random.default_rng(10)
    for session in ("s1", "s2"):
        _session(label_memory, rng, session)
    odd = _jitter(CRYSTAL, rng)
    odd[4] = -500.0  # kurtosis gone wild in this image (e.g. a hot pixel in every crystal patch)
    suggestion = label_memory.suggest(odd[None, :], NAMES, "protein-plates", "atlas")[0]
    assert suggestion.is_crystal and suggestion.confidence > 0.6
    two_wild = odd.copy()
    two_wild[[0, 2]] = [40.0, -40.0]  # more than one feature off: no longer the same kind of cluster
    assert label_memory.suggest(two_wild[None, :], NAMES, "protein-plates", "atlas")[0].confidence < 0.3


def test_a_session_whose_nearest_record_was_auto_labelled_casts_no_vote(label_memory: LabelMemory) -> None:
    for session in ("s1", "s2", "s3"):
        label_memory.record_clusters(
            np.array([CRYSTAL]), NAMES, [True], specimen="p", preset="atlas", session=session, source="auto"
        )  # the agent labelled the crystal cluster itself ...
        label_memory.record_clusters(
            np.array([CRYSTAL * 0.6]), NAMES, [False], specimen="p", preset="atlas", session=session
        )  # ... and asked only about a similar, mixed cluster
    suggestion = label_memory.suggest(np.array([CRYSTAL]), NAMES, "p", "atlas")[0]
    assert suggestion.confidence == 0.0  # no human vote: the mixed cluster's "no" does not speak for it
    mixed = label_memory.suggest(np.array([CRYSTAL * 0.6]), NAMES, "p", "atlas")[0]
    assert not mixed.is_crystal and mixed.confidence >= DEFAULT_CONFIDENCE_THRESHOLD


def test_a_memory_that_mispredicts_its_own_answers_is_not_confident(tmp_path: Path) -> None:
    """Look-alike clusters answered differently in different sessions (a film step that looks like a
    flake): held out, the memory got its own past answers wrong, so it gives no confident label; the
    votes are split two to four, so it calls the cluster mixed (not asked by default; `agent.prompts.policy`)."""
    rng = np.random.default_rng(11)
    consistent = LabelMemory(tmp_path / "consistent")
    for session in ("s1", "s2", "s3", "s4"):
        _session(consistent, rng, session)
    query = np.array([_jitter(CRYSTAL, rng), _jitter(FILM, rng)])
    crystal, film = consistent.suggest(query, NAMES, "protein-plates", "atlas")
    assert crystal.is_crystal and crystal.confidence >= DEFAULT_CONFIDENCE_THRESHOLD
    assert not film.is_crystal and film.confidence >= DEFAULT_CONFIDENCE_THRESHOLD
    assert not crystal.mixed and not film.mixed
    assert crystal.held_out_precision is not None and crystal.held_out_precision >= DEFAULT_CONFIDENCE_THRESHOLD
    assert consistent.held_out_precision("protein-plates", "atlas") == {True: 1.0, False: 1.0}  # never wrong

    fooled = LabelMemory(tmp_path / "fooled")
    for session in ("s1", "s2", "s3", "s4"):
        _session(fooled, rng, session)
    for session in ("s5", "s6"):  # sessions whose crystal-looking cluster was not crystal after all
        fooled.record_clusters(
            np.array([_jitter(CRYSTAL, rng, 0.05)]),
            NAMES,
            [False],
            specimen="protein-plates",
            preset="atlas",
            session=session,
        )
    verdicts = fooled.held_out_verdicts("protein-plates", "atlas")
    assert sorted(verdicts.values()).count((True, False)) >= 2  # it would have called them crystal
    crystal = fooled.suggest(query[:1], NAMES, "protein-plates", "atlas")[0]
    assert crystal.confidence < DEFAULT_CONFIDENCE_THRESHOLD and crystal.mixed
    assert crystal.held_out_precision is not None and crystal.held_out_precision <= 5 / 7  # 4 of 6 right, + 1


def test_mistakes_about_one_kind_of_cluster_do_not_hold_back_another(label_memory: LabelMemory) -> None:
    """Two mixed kinds (crystal edges, film steps) were called crystal in three sessions and not in the
    fourth: held out, the memory got those wrong. It must keep asking about them, but the clean crystal
    cluster, predicted right every time, is labelled without asking although the memory's overall
    held-out precision for "crystal" is below the threshold."""
    rng = np.random.default_rng(5)
    edge = np.array([-1.0, 1.5, 1.0, 0.5, 3.0, 2.0])
    step = np.array([1.5, 2.0, 1.5, -1.0, 2.0, 3.0])
    for session in ("s1", "s2", "s3", "s4"):
        mixed_answer = session != "s4"
        label_memory.record_clusters(
            np.array([_jitter(FILM, rng), _jitter(CRYSTAL, rng), _jitter(edge, rng), _jitter(step, rng)]),
            NAMES,
            [False, True, mixed_answer, mixed_answer],
            specimen="protein-plates",
            preset="atlas",
            session=session,
        )
    overall = label_memory.held_out_precision("protein-plates", "atlas")
    assert overall[True] < DEFAULT_CONFIDENCE_THRESHOLD  # two wrong "crystal" predictions of six
    crystal, mixed, film = label_memory.suggest(
        np.array([_jitter(CRYSTAL, rng), _jitter(edge, rng), _jitter(FILM, rng)]), NAMES, "protein-plates", "atlas"
    )
    assert crystal.is_crystal and crystal.confidence >= DEFAULT_CONFIDENCE_THRESHOLD
    assert crystal.held_out_precision == 1.0
    assert mixed.confidence < DEFAULT_CONFIDENCE_THRESHOLD and mixed.mixed  # three to one
    assert not crystal.mixed and not film.mixed
    assert mixed.held_out_precision is not None and mixed.held_out_precision < DEFAULT_CONFIDENCE_THRESHOLD
    assert not film.is_crystal and film.confidence >= DEFAULT_CONFIDENCE_THRESHOLD


def _reference_votes(memory: LabelMemory, query: np.ndarray, names: tuple[str, ...], records: list[LabelRecord]):
    """Straightforward per-record loops for what `LabelMemory` computes with arrays (module docstring):
    each session's nearest comparable record, its kernel weight, the votes. Returns per query row
    (is_crystal, confidence, n_support, mixed)."""
    needed = math.ceil(MIN_SHARED_FEATURE_FRACTION * len(names))
    best: list[dict[str, tuple[float, float, bool]]] = [{} for _ in range(len(query))]
    for group_names in dict.fromkeys(r.feature_names for r in records):
        group = [r for r in records if r.feature_names == group_names]
        shared = [n for n in names if n in group_names]
        if len(shared) < needed:
            continue
        q = signed_log(query[:, [names.index(n) for n in shared]])
        stored = signed_log(np.array([r.feature_vector for r in group])[:, [group_names.index(n) for n in shared]])
        gaps = []
        for session in sorted({r.session for r in group}):
            crystal = [j for j, r in enumerate(group) if r.session == session and r.is_crystal]
            other = [j for j, r in enumerate(group) if r.session == session and not r.is_crystal]
            if crystal and other:
                gaps.append(min(trimmed_rms_distance(stored[[a]], stored[[b]])[0, 0] for a in crystal for b in other))
        width = memory.bandwidth or (
            float(np.clip(AUTO_BANDWIDTH_FRACTION * np.median(gaps), *BANDWIDTH_LIMITS)) if gaps else DEFAULT_BANDWIDTH
        )
        for i in range(len(query)):
            for j, record in enumerate(group):
                d = float(trimmed_rms_distance(q[[i]], stored[[j]])[0, 0])
                if record.session not in best[i] or d < best[i][record.session][0]:
                    weight = math.exp(-0.5 * (d / width) ** 2) * memory.source_weights.get(record.source, 0.0)
                    best[i][record.session] = (d, weight, record.is_crystal)
    result = []
    for votes in best:
        counted = [(w, crystal) for _, w, crystal in votes.values() if w >= MIN_VOTE_WEIGHT]
        w_c = sum(w for w, crystal in counted if crystal)
        w_n = sum(w for w, crystal in counted if not crystal)
        is_crystal = w_c > w_n
        confidence = min(1.0, abs(w_c - w_n) / (w_c + w_n + memory.prior_strength))
        support = sum(1 for _, crystal in counted if crystal == is_crystal)
        total = w_c + w_n + memory.prior_strength
        mixed = min(w_c, w_n) > 0 and (abs(w_c - w_n) + 1.0) / (total + 1.0) < DEFAULT_CONFIDENCE_THRESHOLD
        result.append((is_crystal, confidence, support, mixed))
    return result


@pytest.mark.parametrize("seed", range(12))
def test_votes_and_held_out_verdicts_equal_a_straightforward_reference(tmp_path: Path, seed: int) -> None:
    """Random memories: several sessions, two feature sets (one with an extra feature), auto records,
    a fixed kernel width in some; the array code must give the reference's suggestions and verdicts."""
    rng = np.random.default_rng(seed)
    long_names = (*NAMES, "extra")
    kinds = rng.normal(size=(5, len(long_names))) * rng.uniform(0.5, 5.0)
    memory = LabelMemory(tmp_path, bandwidth=0.4 if seed % 4 == 3 else None)
    for session in range(int(rng.integers(2, 12))):
        names = long_names if rng.random() < 0.25 else NAMES
        n = int(rng.integers(1, 6))
        vectors = kinds[:n, : len(names)] * (1.0 + rng.uniform(0.05, 0.4) * rng.standard_normal((n, len(names))))
        source = "auto" if rng.random() < 0.15 else "operator"
        labels = list(rng.random(n) < 0.4)
        memory.record_clusters(vectors, names, labels, specimen="p", preset="a", session=str(session), source=source)
    records = memory.list_records()
    for names in (NAMES, long_names):
        query = kinds[:, : len(names)] * (1.0 + 0.3 * rng.standard_normal((5, len(names))))
        votes, _ = memory._votes_and_voters(query, names, records)  # all records are of specimen p, preset a
        expected = _reference_votes(memory, query, names, records)
        got = [(v.is_crystal, v.confidence, v.n_support, v.mixed) for v in votes]
        assert [g[0::2] for g in got] == [e[0::2] for e in expected]  # label, support, mixed
        assert np.allclose([g[1] for g in got], [e[1] for e in expected], rtol=0, atol=1e-12)

    expected_verdicts = {}
    answered = sorted({r.session for r in records if r.source != "auto"})
    for session in answered if len(answered) > 1 else ():
        others = [r for r in records if r.session != session]
        for record in (r for r in records if r.session == session and r.source != "auto"):
            is_crystal, confidence, support, _ = _reference_votes(
                memory, np.array([record.feature_vector]), record.feature_names, others
            )[0]
            if support and confidence >= CALIBRATION_CONFIDENCE:
                expected_verdicts[record.id] = (is_crystal, is_crystal == record.is_crystal)
    assert memory.held_out_verdicts("p", "a") == expected_verdicts


_WRITER = """
import sys
import numpy as np
from agent.prompts import LabelMemory
memory = LabelMemory(sys.argv[1])
name = sys.argv[2]
features = [f"f{i}" for i in range(40)]
for n in range(60):
    centroids = np.full((8, 40), float(n)) + np.arange(40)  # long lines: 8 records of 40 features per write
    memory.record_clusters(centroids, features, [n % 2 == 0] * 8, specimen="s", preset="atlas",
                           session=f"{name}-{n}", source="operator")
"""


def test_two_processes_writing_one_memory_at_once_lose_and_tear_nothing(tmp_path: Path) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "labels"), name]) for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    memory = LabelMemory(tmp_path / "labels")
    records = memory.list_records()
    assert memory.skipped_lines == 0  # no torn or interleaved line
    assert len(records) == 2 * 60 * 8
    assert {r.session for r in records} == {f"{w}-{n}" for w in "ab" for n in range(60)}
