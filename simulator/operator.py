"""A simulated operator's answers: which options of a prompt a person would choose, judged from ground truth.

It lets the screening loop run end to end with prompts in CI and evaluation. `SimulatedAnswerPolicy`
works on plain data, a prompt's id, options (id and context) and whether several may be chosen, either as
a `PromptView` or as the prompt's JSON form as the wire delivers it; it knows nothing of sockets
(`agent.prompts.simulated.PolicyOperator` connects it to an agent's prompt channel). For each prompt it
looks at every option's `context["sample_xy_um"]` (stage positions, um, of typical cells of that
cluster): an option is "crystal" when at least `min_hit_fraction` (default a third: a person shown a
gallery in which every third patch shows a crystal says the cluster contains crystals) of those
positions lie on a true crystal (`ground_truth.crystal_id_xy(x, y, tolerance_um=...) >= 0`).

* `multiple` prompts: every "crystal" option is chosen; if none is, an option whose context says
  `{"none": true}` (or whose id is "none") is chosen, else the option with the most hits.
* single-choice prompts: the option with the most hits.

Mistakes: with probability `error_rate` (seeded) each option's verdict is flipped (single choice: a
different option is picked). What it decided is kept in `decisions` for tests and evaluation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class GroundTruth(Protocol):
    """What the simulated operator needs from a specimen (`simulator.specimen.Specimen` has it)."""

    def crystal_id_xy(self, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 0.0) -> np.ndarray:
        """Crystal id at each (x, y) um, -1 where none."""
        ...


@dataclass(frozen=True)
class OptionView:
    """One option of a prompt as the policy sees it: its id and its context (e.g. `sample_xy_um`)."""

    id: str
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptView:
    """A prompt as the policy sees it: its id, its options in order, and whether several may be chosen."""

    id: str
    options: tuple[OptionView, ...]
    multiple: bool = False

    @classmethod
    def from_wire(cls, prompt: Mapping[str, Any]) -> PromptView:
        """From a prompt's JSON form (a `PromptInfo` as the wire carries it: `id`, `options` with `id` and
        `context`, `multiple`); other fields are ignored."""
        options = tuple(OptionView(str(o["id"]), dict(o.get("context") or {})) for o in prompt["options"])
        return cls(id=str(prompt["id"]), options=options, multiple=bool(prompt.get("multiple", False)))


@dataclass(frozen=True)
class Decision:
    """What the simulated operator decided about one prompt.

    `hit_fraction`: per option id, the fraction of its sample positions on a crystal (None: the
    option had no positions); `chosen`: the option ids to send; `mistakes`: option ids whose verdict
    was deliberately flipped; `time_s`: when it was decided (time.monotonic seconds).
    """

    prompt_id: str
    hit_fraction: dict[str, float | None]
    chosen: tuple[str, ...]
    mistakes: tuple[str, ...] = ()
    time_s: float = field(default_factory=time.monotonic)


class SimulatedAnswerPolicy:
    """Chooses the options of prompts from `ground_truth`, as a person looking at the cells would.

    `error_rate` in [0, 1] (seeded by `seed`); `tolerance_um`: a sample position within this distance of
    a crystal's outline counts as on it; `min_hit_fraction` in (0, 1]: share of an option's positions
    on crystals from which it counts as "crystal".
    """

    def __init__(
        self,
        ground_truth: GroundTruth,
        *,
        error_rate: float = 0.0,
        seed: int = 0,
        tolerance_um: float = 3.0,
        min_hit_fraction: float = 1.0 / 3.0,
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        if not 0.0 < min_hit_fraction <= 1.0:
            raise ValueError(f"min_hit_fraction must be in (0, 1], got {min_hit_fraction}")
        self.ground_truth = ground_truth
        self.error_rate = float(error_rate)
        self.tolerance_um = float(tolerance_um)
        self.min_hit_fraction = float(min_hit_fraction)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._decisions: list[Decision] = []

    @property
    def decisions(self) -> list[Decision]:
        """Every decision `answer` made so far, in order."""
        with self._lock:
            return list(self._decisions)

    def answer(self, prompt: PromptView | Mapping[str, Any]) -> list[str]:
        """The option ids to send for `prompt` (`decide`), remembered in `decisions`."""
        decision = self.decide(prompt)
        with self._lock:
            self._decisions.append(decision)
        return list(decision.chosen)

    def hit_fractions(self, prompt: PromptView | Mapping[str, Any]) -> dict[str, float | None]:
        """Per option, the fraction of `context["sample_xy_um"]` positions that lie on a true crystal."""
        view = _as_view(prompt)
        fractions: dict[str, float | None] = {}
        for option in view.options:
            points = _sample_points(option.context)
            if points is None:
                fractions[option.id] = None
                continue
            ids = np.asarray(
                self.ground_truth.crystal_id_xy(points[:, 0], points[:, 1], tolerance_um=self.tolerance_um)
            )
            fractions[option.id] = float(np.mean(ids >= 0))
        return fractions

    def decide(self, prompt: PromptView | Mapping[str, Any]) -> Decision:
        """The options this operator picks for `prompt`, with its seeded mistakes (remembers nothing)."""
        view = _as_view(prompt)
        fractions = self.hit_fractions(view)
        scored = {oid: f for oid, f in fractions.items() if f is not None}
        if view.multiple:
            chosen, mistakes = self._choose_several(view, scored)
        else:
            chosen, mistakes = self._choose_one(view, scored)
        return Decision(prompt_id=view.id, hit_fraction=fractions, chosen=tuple(chosen), mistakes=tuple(mistakes))

    def _choose_several(self, view: PromptView, scored: dict[str, float]) -> tuple[list[str], list[str]]:
        """(chosen, flipped) for a `multiple` prompt: every option judged crystal, else "none", else the best."""
        mistakes: list[str] = []
        verdicts = {oid: f >= self.min_hit_fraction for oid, f in scored.items()}
        for oid in verdicts:
            if self.error_rate > 0 and self._rng.random() < self.error_rate:
                verdicts[oid] = not verdicts[oid]
                mistakes.append(oid)
        chosen = [oid for oid, yes in verdicts.items() if yes]
        if not chosen:
            none_ids = [o.id for o in view.options if o.context.get("none") is True or o.id == "none"]
            if none_ids:
                chosen = none_ids[:1]
            elif scored:
                chosen = [max(scored, key=lambda oid: scored[oid])]
            else:
                chosen = [view.options[0].id]
        return chosen, mistakes

    def _choose_one(self, view: PromptView, scored: dict[str, float]) -> tuple[list[str], list[str]]:
        """(chosen, flipped) for a single-choice prompt: the option with the most hits, or by mistake another."""
        mistakes: list[str] = []
        ranked = sorted(scored, key=lambda oid: scored[oid], reverse=True) or [o.id for o in view.options]
        pick = ranked[0]
        if len(view.options) > 1 and self.error_rate > 0 and self._rng.random() < self.error_rate:
            others = [o.id for o in view.options if o.id != pick]
            pick = others[int(self._rng.integers(len(others)))]
            mistakes.append(pick)
        return [pick], mistakes


def _as_view(prompt: PromptView | Mapping[str, Any]) -> PromptView:
    return prompt if isinstance(prompt, PromptView) else PromptView.from_wire(prompt)


def _sample_points(context: Mapping[str, Any]) -> np.ndarray | None:
    raw = context.get("sample_xy_um")
    if raw is None:
        return None
    try:
        points = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0 or not np.all(np.isfinite(points)):
        return None
    return points
