"""A scripted stand-in for a screening session: drives the console without a microscope.

`ScriptedSession` walks the screening loop's states (calibrating ... recording ... done) on a virtual
clock, writing the same session folder as `agent.screening.ScreeningSession` (journal, atlas heat map,
per-target thumbnails and diffraction previews, summary) and publishing the same events. Its labelling
step asks a real prompt on an `OperatorChannel` (heat map and gallery images attached) and falls back
to its own guess when nobody answers in time. Used by the console's tests and benchmark, and to try the
console out: it is deterministic for a seed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.journal import Journal
from agent.session.events import EventBus
from drivers.formats.images import encode_png, write_atomic

logger = logging.getLogger(__name__)

TARGET_STEPS = ("moving", "zooming", "confirming", "diffraction", "recording")


def _blobs(shape: tuple[int, int], centres: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = 90.0 + rng.normal(0.0, 6.0, shape)
    for col, row in centres:
        image += 120.0 * np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * radius**2))
    return np.clip(image, 0, 255).astype(np.uint8)


class ScriptedSession:
    """A deterministic fake session (see the module docstring); controllable like the real one."""

    def __init__(
        self,
        session_dir: str | Path,
        events: EventBus | None = None,
        channel: Any | None = None,
        *,
        n_targets: int = 4,
        seed: int = 0,
        step_s: float = 0.02,
        prompt_timeout_s: float = 60.0,
        atlas_px: int = 256,
        wait_for_answer: bool = True,
    ) -> None:
        self.session_dir = Path(session_dir)
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.events = events or EventBus()
        self.channel = channel
        self.n_targets = n_targets
        self.step_s = step_s
        self.prompt_timeout_s = prompt_timeout_s
        self.atlas_px = atlas_px
        self.wait_for_answer = wait_for_answer
        self.rng = np.random.default_rng(seed)
        self.state = "idle"
        self.labels = None
        self.plan = None
        self._clock_s = 0.0
        self.journal = Journal(self.session_dir, clock_s=lambda: round(self._clock_s, 2))
        self._pause = threading.Event()
        self._abort = threading.Event()
        self._resume = threading.Event()
        self._thread: threading.Thread | None = None
        self.prompt_handle: Any | None = None
        self.answer: Any | None = None
        self.confirmed = 0
        self.visited = 0

    # -- control (same as ScreeningSession) ---------------------------------------------------------

    def request_pause(self) -> None:
        """Pause at the next step."""
        self._resume.clear()
        self._pause.set()

    def request_resume(self) -> None:
        """Continue after a pause."""
        self._pause.clear()
        self._resume.set()

    def request_abort(self) -> None:
        """Stop at the next step."""
        self._abort.set()
        self._resume.set()

    def microscope_time_s(self) -> float:
        """Virtual microscope time, seconds."""
        return self._clock_s

    # -- running ------------------------------------------------------------------------------------

    def start(self) -> ScriptedSession:
        """Run in a background thread."""
        self._thread = threading.Thread(target=self.run, name="scripted-session", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the run to finish."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def set_state(self, state: str, cost_s: float = 5.0) -> None:
        """Enter `state` (journal + events, like the real session) after `cost_s` of microscope time."""
        self._clock_s += cost_s
        self.state = state
        entry = self.journal.append("transition", state=state)
        self.events.publish("state", state=state, microscope_time_s=entry["microscope_time_s"])
        self.events.publish("journal", entry=entry)

    def _record(self, entry_type: str, **fields: Any) -> dict[str, Any]:
        entry = self.journal.append(entry_type, **fields)
        self.events.publish("journal", entry=entry)
        return entry

    def _checkpoint(self) -> bool:
        """Honour pause / abort between steps; False when aborted."""
        time.sleep(self.step_s)
        if self._pause.is_set() and not self._abort.is_set():
            resume_to = self.state
            self.set_state("paused", 0.0)
            while not self._resume.wait(0.05):
                pass
            self._resume.clear()
            if not self._abort.is_set():
                self.set_state(resume_to, 0.0)
        return not self._abort.is_set()

    def run(self) -> dict[str, Any]:
        """The whole scripted session; returns the summary."""
        try:
            self._run()
        finally:
            summary = self.summary()
            self._record("summary", **summary)
            self.events.publish("summary", **summary)
            self.journal.close()
        return summary

    def _run(self) -> None:
        self._record("session", event="start", session=self.session_dir.name)
        for state in ("calibrating", "mapping"):
            self.set_state(state, 20.0)
            if not self._checkpoint():
                self.set_state("aborted", 0.0)
                return
        size = self.atlas_px
        centres = self.rng.uniform(0.15 * size, 0.85 * size, size=(self.n_targets, 2))
        atlas = _blobs((size, size), centres, size / 40, self.rng)
        self._record("mapping", event="done", box_um=[-50, 50, -50, 50], path="atlas/atlas.tif",
                     shape_px=[size, size])
        self.set_state("locating", 10.0)
        self.set_state("labelling", 1.0)
        crystal = self._ask_operator(atlas)
        self._record("labelling", crystal_clusters=[crystal], asked=self.prompt_handle is not None)
        if not self._checkpoint():
            self.set_state("aborted", 0.0)
            return
        self.set_state("targeting", 2.0)
        targets = [
            {"target_id": f"T{i + 1:03d}", "order": i, "x_um": float(c[0] - size / 2), "y_um": float(c[1] - size / 2),
             "atlas_col_px": float(c[0]), "atlas_row_px": float(c[1]), "area_px": 20.0, "score": 1.0 - i / 10,
             "cluster_id": crystal}
            for i, c in enumerate(centres)
        ]
        self._record("targets", targets=targets)
        heat = np.repeat(atlas[..., None], 3, axis=2)
        heat[..., 0] = np.maximum(heat[..., 0], (atlas > 150) * 255)
        write_atomic(self.session_dir / "atlas" / "heatmap.png", encode_png(heat))
        self.events.publish("atlas", heatmap="atlas/heatmap.png", targets=len(targets))
        for target in targets:
            for step in TARGET_STEPS:
                self.set_state(step, 8.0)
                if not self._checkpoint():
                    self.set_state("aborted", 0.0)
                    return
            self._finish_target(target, atlas)
        self.set_state("done", 0.0)

    def _ask_operator(self, atlas: np.ndarray) -> int:
        if self.channel is None:
            return 1
        from agent.prompts import Prompt, PromptOption

        gallery = np.tile(atlas[:64, :64, None], (1, 2, 3))
        prompt = Prompt(
            kind="crystal-clusters",
            question="Which cluster holds the crystals?",
            options=(PromptOption(id="0", label="cluster 0 (film)"), PromptOption(id="1", label="cluster 1 (bright)"),
                     PromptOption(id="none", label="none of them")),
            timeout_s=self.prompt_timeout_s,
            images={"heatmap.png": encode_png(np.repeat(atlas[..., None], 3, axis=2)),
                    "gallery.png": encode_png(gallery)},
        )
        self.prompt_handle = self.channel.ask(prompt)
        self._record("prompt", prompt_id=prompt.id)
        self.events.publish("prompt", prompt_id=prompt.id, question=prompt.question)
        if not self.wait_for_answer:
            return 1
        while self.prompt_handle.state == "open" and not self._abort.is_set():
            self.answer = self.prompt_handle.wait(0.05)
            if self.answer is not None:
                break
        self.answer = self.prompt_handle.answer
        if self.answer is None:
            self._record("fallback", reason=f"prompt {self.prompt_handle.state}; using the brightest cluster")
            return 1
        choice = self.answer.option_ids[0]
        return int(choice) if choice.isdigit() else 1

    def _finish_target(self, target: dict[str, Any], atlas: np.ndarray) -> None:
        target_id = target["target_id"]
        col, row = int(target["atlas_col_px"]), int(target["atlas_row_px"])
        crop = atlas[max(0, row - 16) : row + 16, max(0, col - 16) : col + 16]
        thumb = np.repeat(np.kron(crop, np.ones((4, 4), dtype=np.uint8))[..., None], 3, axis=2)
        write_atomic(self.session_dir / "targets" / f"{target_id}_thumb.png", encode_png(thumb))
        pattern = _blobs((96, 96), self.rng.uniform(10, 86, size=(8, 2)), 1.5, self.rng)
        write_atomic(self.session_dir / "targets" / f"{target_id}_diffraction.png", encode_png(pattern))
        outcome = "recorded" if self.visited % 4 != 3 else "rejected"
        self.visited += 1
        self.confirmed += outcome == "recorded"
        result = {"target_id": target_id, "outcome": outcome, "x_um": target["x_um"], "y_um": target["y_um"],
                  "n_spots": 8 if outcome == "recorded" else 0, "reason": "" if outcome == "recorded" else "not found",
                  "images": {"thumb": f"targets/{target_id}_thumb.png"}, "microscope_time_s": self._clock_s}
        self._record("target", **result)
        self.events.publish("target", **result)
        self.events.publish("progress", **self.summary())

    def summary(self) -> dict[str, Any]:
        """Counts and microscope time, like `SessionSummary`."""
        return {
            "session": self.session_dir.name, "state": self.state, "targets_found": self.n_targets,
            "targets_visited": self.visited, "targets_confirmed": self.confirmed,
            "prompts": 1 if self.prompt_handle is not None else 0, "microscope_time_s": round(self._clock_s, 2),
            "time_per_confirmed_s": round(self._clock_s / self.confirmed, 2) if self.confirmed else None,
        }
