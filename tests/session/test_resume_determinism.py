"""A session killed with SIGKILL at any moment and resumed ends exactly as an uninterrupted one.

The command line runs a small simulated session to the end (the reference), then the same session again,
killed with SIGKILL when its journal reaches about 25 %, 50 % and 75 % of the reference's journal lines, and
once killed twice: during calibration, then (resumed) during mapping. Each is resumed with `screen --resume`
and must end with the reference's `summary.json` (every key but the wall time and the session name: counts,
microscope time, time per state, precision and recall) and a byte-equal `targets.csv`. That holds only
because the simulator's noise and stage errors are keyed by what was acquired (`simulator.keyed`) and the
resumed simulator starts at the checkpoint's microscope time, stage position and preset
(`agent.session.restore`). Each session has its own empty data folder, so each measures its calibration.
The reference is also the command line's own check (`--json` prints the summary, a second run into its folder
is refused), and one more session is killed just after its first target's outcome: its resume keeps the
session's calibration source whatever the flags or the environment say, visits no finished target twice and
loses nothing written before the kill. The killed sessions run two at a time (the module's wall time is about
that of six sessions on an idle 2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.session.journal import read_journal, read_records
from agent.session.records import SessionStarted

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

Entries = list[dict[str, Any]]


def _screen_command(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "agent.cli", "screen", "--simulated", "--specimen", "protein-plates", "--seed", "2",
        "--camera-px", "512", "--squares", "1", "--max-targets", "3", "--no-labels", "--out", str(out),
    ]


def _resume_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "screen", "--resume", str(out), "--no-labels"]


def _data_env(folder: Path) -> dict[str, str]:
    """The environment of one session's runs: its own empty data folder (label memory, calibration store),
    shared by the killed run and its resumes, so that every session measures its calibration afresh."""
    return {
        **os.environ,
        "XDG_DATA_HOME": str(folder / "data"),
        "CRYSTAL_LOCATOR_CALIBRATIONS": str(folder / "data" / "calibrations"),
        "CRYSTAL_LOCATOR_LABELS": str(folder / "data" / "labels"),
    }


def _summary(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("wall_time_s", "session"):
        summary.pop(key)
    return summary


def _run_and_kill(command: list[str], out: Path, reached: Callable[[Entries], bool]) -> Entries:
    """Run `command` on session folder `out`, SIGKILL it as soon as its journal satisfies `reached`; the
    journal as the kill left it."""
    journal = out / "journal.jsonl"
    env = _data_env(out.parent)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if reached(read_journal(journal)):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the session ended before the kill point"
    entries = read_journal(journal)
    assert not any(e["type"] == "summary" for e in entries), "killed after the session had finished"
    return entries


def _run(command: list[str], out: Path, **env: str) -> str:
    """Run `command` on session folder `out` to its end (`env`: variables changed from its data folder's); it
    must succeed. Its standard output."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**_data_env(out.parent), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _resume(out: Path) -> None:
    _run(_resume_command(out), out)


def _has(entries: Entries, record_type: str, **fields: Any) -> bool:
    """True once the journal holds a record of `record_type` with `fields`."""
    return any(e["type"] == record_type and all(e.get(k) == v for k, v in fields.items()) for e in entries)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted session (its summary printed as JSON)."""
    out = tmp_path_factory.mktemp("reference") / "session"
    printed = json.loads(_run([*_screen_command(out), "--json"], out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "done" and summary["targets_visited"] >= 2  # a session worth cutting
    assert printed["state"] == "done" and printed["targets_found"] == summary["targets_found"] >= 1
    return out


def test_a_second_screen_into_a_session_folder_is_refused(reference: Path) -> None:
    again = subprocess.run(_screen_command(reference), capture_output=True, text=True, timeout=120,
                           env=_data_env(reference.parent))
    assert again.returncode == 2 and "already holds a session" in again.stderr


def _last_state(entries: Entries) -> str:
    return [e["state"] for e in entries if e["type"] == "transition"][-1]


def _killed_at(lines: int, out: Path) -> list[Entries]:
    """Killed when its journal has `lines` lines, then resumed to the end; the journal as the kill left it."""
    cut = _run_and_kill(_screen_command(out), out, lambda entries: len(entries) >= lines)
    _resume(out)
    return [cut]


def _killed_in_calibration_then_mapping(out: Path) -> list[Entries]:
    """Killed when the first preset is measured (the others not yet), resumed, killed again while the atlas
    is acquired (its montage planned), resumed to the end; the journal as each kill left it."""
    first = _run_and_kill(_screen_command(out), out, lambda entries: _has(entries, "calibration"))
    second = _run_and_kill(_resume_command(out), out, lambda entries: _has(entries, "mapping", event="plan"))
    _resume(out)
    return [first, second]


@dataclass(frozen=True)
class FirstTargetCut:
    """A session killed just after its first target's outcome and resumed: the journal as the kill left it,
    and what a resume with another `--calibrations` printed on stderr (it must be refused)."""

    cut: Entries
    refused_stderr: str


def _killed_after_the_first_target(out: Path) -> FirstTargetCut:
    """Killed once its journal holds a target's outcome; a resume with `--calibrations` elsewhere is refused,
    and the resume run with `$CRYSTAL_LOCATOR_CALIBRATIONS` elsewhere uses the session's own store."""
    cut = _run_and_kill(_screen_command(out), out, lambda entries: _has(entries, "target"))
    refused = subprocess.run([*_resume_command(out), "--calibrations", str(out.parent / "other")],
                             capture_output=True, text=True, timeout=120, env=_data_env(out.parent))
    assert refused.returncode == 2, refused.stderr
    _run(_resume_command(out), out, CRYSTAL_LOCATOR_CALIBRATIONS=str(out.parent / "elsewhere"))
    return FirstTargetCut(cut, refused.stderr)


FRACTIONS = (0.25, 0.50, 0.75)


@dataclass(frozen=True)
class Killed:
    """A killed-and-resumed session: its folder, and its journals as the kills left them (`result()` raises
    what went wrong in that session)."""

    folder: Path
    cuts: Future[Any]


@pytest.fixture(scope="module")
def killed(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Killed]:
    """Every killed-and-resumed session, run two at a time, by name (the fraction, `twice` or `first-target`)."""
    total = len(read_journal(reference / "journal.jsonl"))
    names = [*map(str, FRACTIONS), "twice", "first-target"]
    folders = {name: tmp_path_factory.mktemp(name) / "session" for name in names}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {str(f): Killed(folders[str(f)], pool.submit(_killed_at, round(f * total), folders[str(f)]))
                for f in FRACTIONS}
        runs["twice"] = Killed(folders["twice"], pool.submit(_killed_in_calibration_then_mapping, folders["twice"]))
        runs["first-target"] = Killed(
            folders["first-target"], pool.submit(_killed_after_the_first_target, folders["first-target"])
        )
    return runs


def _assert_same_as_reference(out: Path, reference: Path) -> list[SessionStarted]:
    """The resumed session's summary and targets are the reference's; returns its `resume` records."""
    assert _summary(out) == _summary(reference)
    assert (out / "targets.csv").read_bytes() == (reference / "targets.csv").read_bytes()
    return [r for r in read_records(out / "journal.jsonl") if isinstance(r, SessionStarted) and r.event == "resume"]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_a_session_killed_and_resumed_ends_as_the_uninterrupted_one(
    reference: Path, killed: dict[str, Killed], fraction: float
) -> None:
    [cut] = killed[str(fraction)].cuts.result()
    resume = _assert_same_as_reference(killed[str(fraction)].folder, reference)
    assert len(resume) == 1 and resume[0].checkpoint_seq is not None and resume[0].checkpoint_seq <= len(cut)
    checkpoint = cut[resume[0].checkpoint_seq - 1]
    assert resume[0].microscope_time_s == checkpoint["microscope_time_s"]  # the clock restarts at the checkpoint
    assert resume[0].discarded_time_s == pytest.approx(cut[-1]["microscope_time_s"] - checkpoint["microscope_time_s"])


def test_a_session_killed_in_calibration_then_in_mapping_ends_as_the_uninterrupted_one(
    reference: Path, killed: dict[str, Killed]
) -> None:
    """Killed when the first preset is measured (the others not yet), resumed, killed again while the atlas is
    acquired (its montage planned): the second resume skips the lines the first one superseded."""
    first, second = killed["twice"].cuts.result()
    assert _last_state(first) == "calibrating" and _last_state(second) == "mapping"
    assert len(_assert_same_as_reference(killed["twice"].folder, reference)) == 2


def test_a_session_killed_after_its_first_target_resumes_from_its_own_store_and_loses_nothing(
    reference: Path, killed: dict[str, Killed]
) -> None:
    """Killed just after the first target's outcome: the final targets are the uninterrupted run's, nothing
    written before the kill is lost, no finished target is visited again, and the resume keeps the session's
    calibration source (`source.json`) whatever `--calibrations` or `$CRYSTAL_LOCATOR_CALIBRATIONS` say."""
    first: FirstTargetCut = killed["first-target"].cuts.result()
    out = killed["first-target"].folder
    assert "keeps the session's calibration source" in first.refused_stderr
    assert not (out.parent / "elsewhere").exists(), "the resumed session used another calibration store than its own"
    assert len(_assert_same_as_reference(out, reference)) == 1
    expected = json.loads((reference / "targets.json").read_text())["targets"]
    got = json.loads((out / "targets.json").read_text())["targets"]
    assert [(r["target_id"], r["planned_x_um"], r["planned_y_um"]) for r in got] == [
        (r["target_id"], r["planned_x_um"], r["planned_y_um"]) for r in expected
    ]
    assert all(r["outcome"] != "pending" for r in got)
    visits = [e["target_id"] for e in read_journal(out / "journal.jsonl") if e["type"] == "target"]
    assert len(visits) == len(set(visits)), "a finished target was visited twice"
    assert {e["target_id"] for e in first.cut if e["type"] == "target"} <= set(visits)
    for path in {e["path"] for e in first.cut if e["type"] == "artifact"}:
        assert (out / path).exists(), f"lost {path}"
