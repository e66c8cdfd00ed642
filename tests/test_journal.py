"""The session journal survives crashes: torn last lines are ignored and cut, numbering continues."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.journal import Journal, JournalError, read_journal


def test_entries_are_numbered_stamped_and_durable(tmp_path: Path) -> None:
    clock = iter([1.5, 2.5, 3.5])
    with Journal(tmp_path, clock_s=lambda: next(clock)) as journal:
        journal.append("transition", state="mapping")
        journal.append("target", target_id="T001", outcome="recorded")
    entries = read_journal(tmp_path / "journal.jsonl")
    assert [e["seq"] for e in entries] == [1, 2]
    assert entries[1]["target_id"] == "T001" and entries[1]["microscope_time_s"] == 2.5
    with Journal(tmp_path) as again:
        assert again.append("transition", state="done")["seq"] == 3


def test_torn_last_line_is_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.append("transition", state="calibrating")
    path = tmp_path / "journal.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 2, "type": "tran')  # a crash mid-write
    assert len(read_journal(path)) == 1
    with Journal(tmp_path) as journal:
        journal.append("transition", state="mapping")
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
        "from agent.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "for i in range(50):\n"
        "    j.append('tick', i=i)\n"
        "    print(i, flush=True)\n"
        "os._exit(9)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    acknowledged = len(result.stdout.split())
    assert acknowledged == 50
    assert [e["i"] for e in read_journal(tmp_path / "journal.jsonl")] == list(range(50))


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.append("x")
