"""The console demo: a real screening session on a small microscope, at a pace a person can follow.

`ScriptedSession` is an `agent.session.screening.ScreeningSession` (the real runner, steps, journal, events
and session folder) with a plan sized for a demo (`demo_plan`: one grid square, a few targets, the operator
asked with a deadline) and a background thread to run it in. Its labelling step asks a real prompt on an
`OperatorChannel` (answered in the console or a terminal client; without an answer before the deadline the
plan's fallback decides), and an abort also withdraws that prompt, so a demo stops at once.

The microscope comes from the caller: `crystal-locator console --demo` and the console's tests and
benchmark build a small simulated one (nothing in `agent/` but the commands imports `simulator`), and
`PacedMicroscope` wraps it so that every call that moves the stage, changes the optics or exposes takes
`step_s` seconds of wall time: the scripted pace at which the console's live view can be followed by eye.
For a seed (the microscope's and the plan's) and the same answer, the session is the same every time.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import AreaPlan, OperatorPlan, ScreeningPlan, TargetingPlan
from agent.prompts import Answer, OperatorChannel, Prompt, PromptHandle
from agent.session.events import EventBus
from agent.session.screening import ScreeningSession
from agent.steps.stage_calibration import CalibrationSet
from drivers.base import Frame, Microscope, MicroscopeInfo, StageLimits, StagePosition

logger = logging.getLogger(__name__)


def demo_plan(specimen: str | None, seed: int, n_targets: int, prompt_timeout_s: float) -> ScreeningPlan:
    """The demo's plan: one grid square, at most `n_targets` targets, and a labelling prompt that stays open
    (and is waited for) `prompt_timeout_s` seconds of wall time."""
    return ScreeningPlan(
        specimen=specimen,
        seed=seed,
        area=AreaPlan(squares=1),
        targeting=TargetingPlan(max_targets=n_targets),
        operator=OperatorPlan(wait_s=prompt_timeout_s, deadline_s=prompt_timeout_s),
    )


class PacedMicroscope:
    """A `drivers.base.Microscope` that delegates every call to `microscope` and then, for each call that
    moves the stage, changes the optics or the beam, or exposes, sleeps `step_s` seconds of wall time (reads
    stay instant). The microscope's own clock is untouched: figures in microscope time do not change."""

    def __init__(self, microscope: Microscope, step_s: float) -> None:
        self.microscope = microscope
        self.step_s = step_s

    def _pace(self) -> None:
        time.sleep(self.step_s)

    def info(self) -> MicroscopeInfo:
        """The wrapped microscope's `info()`."""
        return self.microscope.info()

    def microscope_time_s(self) -> float:
        """The wrapped microscope's clock, seconds."""
        return self.microscope.microscope_time_s()

    def get_stage(self) -> StagePosition:
        """The stage position (um, deg)."""
        return self.microscope.get_stage()

    def stage_limits(self) -> StageLimits:
        """The stage's travel limits."""
        return self.microscope.stage_limits()

    def move_stage(
        self,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        alpha_deg: float | None = None,
        wait: bool = True,
    ) -> None:
        """Move the stage (um, deg), then pause `step_s`."""
        self.microscope.move_stage(x_um=x_um, y_um=y_um, z_um=z_um, alpha_deg=alpha_deg, wait=wait)
        self._pace()

    def is_stage_moving(self) -> bool:
        """True while a move is in progress."""
        return self.microscope.is_stage_moving()

    def wait_for_stage(self, timeout_s: float = 60.0) -> None:
        """Wait for the stage to settle (at most `timeout_s` seconds)."""
        self.microscope.wait_for_stage(timeout_s)

    def stop_stage(self) -> None:
        """Stop the stage at once (not paced)."""
        self.microscope.stop_stage()

    def get_preset(self) -> str:
        """The active optics preset."""
        return self.microscope.get_preset()

    def set_preset(self, name: str) -> None:
        """Apply an optics preset, then pause `step_s`."""
        self.microscope.set_preset(name)
        self._pace()

    def set_beam_blanked(self, blanked: bool) -> None:
        """Blank or unblank the beam, then pause `step_s`."""
        self.microscope.set_beam_blanked(blanked)
        self._pace()

    def is_beam_blanked(self) -> bool:
        """True if the beam is blanked."""
        return self.microscope.is_beam_blanked()

    def acquire(self, exposure_s: float) -> Frame:
        """An image exposed `exposure_s` seconds (microscope time), after a pause of `step_s`."""
        frame = self.microscope.acquire(exposure_s)
        self._pace()
        return frame

    def acquire_diffraction(self, exposure_s: float) -> Frame:
        """A diffraction pattern exposed `exposure_s` seconds (microscope time), after a pause of `step_s`."""
        frame = self.microscope.acquire_diffraction(exposure_s)
        self._pace()
        return frame


class _SessionPrompts:
    """The session's way to the operator: asks on `channel` and keeps the handles of what it asked, so the
    demo can show them and withdraw them on abort (after which anything asked is withdrawn at once)."""

    def __init__(self, channel: OperatorChannel) -> None:
        self.channel = channel
        self.handles: list[PromptHandle] = []
        self._withdrawn = False
        self._lock = threading.Lock()

    def ask(self, prompt: Prompt) -> PromptHandle:
        """Ask `prompt` on the channel (what the labelling step calls)."""
        handle = self.channel.ask(prompt)
        with self._lock:
            self.handles.append(handle)
            withdrawn = self._withdrawn
        if withdrawn:
            handle.cancel()
        return handle

    def withdraw(self) -> None:
        """Cancel every open prompt of the session, now and from now on."""
        with self._lock:
            self._withdrawn = True
            handles = list(self.handles)
        for handle in handles:
            handle.cancel()


class ScriptedSession(ScreeningSession):
    """A real screening session with the demo's plan, run in a background thread (see the module docstring).

    `microscope` is any `Microscope` (`step_s` > 0 paces it with `PacedMicroscope`); `channel` the prompt
    channel (None: nobody is asked, the fallback decides); `specimen` and `seed` go to the plan;
    `calibration` a known image -> stage calibration of `microscope` (the calibrating step then measures
    nothing, which keeps a demo to seconds); `labels` a label memory (None: every cluster is asked about).
    """

    def __init__(
        self,
        microscope: Microscope,
        session_dir: str | Path,
        events: EventBus | None = None,
        channel: OperatorChannel | None = None,
        *,
        specimen: str | None = None,
        seed: int = 0,
        n_targets: int = 4,
        step_s: float = 0.0,
        prompt_timeout_s: float = 60.0,
        calibration: CalibrationSet | None = None,
        labels: Any | None = None,
    ) -> None:
        self.channel = channel
        self.prompts = _SessionPrompts(channel) if channel is not None else None
        self._thread: threading.Thread | None = None
        super().__init__(
            PacedMicroscope(microscope, step_s) if step_s > 0 else microscope,
            demo_plan(specimen, seed, n_targets, prompt_timeout_s),
            session_dir,
            labels=labels,
            operator=self.prompts,
            events=events,
            calibration=calibration,
        )

    def start(self) -> ScriptedSession:
        """Run the session in a background thread; returns at once."""
        self._thread = threading.Thread(target=self.run, name="demo-session", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> None:
        """Wait (at most `timeout_s` seconds) for the session started by `start` to end."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Abort, wait (at most `timeout_s` seconds) for the run to end, and close the journal (also when the
        session never started)."""
        self.request_abort()
        self.join(timeout_s)
        self.journal.close()

    def request_abort(self) -> None:
        """Stop at the next step boundary, withdrawing the session's open prompt so that it comes soon."""
        super().request_abort()
        if self.prompts is not None:
            self.prompts.withdraw()

    @property
    def prompt_handle(self) -> PromptHandle | None:
        """The labelling prompt asked by this session (None before it is asked, or without a channel)."""
        if self.prompts is None or not self.prompts.handles:
            return None
        return self.prompts.handles[-1]

    @property
    def answer(self) -> Answer | None:
        """The answer to the labelling prompt (None while open, or if it expired or was withdrawn)."""
        handle = self.prompt_handle
        return handle.answer if handle is not None else None
