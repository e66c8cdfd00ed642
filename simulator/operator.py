"""A simulated operator: a real ZeroMQ client that answers the agent's prompts from ground truth.

It lets the screening loop run end to end with prompts in CI and evaluation. It connects to an
agent's `OperatorChannel` like any front-end (`agent.operator.OperatorClient` wire format; imported
lazily so that `simulator` does not depend on `agent` at import time), and for each prompt looks at
every option's `context["sample_xy_um"]` (stage positions, um, of typical cells of that cluster): an
option is "crystal" when at least `min_hit_fraction` (default a third: a person shown a gallery in
which every third patch shows a crystal says the cluster contains crystals) of those positions lie
on a true crystal (`ground_truth.crystal_id_xy(x, y, tolerance_um=...) >= 0`).

* `multiple` prompts: every "crystal" option is chosen; if none is, an option whose context says
  `{"none": true}` (or whose id is "none") is chosen, else the option with the most hits.
* single-choice prompts: the option with the most hits.

Mistakes: with probability `error_rate` (seeded) each option's verdict is flipped (single choice: a
different option is picked). `delay_s` waits before answering; `never_answer=True` never answers
(to test the agent's fallback). What it did is kept in `decisions` for tests and evaluation.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from agent.operator import PromptInfo

logger = logging.getLogger(__name__)


class GroundTruth(Protocol):
    """What the simulated operator needs from a specimen (`simulator.specimen.Specimen` has it)."""

    def crystal_id_xy(self, x_um: np.ndarray, y_um: np.ndarray, tolerance_um: float = 0.0) -> np.ndarray:
        """Crystal id at each (x, y) um, -1 where none."""
        ...


@dataclass(frozen=True)
class Decision:
    """What the simulated operator decided about one prompt.

    `hit_fraction`: per option id, the fraction of its sample positions on a crystal (None: the
    option had no positions); `chosen`: the option ids sent (empty if it did not answer);
    `mistakes`: option ids whose verdict was deliberately flipped; `reply`: the agent's reply, or
    the refusal message.
    """

    prompt_id: str
    hit_fraction: dict[str, float | None]
    chosen: tuple[str, ...]
    mistakes: tuple[str, ...] = ()
    accepted: bool = False
    reply: str = ""
    time_s: float = field(default_factory=time.monotonic)


class SimulatedOperator:
    """Answers prompts on `endpoint` (an `OperatorChannel.prompt_endpoint`) from `ground_truth`.

    Use as a context manager or call `start()` / `stop()`. `error_rate` in [0, 1], `delay_s` >= 0
    (seconds between seeing a prompt and answering), `tolerance_um`: a sample position within this
    distance of a crystal's outline counts as on it.
    """

    def __init__(
        self,
        endpoint: str,
        ground_truth: GroundTruth,
        *,
        error_rate: float = 0.0,
        delay_s: float = 0.0,
        seed: int = 0,
        name: str = "simulated",
        never_answer: bool = False,
        tolerance_um: float = 3.0,
        min_hit_fraction: float = 1.0 / 3.0,
        event_endpoint: str | None = None,
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        if not (delay_s >= 0.0 and np.isfinite(delay_s)):
            raise ValueError(f"delay_s must be a finite number of seconds >= 0, got {delay_s}")
        if not 0.0 < min_hit_fraction <= 1.0:
            raise ValueError(f"min_hit_fraction must be in (0, 1], got {min_hit_fraction}")
        self.endpoint = endpoint
        self.event_endpoint = event_endpoint
        self.ground_truth = ground_truth
        self.error_rate = float(error_rate)
        self.delay_s = float(delay_s)
        self.name = name
        self.never_answer = never_answer
        self.tolerance_um = float(tolerance_um)
        self.min_hit_fraction = float(min_hit_fraction)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._decisions: list[Decision] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> SimulatedOperator:
        """Connect and start answering in a background thread; raises if it cannot connect."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"simulated-operator-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"simulated operator could not connect to {self.endpoint} within {timeout_s} s")
        if self._error is not None:
            self.stop()
            raise self._error
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop answering and disconnect. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> SimulatedOperator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def decisions(self) -> list[Decision]:
        """Every prompt decided so far, in order."""
        with self._lock:
            return list(self._decisions)

    @property
    def answered(self) -> list[Decision]:
        """The decisions whose answer the agent accepted."""
        return [d for d in self.decisions if d.accepted]

    # -- deciding ----------------------------------------------------------------------------------

    def hit_fractions(self, prompt: PromptInfo) -> dict[str, float | None]:
        """Per option, the fraction of `context["sample_xy_um"]` positions that lie on a true crystal."""
        fractions: dict[str, float | None] = {}
        for option in prompt.options:
            points = _sample_points(option.context)
            if points is None:
                fractions[option.id] = None
                continue
            ids = np.asarray(
                self.ground_truth.crystal_id_xy(points[:, 0], points[:, 1], tolerance_um=self.tolerance_um)
            )
            fractions[option.id] = float(np.mean(ids >= 0))
        return fractions

    def decide(self, prompt: PromptInfo) -> Decision:
        """The options this operator picks for `prompt` (with its seeded mistakes); sends nothing."""
        fractions = self.hit_fractions(prompt)
        scored = {oid: f for oid, f in fractions.items() if f is not None}
        mistakes: list[str] = []
        if prompt.multiple:
            verdicts = {oid: f >= self.min_hit_fraction for oid, f in scored.items()}
            for oid in verdicts:
                if self.error_rate > 0 and self._rng.random() < self.error_rate:
                    verdicts[oid] = not verdicts[oid]
                    mistakes.append(oid)
            chosen = [oid for oid, yes in verdicts.items() if yes]
            if not chosen:
                none_ids = [o.id for o in prompt.options if o.context.get("none") is True or o.id == "none"]
                if none_ids:
                    chosen = none_ids[:1]
                elif scored:
                    chosen = [max(scored, key=lambda oid: scored[oid])]
                else:
                    chosen = [prompt.options[0].id]
        else:
            ranked = sorted(scored, key=lambda oid: scored[oid], reverse=True) or [o.id for o in prompt.options]
            pick = ranked[0]
            if len(prompt.options) > 1 and self.error_rate > 0 and self._rng.random() < self.error_rate:
                others = [o.id for o in prompt.options if o.id != pick]
                pick = others[int(self._rng.integers(len(others)))]
                mistakes.append(pick)
            chosen = [pick]
        return Decision(prompt_id=prompt.id, hit_fraction=fractions, chosen=tuple(chosen), mistakes=tuple(mistakes))

    # -- thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        from agent.operator import AnswerRefusedError, OperatorClient, OperatorError, PromptClosed, PromptInfo

        try:
            client = OperatorClient(self.endpoint, event_endpoint=self.event_endpoint)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        due: dict[str, tuple[float, Any]] = {}
        try:
            while not self._stop.is_set():
                wait_s = 0.05
                if due:
                    wait_s = max(0.0, min(wait_s, min(t for t, _ in due.values()) - time.monotonic()))
                event = client.next_event(wait_s)
                if isinstance(event, PromptInfo) and not self.never_answer:
                    due[event.id] = (time.monotonic() + self.delay_s, event)
                elif isinstance(event, PromptClosed):
                    due.pop(event.prompt_id, None)
                for prompt_id, (when, prompt) in list(due.items()):
                    if when > time.monotonic():
                        continue
                    del due[prompt_id]
                    decision = self.decide(prompt)
                    try:
                        reply = client.answer(prompt_id, list(decision.chosen), operator=self.name)
                        decision = _replace(decision, accepted=True, reply=f"accepted at {reply.answered_utc}")
                    except AnswerRefusedError as exc:
                        decision = _replace(decision, reply=f"{exc.code}: {exc}")
                    except OperatorError as exc:
                        decision = _replace(decision, reply=f"error: {exc}")
                    logger.info("simulated operator %s: %s -> %s (%s)", self.name, prompt_id, decision.chosen,
                                decision.reply)
                    with self._lock:
                        self._decisions.append(decision)
        except Exception:
            logger.exception("simulated operator %s stopped on an error", self.name)
        finally:
            client.close()


def _replace(decision: Decision, **changes: Any) -> Decision:
    from dataclasses import replace

    return replace(decision, **changes)


def _sample_points(context: dict[str, Any]) -> np.ndarray | None:
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
