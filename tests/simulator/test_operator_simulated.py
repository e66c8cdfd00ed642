"""The simulated operator: an answer policy over the simulator's ground truth (`simulator.operator`), answering
prompts over real ZeroMQ sockets through `agent.prompts.simulated.PolicyOperator`."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from agent.prompts import OperatorChannel, PolicyOperator, Prompt, PromptInfo, PromptOption
from simulator.operator import PromptView, SimulatedAnswerPolicy
from simulator.specimen import generate_specimen


@pytest.fixture(scope="module")
def specimen():
    return generate_specimen("protein-plates", 3)


def _on_and_off_crystal(specimen, n: int = 6) -> tuple[list[list[float]], list[list[float]]]:
    crystals = specimen.crystal_truth()
    xs = np.array([c.x_um for c in crystals])
    ys = np.array([c.y_um for c in crystals])
    on = np.nonzero(specimen.crystal_id_xy(xs, ys) >= 0)[0][:n]
    rng = np.random.default_rng(0)
    centres = specimen.square_centres_um()
    candidates = centres[rng.integers(0, len(centres), 200)] + rng.uniform(-20, 20, (200, 2))
    free = specimen.crystal_id_xy(candidates[:, 0], candidates[:, 1], tolerance_um=8.0) < 0
    off = candidates[free][:n]
    assert len(on) == n and len(off) == n, "specimen too sparse for this test"
    return [[float(xs[i]), float(ys[i])] for i in on], off.tolist()


def _prompt(on: list, off: list, *, multiple: bool = True, timeout_s: float = 20.0) -> Prompt:
    return Prompt(
        kind="crystal-clusters",
        question="Which of these clusters contain crystals?",
        options=(
            PromptOption(id="cluster-0", label="film", context={"cluster_id": 0, "sample_xy_um": off}),
            PromptOption(id="cluster-1", label="blobs", context={"cluster_id": 1, "sample_xy_um": on}),
            PromptOption(id="none", label="none of these"),
        ),
        multiple=multiple,
        timeout_s=timeout_s,
    )


def _wait_attempts(operator: PolicyOperator, count: int) -> None:
    for _ in range(100):  # bounded: 5 s
        if len(operator.attempts) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"simulated operator sent {len(operator.attempts)} answers, expected {count}")


def _info(prompt: Prompt) -> PromptInfo:
    return PromptInfo(
        **prompt.model_dump(exclude={"timeout_s", "deadline_utc", "images"}),
        asked_utc="2026-01-01T00:00:00Z",
        deadline_utc="2026-01-01T00:10:00Z",
        seconds_left=600.0,
    )


def test_answers_from_ground_truth_over_sockets(specimen, operator_channel: OperatorChannel) -> None:
    on, off = _on_and_off_crystal(specimen)
    policy = SimulatedAnswerPolicy(specimen)
    with PolicyOperator(operator_channel.prompt_endpoint, policy, delay_s=0.05) as op:
        crystal = operator_channel.ask(_prompt(on, off))
        assert crystal.wait(10) is not None
        assert crystal.answer.option_ids == ("cluster-1",) and crystal.answer.operator == "simulated"
        nothing = operator_channel.ask(_prompt(off, off))
        assert nothing.wait(10) is not None and nothing.answer.option_ids == ("none",)
        single = operator_channel.ask(_prompt(off, on, multiple=False))
        assert single.wait(10) is not None and single.answer.option_ids == ("cluster-0",)
        _wait_attempts(op, 3)
        assert op.attempts[0].accepted and op.attempts[0].chosen == ("cluster-1",)
        assert policy.decisions[0].hit_fraction == {"cluster-0": 0.0, "cluster-1": 1.0, "none": None}
        assert len(op.answered) == 3 and len(policy.decisions) == 3


def test_never_answering_operator_lets_the_prompt_expire(specimen, operator_channel: OperatorChannel) -> None:
    on, off = _on_and_off_crystal(specimen)
    policy = SimulatedAnswerPolicy(specimen)
    with PolicyOperator(operator_channel.prompt_endpoint, policy, never_answer=True) as op:
        handle = operator_channel.ask(_prompt(on, off, timeout_s=0.4))
        assert handle.wait() is None and handle.state == "expired"
        assert op.attempts == [] and policy.decisions == []


def test_mistakes_are_seeded(specimen) -> None:
    on, off = _on_and_off_crystal(specimen)
    wire = _info(_prompt(on, off)).model_dump(mode="json")
    always_wrong = SimulatedAnswerPolicy(specimen, error_rate=1.0)
    decision = always_wrong.decide(wire)
    assert decision.chosen == ("cluster-0",) and set(decision.mistakes) == {"cluster-0", "cluster-1"}
    runs = []
    for _ in range(2):
        sometimes = SimulatedAnswerPolicy(specimen, error_rate=0.5, seed=42)
        runs.append([sometimes.decide(wire).chosen for _ in range(20)])
    assert runs[0] == runs[1]
    assert 0 < sum(choice != ("cluster-1",) for choice in runs[0]) < 20
    with pytest.raises(ValueError):
        SimulatedAnswerPolicy(specimen, error_rate=1.5)
    with pytest.raises(ValueError):
        PolicyOperator("tcp://127.0.0.1:1", always_wrong, delay_s=-1.0)


def test_the_policy_answers_plain_data_as_the_wire_delivers_it(specimen) -> None:
    """The policy sees the same prompt the same way whether it is a wire dict or a `PromptView`."""
    on, off = _on_and_off_crystal(specimen)
    wire = _info(_prompt(on, off)).model_dump(mode="json")
    view = PromptView.from_wire(wire)
    assert [o.id for o in view.options] == ["cluster-0", "cluster-1", "none"] and view.multiple
    policy = SimulatedAnswerPolicy(specimen)
    assert policy.answer(wire) == policy.answer(view) == ["cluster-1"]
    assert [d.chosen for d in policy.decisions] == [("cluster-1",), ("cluster-1",)]


def test_the_simulated_operator_does_not_import_agent() -> None:
    source = Path(__file__).resolve().parents[2] / "simulator" / "operator.py"
    imported: list[str] = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.append(node.module)
    assert not [name for name in imported if name == "agent" or name.startswith("agent.")]
