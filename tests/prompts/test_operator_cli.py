"""`crystal-locator operator connect` and `labels ...` run as real subprocesses with piped stdin."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.commands.operator import parse_choice, preview_text
from agent.prompts import InvalidAnswerError, LabelMemory, OperatorChannel, OperatorClient, Prompt, PromptOption
from agent.prompts.object_records import ObjectRecord
from drivers.formats.images import encode_png

#: The console script, run with this interpreter (`-m agent.cli` would make a second CommandError class).
CLI = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]


def _prompt(timeout_s: float = 30.0, multiple: bool = False) -> Prompt:
    png = encode_png(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20))
    return Prompt(
        kind="crystal-clusters",
        question="Which clusters contain crystals?",
        options=(
            PromptOption(id="cluster-0", label="cluster 0 [film]"),
            PromptOption(id="cluster-1", label="cluster 1", description="small bright blobs"),
            PromptOption(id="none", label="none of these"),
        ),
        multiple=multiple,
        timeout_s=timeout_s,
        images={"heatmap": png},
    )


def _run_connect(endpoint: str, stdin: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "operator", "connect", endpoint, "--name", "tester", "--save-dir", str(tmp_path / "images"), *extra],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_connect_answers_a_prompt_from_stdin(operator_channel: OperatorChannel, tmp_path: Path) -> None:
    handle = operator_channel.ask(_prompt(multiple=True))
    # a wrong number first (refused locally, asked again), then a valid answer
    result = _run_connect(operator_channel.prompt_endpoint, "7\n2,3\n", tmp_path, "--max-prompts", "1")
    assert result.returncode == 0, result.stderr
    answer = handle.wait(5)
    assert answer is not None and answer.option_ids == ("cluster-1", "none") and answer.operator == "tester"
    out = result.stdout
    assert "Which clusters contain crystals?" in out and "cluster 0 [film]" in out and "small bright blobs" in out
    assert "there is no option 7" in out and "accepted" in out
    saved = tmp_path / "images" / handle.id / "heatmap.png"
    assert saved.read_bytes() == handle.prompt.images["heatmap"]
    assert str(saved) in out


def test_connect_reports_prompts_closed_while_choosing(operator_channel: OperatorChannel, tmp_path: Path) -> None:
    with OperatorClient(operator_channel.prompt_endpoint) as other:
        first = operator_channel.ask(_prompt())
        process = subprocess.Popen(
            [*CLI, "operator", "connect", operator_channel.prompt_endpoint, "--save-dir", str(tmp_path),
             "--max-prompts", "2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
        reader.start()
        try:
            seen = []
            for _ in range(200):  # bounded: until the client shows the first prompt
                seen.append(lines.get(timeout=30))
                if "answer with the option number" in seen[-1]:
                    break
            other.answer(first.id, "cluster-0", operator="someone-else")  # answered from elsewhere
            second = operator_channel.ask(_prompt(timeout_s=0.5))  # and this one expires unanswered
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            process.stdin.close()
        reader.join(10)
        rest = []
        while not lines.empty():
            rest.append(lines.get_nowait())
        out = "".join(seen + rest)
        assert second.state == "expired" and first.answer is not None and first.answer.operator == "someone-else"
    assert "closed while you were choosing: answered by someone-else (cluster-0)" in out
    assert "closed while you were choosing: expired" in out


def test_connect_to_nothing_is_a_clear_error(tmp_path: Path) -> None:
    result = _run_connect("tcp://127.0.0.1:1", "", tmp_path, "--timeout-s", "0.3")
    assert result.returncode == 2 and "cannot connect to the agent" in result.stderr


def test_parse_choice_and_preview() -> None:
    ids = ["a", "b", "c"]
    assert parse_choice("1, 3", ids) == ["a", "c"] and parse_choice("b", ids) == ["b"]
    with pytest.raises(InvalidAnswerError):
        parse_choice("0", ids)
    with pytest.raises(InvalidAnswerError):
        parse_choice("zz", ids)
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[:, :, 0] = 255
    text = preview_text(encode_png(rgb), width_chars=8)
    assert text.plain.count("▀") == 8 * 4 and "rgb(255,0,0)" in str(text.spans[0].style)


def test_labels_commands(label_memory: LabelMemory, tmp_path: Path) -> None:
    for session in ("s1", "s2"):
        label_memory.record_clusters(np.array([[1.0, 2.0], [0.0, 0.1]]), ("mean", "std"), [True, False],
                               specimen="protein-plates", preset="atlas", session=session, operator="ann")
    base = ["--labels", str(label_memory.folder)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "labels", *args], capture_output=True, text=True, timeout=60)

    listed = run("list", *base, "--json")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 4
    assert json.loads(listed.stdout.splitlines()[0])["is_crystal"] is True
    table = run("list", *base)
    assert "protein-plates" in table.stdout and "4 labels" in table.stdout
    label_memory.add_objects([
        ObjectRecord(features=(1.0, 2.0), feature_names=("a", "b"), label=label, source="simulated",
                     specimen="protein-plates", preset="atlas", session="s1")
        for label in ("diffracting", "no-spots", "not-found")
    ])
    table = run("list", *base)
    assert "3 object records (3 visit outcomes" in " ".join(table.stdout.split())
    exported = run("export", str(tmp_path / "out.json"), *base)
    document = json.loads((tmp_path / "out.json").read_text())
    assert exported.returncode == 0 and len(document["records"]) == 4 and len(document["object_records"]) == 3
    # another memory (another machine) takes both: cluster labels for prompts, outcomes for the classifier
    other = ["--labels", str(tmp_path / "other")]
    assert run("import", str(tmp_path / "out.json"), *other).returncode == 0
    again = run("import", str(tmp_path / "out.json"), *other)
    assert again.returncode == 0 and "added 0 record(s)" in again.stdout  # by id: nothing twice
    copy = LabelMemory(tmp_path / "other")
    assert len(copy) == 4 and sorted(r.label for r in copy.object_records()) == ["diffracting", "no-spots", "not-found"]
    third = ["--labels", str(tmp_path / "third")]
    assert run("import", str(label_memory.folder / "objects.jsonl"), *third).returncode == 0
    assert len(LabelMemory(tmp_path / "third").object_records()) == 3
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    bad = run("import", str(tmp_path / "bad.json"), *other)
    assert bad.returncode == 2 and "not a label export" in bad.stderr and len(LabelMemory(tmp_path / "other")) == 4
    refused = run("prune", *base)
    assert refused.returncode == 2 and "--all" in refused.stderr and len(label_memory) == 4
    assert run("prune", *base, "--session", "s1").returncode == 0 and len(label_memory) == 2
    assert run("prune", *base, "--all").returncode == 0 and len(label_memory) == 0


def test_simulated_sessions_keep_their_label_memory_apart_and_it_carries_no_vote_on_a_real_microscope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.commands.screen import _label_memory

    monkeypatch.setenv("CRYSTAL_LOCATOR_LABELS", str(tmp_path / "labels"))
    simulated = _label_memory(None, simulated=True)
    real = _label_memory(None, simulated=False)
    assert simulated.folder == tmp_path / "labels" / "simulated" and real.folder == tmp_path / "labels"
    assert simulated.source_weights["simulated"] == 1.0
    assert real.source_weights["simulated"] == 0.0 and real.source_weights["operator"] == 1.0
    shared = _label_memory(tmp_path / "shared", simulated=False)  # --labels: the folder given, the same weights
    assert shared.folder == tmp_path / "shared" and shared.source_weights["simulated"] == 0.0
