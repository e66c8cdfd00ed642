"""The session journal: typed records, durable lines, torn last lines ignored and cut, numbering continues,
lines that are not records refused with the line named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.session.journal import Journal, JournalError, read_journal, read_records
from agent.session.outcomes import TargetResult
from agent.session.records import (
    ArtifactWritten,
    Labelled,
    SummaryWritten,
    TargetFinished,
    Transition,
    parse_record,
)


def _finished(target_id: str = "T001", time_s: float = 9.0) -> TargetFinished:
    return TargetFinished(target_id=target_id, outcome="recorded", x_um=1.0, y_um=2.0, microscope_time_s=time_s)


def test_entries_are_numbered_stamped_and_durable(tmp_path: Path) -> None:
    clock = iter([1.5, 2.5, 3.5])
    with Journal(tmp_path, clock_s=lambda: next(clock)) as journal:
        journal.append(Transition(state="mapping"))
        journal.append(_finished())
    entries = read_journal(tmp_path / "journal.jsonl")
    assert [e["seq"] for e in entries] == [1, 2]
    assert entries[0]["microscope_time_s"] == 1.5
    # a target's outcome keeps the microscope time it finished at
    assert entries[1]["target_id"] == "T001" and entries[1]["microscope_time_s"] == 9.0
    with Journal(tmp_path) as again:
        assert again.append(Transition(state="done"))["seq"] == 3


def test_records_read_back_as_the_same_typed_models(tmp_path: Path) -> None:
    with Journal(tmp_path, clock_s=lambda: 4.0) as journal:
        journal.append(Labelled(crystal_clusters=[2], sources={2: "operator"}, confidences={2: 0.9}, asked=True))
        journal.append(ArtifactWritten(kind="search", path="targets/T001_search.tif", target_id="T001"))
        journal.append(_finished("T002"))
    labelled, artifact, finished = read_records(tmp_path / "journal.jsonl")
    assert isinstance(labelled, Labelled) and labelled.sources == {2: "operator"} and labelled.seq == 1
    assert isinstance(artifact, ArtifactWritten) and artifact.target_id == "T001"
    assert isinstance(finished, TargetFinished) and finished.result() == TargetResult(
        target_id="T002", outcome="recorded", x_um=1.0, y_um=2.0, microscope_time_s=9.0
    )


def test_a_record_is_validated_when_it_is_made_and_when_it_is_read(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        TargetFinished(target_id="T001", outcome="exploded", x_um=0.0, y_um=0.0)
    with pytest.raises(TypeError, match=r"agent\.session\.records"):
        Journal(tmp_path).append({"type": "transition", "state": "done"})  # type: ignore[arg-type]
    path = tmp_path / "journal.jsonl"
    path.write_text(
        '{"seq": 1, "type": "transition", "state": "mapping"}\n'
        '{"seq": 2, "type": "target", "target_id": "T001", "outcome": "exploded", "x_um": 0, "y_um": 0}\n'
    )
    with pytest.raises(JournalError, match=r"seq 2 \(type 'target'\).*outcome"):
        read_records(path)
    # a record type of a newer release is skipped (with a warning), the rest is read
    path.write_text('{"seq": 1, "type": "teleport"}\n{"seq": 2, "type": "transition", "state": "mapping"}\n')
    assert [type(r).__name__ for r in read_records(path)] == ["Transition"]


def test_a_summary_keeps_its_extra_scores_and_unknown_fields_of_a_newer_release_are_ignored() -> None:
    summary = parse_record({"type": "summary", "session": "s", "state": "done", "true_positives": 3})
    assert isinstance(summary, SummaryWritten) and summary.model_dump()["true_positives"] == 3
    transition = parse_record({"type": "transition", "state": "mapping", "added_later": 1})
    assert isinstance(transition, Transition) and "added_later" not in transition.model_dump()


def test_torn_last_line_is_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.append(Transition(state="calibrating"))
    path = tmp_path / "journal.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 2, "type": "tran')  # a crash mid-write
    assert len(read_journal(path)) == 1
    with Journal(tmp_path) as journal:
        journal.append(Transition(state="mapping"))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["state"] == "mapping"


def test_damage_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text('{"seq": 1, "type": "a"}\nnot json\n{"seq": 3, "type": "b"}\n')
    with pytest.raises(JournalError, match="line 2"):
        read_journal(path)


def test_a_killed_writer_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from agent.session.journal import Journal\n"
        "from agent.session.records import Transition\n"
        "j = Journal(sys.argv[1])\n"
        "for i in range(50):\n"
        "    j.append(Transition(state=f'step-{i}'))\n"
        "    print(i, flush=True)\n"
        "os._exit(9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    acknowledged = len(result.stdout.split())
    assert acknowledged == 50
    assert [e["state"] for e in read_journal(tmp_path / "journal.jsonl")] == [f"step-{i}" for i in range(50)]


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.append(Transition(state="done"))
