r"""The screening loop: a `transitions` state machine that takes a grid from nothing to confirmed crystals.

```
idle -> calibrating -> mapping -> locating -> labelling -> targeting
      -> [ moving -> zooming -> confirming -> diffraction -> recording ]* -> done
                                     \-> (rejected: next target)
any state --fault--> recovering --retry--> (the failed state)
                                --skip---> next target / done
                                --give_up-> failed
any state --pause--> paused --unpause--> (the paused state);  any state --abort--> aborted
```

The session (runner) owns the loop, the journal and the outputs; the `Microscope` owns the hardware. The
runner executes one step per state, and between steps it honours pause and abort requests (thread-safe,
from a console or a signal handler). Every transition and every target's outcome is journalled (flushed,
fsynced) before the next step, so `ScreeningSession.resume(dir)` continues a session killed at any point
without revisiting a finished target or losing a written result.

At `confirming` a target is rejected when nothing crystal-like lies near it at the search preset, when the
object there is round (an ice ball), or when it re-centres onto an object an earlier target already
confirmed (within `targeting.min_spacing_um`: pieces of one large flake or blob are measured once).

Faults (`MicroscopeError` from any step) go to `recovering`: calibration and mapping are retried (a new
calibration site each time), a target step is retried up to `recovery.max_retries` times and the target
is then skipped (`failed`); more than `recovery.max_faults` faults end the session in `failed`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from transitions import Machine

from agent import outputs
from agent.atlas import (
    Atlas,
    acquire_montage,
    assemble,
    block_box_um,
    choose_block,
    find_squares,
    frame_atlas,
    plan_tiles,
)
from agent.calibration import CALIBRATION_NAME, CalibrationSet, measure_preset
from agent.config import PLAN_NAME, ScreeningPlan, load_plan
from agent.confirm import find_object_near_centre
from agent.diffraction import score_diffraction
from agent.events import EventBus
from agent.journal import Journal, read_journal
from agent.labelling import LabellingDecision, decide_crystal_clusters
from agent.locate.analysis import analyse
from agent.locate.preprocess import prepare_image
from agent.locate.targets import find_candidates
from agent.motion import approach_move, plan_tiered_path
from agent.records import CONFIRMED_OUTCOMES, SessionSummary, TargetRecord, TargetResult
from drivers.base import Frame, Microscope, MicroscopeError, pixel_to_stage_um
from drivers.formats.images import read_frame_tiff, write_frame_tiff

logger = logging.getLogger(__name__)

STATES = (
    "idle",
    "calibrating",
    "mapping",
    "locating",
    "labelling",
    "targeting",
    "moving",
    "zooming",
    "confirming",
    "diffraction",
    "recording",
    "recovering",
    "paused",
    "done",
    "aborted",
    "failed",
)
TERMINAL_STATES = frozenset({"done", "aborted", "failed"})
WORKING_STATES = tuple(s for s in STATES if s not in TERMINAL_STATES and s not in ("paused", "recovering", "idle"))
TARGET_STATES = frozenset({"moving", "zooming", "confirming", "diffraction", "recording"})

#: What the atlas saw at a stage point (see `ScreeningSession._atlas_classes`).
OFF_ATLAS, BAR, FILM, OTHER = -1, 0, 1, 2

#: Scores the session against ground truth (simulated sessions only): (targets, results, box_um) -> dict
#: with precision / recall / recall_diffracting. Supplied by whoever wires a simulator in (the CLI).
TruthScorer = Callable[[list[TargetRecord], dict[str, TargetResult], tuple[float, float, float, float]], dict[str, Any]]


class SessionError(Exception):
    """A session cannot start or resume (missing or damaged session folder, wrong instrument)."""


def fill_target_places(
    sure: list[tuple[Any, float, float]],
    mixed: list[tuple[Any, float, float]],
    max_targets: int,
    min_spacing_um: float,
) -> tuple[list[tuple[Any, float, float]], list[tuple[Any, float, float]]]:
    """Targets from the sure (crystal) clusters' candidates, then from the mixed clusters' ones.

    Both lists hold (candidate, x_um, y_um) in the locator's order (best first, one object per region
    first). The sure ones take up to `max_targets` places; mixed ones fill the places left, skipping any
    within `min_spacing_um` of a sure target (the same object seen by two clusters).
    """
    sure = sure[:max_targets]
    kept = [
        entry for entry in mixed if all(math.hypot(entry[1] - x, entry[2] - y) >= min_spacing_um for _, x, y in sure)
    ]
    return sure, kept[: max_targets - len(sure)]


class ScreeningSession:
    """Runs one screening session on any `Microscope`; see the module docstring for the state diagram.

    Construct with a plan and a session folder, then call `run()` (blocking). `request_pause()`,
    `request_resume()` and `request_abort()` may be called from any thread. `ScreeningSession.resume()`
    rebuilds a session from its folder.
    """

    state: str

    def __init__(
        self,
        microscope: Microscope,
        plan: ScreeningPlan,
        session_dir: str | Path,
        *,
        labels: Any | None = None,
        operator: Any | None = None,
        events: EventBus | None = None,
        truth_scorer: TruthScorer | None = None,
        calibration: CalibrationSet | None = None,
    ) -> None:
        self.microscope = microscope
        self.plan = plan
        self.session_dir = Path(session_dir)
        self.session_dir.mkdir(parents=True, exist_ok=True)
        self.session_id = self.session_dir.name or uuid.uuid4().hex[:8]
        self.labels = labels
        self.operator = operator
        self.events = events or EventBus()
        self.truth_scorer = truth_scorer
        info = microscope.info()
        self.info = info
        if calibration is not None and calibration.instrument != info.name:
            logger.warning("ignoring a calibration of %r: this microscope is %r", calibration.instrument, info.name)
            calibration = None
        self.calibration = calibration or CalibrationSet(instrument=info.name)

        self._clock_offset_s = 0.0
        self._clock_base_s = float(microscope.microscope_time_s())
        self._wall_start = time.monotonic()
        self.journal = Journal(self.session_dir, clock_s=self.microscope_time_s)

        self.overview: Atlas | None = None
        self.atlas: Atlas | None = None
        self.map_box_um: tuple[float, float, float, float] | None = None
        self.analysis: Any | None = None
        self.decision: LabellingDecision | None = None
        self.targets: list[TargetRecord] = []
        self.results: dict[str, TargetResult] = {}
        self.prompts = 0
        self.faults = 0
        self._current: TargetRecord | None = None
        self._work: dict[str, Any] = {}
        self._retries: dict[str, int] = {}
        self._failed_state: str | None = None
        self._fault_reason = ""
        self._resume_to: str | None = None
        self._pause_requested = threading.Event()
        self._resume_requested = threading.Event()
        self._abort_requested = threading.Event()
        self._calibration_attempt = 0
        self._overview_bar_mask: np.ndarray | None = None

        self.machine = Machine(
            model=self,
            states=list(STATES),
            initial="idle",
            auto_transitions=False,
            send_event=False,
            after_state_change="_after_state_change",
        )
        m = self.machine
        m.add_transition("start", "idle", "calibrating")
        m.add_transition("calibrated", "calibrating", "mapping")
        m.add_transition("mapped", "mapping", "locating")
        m.add_transition("located", "locating", "labelling")
        m.add_transition("labelled", "labelling", "targeting")
        m.add_transition("next_target", ["targeting", "confirming", "recording", "recovering"], "moving")
        m.add_transition("arrived", "moving", "zooming")
        m.add_transition("zoomed", "zooming", "confirming")
        m.add_transition("confirmed", "confirming", "diffraction")
        m.add_transition("diffracted", "diffraction", "recording")
        m.add_transition("finish", ["targeting", "confirming", "recording", "recovering"], "done")
        m.add_transition("fault", list(WORKING_STATES), "recovering")
        m.add_transition("give_up", "recovering", "failed")
        m.add_transition("pause", [*WORKING_STATES, "recovering"], "paused")
        m.add_transition("abort", [s for s in STATES if s not in TERMINAL_STATES], "aborted")
        for state in [*WORKING_STATES, "recovering"]:
            m.add_transition("unpause", "paused", state, conditions=lambda s=state: self._resume_to == s)
            if state != "recovering":
                m.add_transition("retry", "recovering", state, conditions=lambda s=state: self._resume_to == s)

    # ----------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def resume(cls, microscope: Microscope, session_dir: str | Path, **kwargs: Any) -> ScreeningSession:
        """Rebuild a session from its folder (plan, calibration, atlas, targets, outcomes) to continue it."""
        folder = Path(session_dir)
        if not (folder / PLAN_NAME).exists() or not read_journal(folder / "journal.jsonl"):
            raise SessionError(f"{folder}: not a screening session folder (no {PLAN_NAME} or empty journal)")
        plan = load_plan(folder / PLAN_NAME)
        calibration = None
        if (folder / CALIBRATION_NAME).exists():
            calibration = CalibrationSet.load(folder / CALIBRATION_NAME)
        session = cls(microscope, plan, folder, calibration=calibration, **kwargs)
        session._restore()
        return session

    def microscope_time_s(self) -> float:
        """Microscope time of this session, seconds, summed over every resumed run."""
        return self._clock_offset_s + float(self.microscope.microscope_time_s()) - self._clock_base_s

    def request_pause(self) -> None:
        """Pause at the next step boundary (the current stage move or exposure completes first)."""
        self._resume_requested.clear()
        self._pause_requested.set()

    def request_resume(self) -> None:
        """Continue a paused session."""
        self._pause_requested.clear()
        self._resume_requested.set()

    def request_abort(self) -> None:
        """Stop at the next step boundary; results so far are kept and the session can be resumed."""
        self._abort_requested.set()
        self._resume_requested.set()

    def run(self) -> SessionSummary:
        """Run (or continue) the session until done, aborted or failed; returns the final summary."""
        if self.state == "idle":
            self.plan.save(self.session_dir / PLAN_NAME)
            self.journal.append(
                "session",
                event="start",
                session=self.session_id,
                plan=self.plan.model_dump(mode="json"),
                instrument=self.info.name,
            )
            self.trigger("start")
        handlers: dict[str, Callable[[], str]] = {
            "calibrating": self._step_calibrating,
            "mapping": self._step_mapping,
            "locating": self._step_locating,
            "labelling": self._step_labelling,
            "targeting": self._step_targeting,
            "moving": self._step_moving,
            "zooming": self._step_zooming,
            "confirming": self._step_confirming,
            "diffraction": self._step_diffraction,
            "recording": self._step_recording,
            "recovering": self._step_recovering,
        }
        while self.state not in TERMINAL_STATES:
            if self._abort_requested.is_set():
                self.trigger("abort")
                break
            if self._pause_requested.is_set():
                self._wait_paused()
                continue
            state = self.state
            try:
                trigger = handlers[state]()
            except MicroscopeError as exc:
                self._on_fault(state, exc)
                continue
            except Exception as exc:  # an unattended run must not die of one bad image; the log has the trace
                logger.exception("unexpected error in %s", state)
                self._on_fault(state, exc)
                continue
            self.trigger(trigger)
        summary = self.write_summary()
        self.journal.append("summary", **summary.model_dump(mode="json"))
        self.events.publish("summary", **summary.model_dump(mode="json"))
        self.journal.close()
        return summary

    # ----------------------------------------------------------------------------------------------
    # Bookkeeping
    # ----------------------------------------------------------------------------------------------
    def _after_state_change(self) -> None:
        entry = self.journal.append("transition", state=self.state)
        self.events.publish("state", state=self.state, microscope_time_s=entry["microscope_time_s"])
        self.events.publish("journal", entry=entry)

    def _record(self, entry_type: str, **fields: Any) -> dict[str, Any]:
        entry = self.journal.append(entry_type, **fields)
        self.events.publish("journal", entry=entry)
        return entry

    def _wait_paused(self) -> None:
        self._resume_to = self.state
        self.trigger("pause")
        self._record("control", command="pause", resume_to=self._resume_to)
        while not self._resume_requested.wait(0.1):
            pass
        self._resume_requested.clear()
        if self._abort_requested.is_set():
            return
        self._pause_requested.clear()
        self._record("control", command="resume")
        self.trigger("unpause")

    def _on_fault(self, state: str, exc: Exception) -> None:
        self.faults += 1
        self._failed_state = state
        self._fault_reason = f"{type(exc).__name__}: {exc}"
        logger.warning("fault in %s: %s", state, self._fault_reason)
        self._record(
            "fault",
            state=state,
            error=type(exc).__name__,
            message=str(exc),
            target_id=self._current.target_id if self._current and state in TARGET_STATES else None,
        )
        self.trigger("fault")

    def _outpath(self, *parts: str) -> Path:
        path = self.session_dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _artifact(self, kind: str, path: Path, **fields: Any) -> str:
        relative = str(path.relative_to(self.session_dir))
        self._record("artifact", kind=kind, path=relative, **fields)
        return relative

    def _frame_shape(self, preset: str) -> tuple[int, int]:
        binning = self.info.preset(preset).binning
        return (self.info.camera_shape_px[0] // binning, self.info.camera_shape_px[1] // binning)

    # ----------------------------------------------------------------------------------------------
    # Steps: each returns the trigger to fire next
    # ----------------------------------------------------------------------------------------------
    def _step_calibrating(self) -> str:
        presets = self.plan.presets
        needed = [presets.atlas, presets.search]
        if self.plan.area.overview and self.plan.area.box_um is None:
            needed.insert(0, presets.overview)
        exposure_s = self.plan.exposures.calibration_s
        approach_um = self.plan.targeting.approach_um
        for preset in needed:
            if preset in self.calibration.presets:
                continue
            site = self._calibration_site(preset)
            calibration = measure_preset(
                self.microscope, preset, exposure_s=exposure_s, stage_xy_um=site, approach_um=approach_um
            )
            self.calibration = self.calibration.with_preset(calibration)
            self.calibration.save(self.session_dir / CALIBRATION_NAME)
            self._record("calibration", **calibration.model_dump(mode="json"))
        return "calibrated"

    def _calibration_site(self, preset: str) -> tuple[float, float]:
        """Where to calibrate `preset`: the corner of a grid square near the centre when the overview shows
        the mesh (film meets bar along two directions: structure in both axes at every magnification,
        even when a field of view is narrower than a bar), else near the stage centre. For presets above
        the atlas the corner is refined on an atlas frame (the overview locates it only to a few pixels
        of ~2-6 um). Each retry takes the next corner (or the next point of a spiral)."""
        attempt = self._calibration_attempt
        spiral = (40.0 * attempt * math.cos(attempt * 2.4), 40.0 * attempt * math.sin(attempt * 2.4))
        overview_preset, atlas_preset = self.plan.presets.overview, self.plan.presets.atlas
        if preset == overview_preset or overview_preset not in self.calibration.presets:
            return spiral
        overview = self._overview_atlas()
        corners = square_corners(overview, self._bar_mask(overview), near_xy_um=(0.0, 0.0))
        if not corners:
            return spiral
        site = corners[attempt % len(corners)]
        if preset != atlas_preset and atlas_preset in self.calibration.presets:
            self.microscope.set_preset(atlas_preset)
            approach_move(self.microscope, site[0], site[1], self.plan.targeting.approach_um)
            frame = self.microscope.acquire(self.plan.exposures.calibration_s)
            local = frame_atlas(frame, self.calibration.matrix(atlas_preset))
            refined = square_corners(local, self._bar_mask(local), near_xy_um=site)
            if refined:
                site = refined[0]
        return site

    def _overview_atlas(self) -> Atlas:
        if self.overview is None:
            preset = self.plan.presets.overview
            self.microscope.set_preset(preset)
            approach_move(self.microscope, 0.0, 0.0, self.plan.targeting.approach_um)
            frame = self.microscope.acquire(self.plan.exposures.overview_s)
            path = write_frame_tiff(self._outpath("overview.tif"), frame)
            self._artifact("overview", path)
            self.overview = frame_atlas(frame, self.calibration.matrix(preset))
        return self.overview

    def _bar_mask(self, atlas: Atlas) -> np.ndarray:
        """Grid bars and black areas of an overview or atlas image; the overview's is computed once.

        Only the locator's mask step runs (`bar_and_black_mask`, the same as `analyse` with
        `bar_filter="auto"`): no features or clustering are needed for it.
        """
        from agent.locate.analysis import LocateSettings, bar_and_black_mask

        if atlas is self.overview and self._overview_bar_mask is not None:
            return self._overview_bar_mask
        mask, _angle_deg = bar_and_black_mask(np.asarray(atlas.image), LocateSettings(bar_filter="auto"))
        mask = np.asarray(mask, dtype=bool)
        if atlas is self.overview:
            self._overview_bar_mask = mask
        return mask

    def _step_mapping(self) -> str:
        area = self.plan.area
        limits = self.microscope.stage_limits()
        atlas_preset = self.plan.presets.atlas
        matrix = self.calibration.matrix(atlas_preset)
        frame_shape = self._frame_shape(atlas_preset)
        squares: list[dict[str, float]] = []
        if area.box_um is not None:
            box = area.box_um
        elif area.overview:
            overview = self._overview_atlas()
            found = find_squares(overview, self._bar_mask(overview))
            block = choose_block(found, area.squares)
            if block:
                box = block_box_um(block, area.margin_um)
                squares = [{"x_um": s.x_um, "y_um": s.y_um, "typicality": s.typicality} for s in block]
            else:
                logger.warning("no grid squares found in the overview; mapping one atlas field at the centre")
                box = _field_box(matrix, frame_shape, (0.0, 0.0))
        else:
            here = self.microscope.get_stage()
            box = _field_box(matrix, frame_shape, (here.x_um, here.y_um))
        box = (
            max(box[0], limits.x_min_um),
            min(box[1], limits.x_max_um),
            max(box[2], limits.y_min_um),
            min(box[3], limits.y_max_um),
        )
        positions = plan_tiles(box, matrix, frame_shape, area.overlap_fraction)
        self._record("mapping", event="plan", box_um=list(box), tiles=len(positions), squares=squares)
        frames = acquire_montage(
            self.microscope,
            positions,
            preset=atlas_preset,
            exposure_s=self.plan.exposures.atlas_s,
            approach_um=self.plan.targeting.approach_um,
        )
        atlas = assemble(frames, matrix)
        path = write_frame_tiff(self._outpath("atlas", "atlas.tif"), atlas.as_frame(self.microscope_time_s()))
        self.atlas = atlas
        self.map_box_um = box
        self._record(
            "mapping",
            event="done",
            box_um=list(box),
            path=self._artifact("atlas", path),
            shape_px=list(atlas.image.shape),
        )
        return "mapped"

    def _step_locating(self) -> str:
        assert self.atlas is not None
        self.analysis = analyse(self.atlas.image, self.plan.locate)
        self._record(
            "locating",
            clusters=[
                {"cluster_id": int(c.cluster_id), "n_cells": int(c.n_cells), "fraction": float(c.fraction)}
                for c in self.analysis.clusters
            ],
            suggested=list(self.analysis.suggested_crystal_clusters),
            rule=self.analysis.suggestion_rule,
        )
        return "located"

    def _atlas_classes(self, xy_um: np.ndarray) -> np.ndarray:
        """What the atlas says is at stage points: OFF_ATLAS, BAR (bars, black areas), FILM (the background
        cluster) or OTHER (any other cluster)."""
        result = np.full(len(xy_um), OFF_ATLAS, dtype=np.int8)
        if self.atlas is None or self.analysis is None:
            return result
        analysis = self.analysis
        bar = np.asarray(analysis.bar_mask, dtype=bool)
        col_row = np.rint(self.atlas.stage_to_pixel(np.asarray(xy_um, dtype=np.float64))).astype(np.int64)
        inside = (col_row[:, 0] >= 0) & (col_row[:, 0] < bar.shape[1])
        inside &= (col_row[:, 1] >= 0) & (col_row[:, 1] < bar.shape[0])
        rows, cols = col_row[inside, 1], col_row[inside, 0]
        labels = np.asarray(analysis.label_grid)[analysis.row_index_px[rows], analysis.col_index_px[cols]]
        classes = np.where(labels == analysis.background_cluster, FILM, OTHER)
        classes[(labels < 0) | bar[rows, cols]] = BAR
        result[inside] = classes
        return result

    def _sample_xy_um(self, cluster: Any) -> list[list[float]]:
        assert self.atlas is not None
        rows_cols = np.asarray(cluster.example_cells_px, dtype=np.float64).reshape(-1, 2)
        xy = self.atlas.pixel_to_stage_um(rows_cols[:, ::-1])
        return [[round(float(x), 3), round(float(y), 3)] for x, y in xy]

    def _step_labelling(self) -> str:
        assert self.analysis is not None and self.atlas is not None
        analysis, atlas = self.analysis, self.atlas

        def images() -> dict[str, bytes]:
            return outputs.prompt_images(atlas.image, analysis)

        def reference_clusters() -> list[int]:
            grid = np.asarray(analysis.label_grid)
            return sorted(
                {
                    int(grid[r, c])
                    for r, c in self.plan.operator.reference_cells
                    if 0 <= r < grid.shape[0] and 0 <= c < grid.shape[1] and grid[r, c] >= 0
                }
            )

        asked_before = self.prompts
        self.decision = decide_crystal_clusters(
            analysis,
            plan=self.plan.operator,
            specimen=self.plan.specimen or "unknown",
            preset=self.plan.presets.atlas,
            session_id=self.session_id,
            memory=self.labels,
            channel=self.operator,
            sample_xy_um=self._sample_xy_um,
            prompt_images=images,
            reference_clusters=reference_clusters,
        )
        if self.decision.asked:
            self.prompts = asked_before + 1
            self._record("prompt", prompt_id=self.decision.prompt_id, answered_by=self.decision.answered_by)
            self.events.publish("prompt", prompt_id=self.decision.prompt_id, answered_by=self.decision.answered_by)
        self._record("labelling", **self.decision.as_dict())
        return "labelled"

    def _step_targeting(self) -> str:
        assert self.analysis is not None and self.atlas is not None and self.decision is not None
        atlas = self.atlas
        pixel_um = atlas.pixel_size_um
        targeting = self.plan.targeting
        settings = self.plan.locate.model_copy(
            update={
                "min_spacing_px": max(1.0, targeting.min_spacing_um / pixel_um),
                "min_bar_distance_px": targeting.min_bar_distance_um / pixel_um,
                "max_candidates": max(targeting.max_targets * 4, 50),
            }
        )
        limits = self.microscope.stage_limits()
        # with candidates of two cluster sets to find, the image is prepared for them once
        prepared = (
            prepare_image(atlas.image, self.analysis.bar_mask, flatten=settings.flatten, clean=settings.clean)
            if self.decision.crystal_clusters and self.decision.mixed_clusters
            else None
        )

        def reachable(clusters: tuple[int, ...]) -> list[tuple[Any, float, float]]:
            """Candidates of `clusters` (locator's order) inside the stage limits and the mapped box, with stage um."""
            kept = []
            for candidate in find_candidates(self.analysis, clusters, settings, image=atlas.image, prepared=prepared):
                x_um, y_um = atlas.pixel_to_stage_um(np.array([candidate.col_px, candidate.row_px]))
                inside = limits.x_min_um <= x_um <= limits.x_max_um and limits.y_min_um <= y_um <= limits.y_max_um
                if self.map_box_um is not None:  # the atlas frame may show more than the squares asked for
                    x_min, x_max, y_min, y_max = self.map_box_um
                    inside = inside and x_min <= x_um <= x_max and y_min <= y_um <= y_max
                if inside:
                    kept.append((candidate, float(x_um), float(y_um)))
            return kept

        sure = reachable(self.decision.crystal_clusters)
        places_left = len(sure) < targeting.max_targets
        # the object search is the slow part: mixed clusters are searched only when places are left
        mixed = reachable(self.decision.mixed_clusters) if self.decision.mixed_clusters and places_left else []
        sure, mixed = fill_target_places(sure, mixed, targeting.max_targets, targeting.min_spacing_um)
        here = self.microscope.get_stage()
        tiers = (sure, mixed)  # every sure target before any mixed one, each tier on a short path
        order = plan_tiered_path((here.x_um, here.y_um), [np.array([[x, y] for _, x, y in t]) for t in tiers])
        visits = [(tiers[tier][index], tier == 1) for tier, index in order]
        self.targets = [
            TargetRecord(
                target_id=f"T{rank + 1:03d}",
                order=rank,
                x_um=x_um,
                y_um=y_um,
                atlas_col_px=float(c.col_px),
                atlas_row_px=float(c.row_px),
                area_px=float(c.area_px),
                score=float(c.score),
                cluster_id=int(c.cluster_id),
                from_mixed_cluster=from_mixed,
            )
            for rank, ((c, x_um, y_um), from_mixed) in enumerate(visits)
        ]
        self._record("targets", targets=[t.model_dump(mode="json") for t in self.targets])
        written = outputs.write_atlas_outputs(self.session_dir, atlas, self.analysis, self.decision, self.targets)
        for kind, path in written.items():
            self._artifact(kind, path)
        self.events.publish("atlas", heatmap=str(written.get("heatmap", "")), targets=len(self.targets))
        self._write_tables()
        return self._advance()

    def _advance(self) -> str:
        """Pick the next unfinished target, or finish (no targets left, or the time budget is spent)."""
        self._work = {}
        budget = self.plan.time_budget_s
        for target in self.targets:
            if target.target_id in self.results:
                continue
            if budget is not None and self.microscope_time_s() >= budget:
                self._record("budget", message=f"time budget {budget:.0f} s spent; remaining targets skipped")
                self._current = None
                return "finish"
            self._current = target
            return "next_target"
        self._current = None
        return "finish"

    def _step_moving(self) -> str:
        assert self._current is not None
        approach_move(self.microscope, self._current.x_um, self._current.y_um, self.plan.targeting.approach_um)
        return "arrived"

    def _step_zooming(self) -> str:
        assert self._current is not None
        self.microscope.set_preset(self.plan.presets.search)
        frame = self.microscope.acquire(self.plan.exposures.search_s)
        self._work["search"] = frame
        path = write_frame_tiff(self._outpath("targets", f"{self._current.target_id}_search.tif"), frame)
        self._work.setdefault("images", {})["search"] = self._artifact(
            "search", path, target_id=self._current.target_id
        )
        return "zoomed"

    def _step_confirming(self) -> str:
        assert self._current is not None
        frame: Frame = self._work["search"]
        found = locate_near_centre(
            frame, self.calibration.matrix(self.plan.presets.search), self.plan, self._atlas_classes
        )
        if found is None:
            self._finish_target(
                "rejected",
                frame.metadata.stage.x_um,
                frame.metadata.stage.y_um,
                reason="nothing crystal-like near the expected position at the search preset",
            )
            return self._advance()
        x_um, y_um, confirm_score, round_outline = found
        if round_outline and self.plan.confirm.reject_round:
            self._finish_target("rejected", x_um, y_um, reason="a round object at the search preset (an ice ball)")
            return self._advance()
        offset_um = math.hypot(x_um - frame.metadata.stage.x_um, y_um - frame.metadata.stage.y_um)
        self._work.update(x_um=x_um, y_um=y_um, confirm_score=confirm_score, offset_um=offset_um)
        earlier = self._measured_near(x_um, y_um)
        if earlier is not None:
            # several atlas targets on one large object (pieces of a blob, two ends of a flake) all re-centre
            # onto it: measure it once
            self._finish_target(
                "rejected", x_um, y_um, reason=f"the same object as {earlier} (re-centred onto it at the search preset)"
            )
            return self._advance()
        if self.plan.confirm.recentre and offset_um > 0.05 * self.plan.confirm.radius_um:
            approach_move(self.microscope, x_um, y_um, self.plan.targeting.approach_um)
            centred = self.microscope.acquire(self.plan.exposures.search_s)
            path = write_frame_tiff(self._outpath("targets", f"{self._current.target_id}_centred.tif"), centred)
            self._work["images"]["centred"] = self._artifact("centred", path, target_id=self._current.target_id)
            self._work["search"] = centred
        return "confirmed"

    def _measured_near(self, x_um: float, y_um: float) -> str | None:
        """The id of a target already confirmed within `targeting.min_spacing_um` of (x, y) um, if any."""
        spacing_um = self.plan.targeting.min_spacing_um
        for result in self.results.values():
            if result.outcome in CONFIRMED_OUTCOMES and math.hypot(result.x_um - x_um, result.y_um - y_um) < spacing_um:
                return result.target_id
        return None

    def _step_diffraction(self) -> str:
        assert self._current is not None
        if not self.plan.confirm.diffraction:
            self._work["n_spots"], self._work["sbr"] = 0, 0.0
            return "diffracted"
        frame = self.microscope.acquire_diffraction(self.plan.exposures.diffraction_s)
        path = write_frame_tiff(self._outpath("targets", f"{self._current.target_id}_diffraction.tif"), frame)
        self._work["images"]["diffraction"] = self._artifact("diffraction", path, target_id=self._current.target_id)
        score = score_diffraction(frame.image)
        self._work["n_spots"], self._work["sbr"] = score.n_spots, score.signal_to_background
        self._work["diffraction_frame"] = frame
        return "diffracted"

    def _step_recording(self) -> str:
        assert self._current is not None
        work = self._work
        diffracting = not self.plan.confirm.diffraction or work["n_spots"] >= self.plan.confirm.min_spots
        thumbs = outputs.write_target_thumbnails(
            self.session_dir, self._current.target_id, work["search"], work.get("diffraction_frame")
        )
        for kind, path in thumbs.items():
            work["images"][kind] = self._artifact(kind, path, target_id=self._current.target_id)
        self._finish_target(
            "recorded" if diffracting else "no-diffraction",
            work["x_um"],
            work["y_um"],
            reason="" if diffracting else f"{work['n_spots']} spots < {self.plan.confirm.min_spots}",
        )
        return self._advance()

    def _finish_target(self, outcome: str, x_um: float, y_um: float, reason: str = "") -> None:
        assert self._current is not None
        work = self._work
        result = TargetResult(
            target_id=self._current.target_id,
            outcome=outcome,  # type: ignore[arg-type]
            x_um=float(x_um),
            y_um=float(y_um),
            recentre_offset_um=float(work.get("offset_um", 0.0)),
            confirm_score=float(work.get("confirm_score", 0.0)),
            n_spots=int(work.get("n_spots", 0)),
            signal_to_background=float(work.get("sbr", 0.0)),
            reason=reason,
            images=dict(work.get("images", {})),
            microscope_time_s=self.microscope_time_s(),
        )
        self.results[result.target_id] = result
        self._record("target", **result.model_dump(mode="json"))
        self.events.publish("target", **result.model_dump(mode="json"))
        self._write_tables()
        summary = self.write_summary()
        self.events.publish("progress", **summary.model_dump(mode="json"))

    def _step_recovering(self) -> str:
        state = self._failed_state or "calibrating"
        max_faults = self.plan.recovery.max_faults
        if self.faults > max_faults:
            self._record("recovery", action="give_up", reason=f"{self.faults} faults > {max_faults}")
            return "give_up"
        key = f"{state}:{self._current.target_id}" if state in TARGET_STATES and self._current else state
        self._retries[key] = self._retries.get(key, 0) + 1
        if state == "calibrating":
            self._calibration_attempt += 1
        if self._retries[key] <= self.plan.recovery.max_retries:
            if state in TARGET_STATES and state != "moving":
                state = "moving"  # a target step restarts from the move, so the images belong together
            self._resume_to = state
            self._record("recovery", action="retry", state=state, attempt=self._retries[key])
            return "retry"
        if state in TARGET_STATES and self._current is not None:
            here = self.microscope.get_stage() if state != "moving" else None
            x_um = here.x_um if here else self._current.x_um
            y_um = here.y_um if here else self._current.y_um
            self._finish_target("failed", x_um, y_um, reason=self._fault_reason)
            self._record("recovery", action="skip_target", target_id=self._current.target_id)
            return self._advance()
        self._record("recovery", action="give_up", reason=f"{state} failed {self._retries[key]} times")
        return "give_up"

    # ----------------------------------------------------------------------------------------------
    # Outputs and resume
    # ----------------------------------------------------------------------------------------------
    def _write_tables(self) -> None:
        outputs.write_target_tables(self.session_dir, self.targets, self.results, self.calibration, self.atlas)

    def summary(self) -> SessionSummary:
        """The session's numbers now."""
        confirmed = sum(1 for r in self.results.values() if r.confirmed)
        time_s = self.microscope_time_s()
        truth: dict[str, Any] = {}
        if self.truth_scorer is not None and self.map_box_um is not None:
            truth = self.truth_scorer(self.targets, self.results, self.map_box_um)
        return SessionSummary(
            session=self.session_id,
            state=self.state,
            specimen=self.plan.specimen,
            targets_found=len(self.targets),
            targets_visited=len(self.results),
            targets_confirmed=confirmed,
            targets_recorded=sum(1 for r in self.results.values() if r.outcome == "recorded"),
            prompts=self.prompts,
            microscope_time_s=round(time_s, 2),
            time_per_confirmed_s=round(time_s / confirmed, 2) if confirmed else None,
            confirmed_per_hour=round(3600.0 * confirmed / time_s, 2) if confirmed and time_s > 0 else None,
            faults=self.faults,
            wall_time_s=round(time.monotonic() - self._wall_start, 2),
            **truth,
        )

    def write_summary(self) -> SessionSummary:
        """Compute the summary and write `summary.json` atomically."""
        summary = self.summary()
        outputs.write_json(self.session_dir / "summary.json", summary.model_dump(mode="json"))
        return summary

    def _restore(self) -> None:
        """Rebuild progress from the journal and the files it names; set the state to continue from."""
        entries = self.journal.entries()
        last_time = max((e.get("microscope_time_s") or 0.0) for e in entries)
        self._clock_offset_s = float(last_time)
        self._clock_base_s = float(self.microscope.microscope_time_s())
        mapped = None
        targets_entry = None
        for entry in entries:
            kind = entry["type"]
            if kind == "mapping" and entry.get("event") == "done":
                mapped = entry
            elif kind == "prompt":
                self.prompts += 1
            elif kind == "fault":
                self.faults += 1
            elif kind == "labelling":
                self.decision = LabellingDecision(
                    crystal_clusters=tuple(entry["crystal_clusters"]),
                    mixed_clusters=tuple(entry.get("mixed_clusters", ())),
                    sources={int(k): v for k, v in entry.get("sources", {}).items()},
                    confidences={int(k): v for k, v in entry.get("confidences", {}).items()},
                    prompt_id=entry.get("prompt_id"),
                    answered_by=entry.get("answered_by"),
                    asked=bool(entry.get("asked")),
                    notes=list(entry.get("notes", [])),
                )
            elif kind == "targets":
                targets_entry = entry
            elif kind == "target":
                fields = {k: v for k, v in entry.items() if k in TargetResult.model_fields}
                result = TargetResult.model_validate(fields)
                self.results[result.target_id] = result
        if targets_entry is not None:
            self.targets = [TargetRecord.model_validate(t) for t in targets_entry["targets"]]
        if mapped is not None:
            self.atlas = Atlas.from_frame(read_frame_tiff(self.session_dir / mapped["path"]))
            self.map_box_um = tuple(mapped["box_um"])  # type: ignore[assignment]
        if (self.session_dir / "overview.tif").exists() and self.plan.presets.overview in self.calibration.presets:
            frame = read_frame_tiff(self.session_dir / "overview.tif")
            self.overview = frame_atlas(frame, self.calibration.matrix(self.plan.presets.overview))
        if self.atlas is not None and (self.decision is not None or targets_entry is not None):
            self.analysis = analyse(self.atlas.image, self.plan.locate)
        if targets_entry is not None:
            state = "moving" if self._advance() == "next_target" else "done"
        elif self.decision is not None:
            state = "targeting"
        elif self.atlas is not None:
            state = "locating"
        else:
            state = "calibrating"
        self._record(
            "session", event="resume", session=self.session_id, state=state, finished_targets=sorted(self.results)
        )
        self.machine.set_state(state)
        self._after_state_change()


def _field_box(
    matrix: np.ndarray, frame_shape: tuple[int, int], centre_xy_um: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The stage box of one field of view centred at `centre_xy_um` (slightly smaller than the frame)."""
    half = 0.45 * np.abs(matrix) @ np.array([frame_shape[1], frame_shape[0]], dtype=np.float64)
    return (centre_xy_um[0] - half[0], centre_xy_um[0] + half[0], centre_xy_um[1] - half[1], centre_xy_um[1] + half[1])


def square_corners(
    atlas: Atlas, bar_mask: np.ndarray, near_xy_um: tuple[float, float], max_corners: int = 8
) -> list[tuple[float, float]]:
    """Stage positions of grid-square corners, nearest `near_xy_um` first (empty if no mesh is seen).

    Bar crossings are the bar pixels farthest from open film (local maxima of the distance transform
    inside the bars); the film pixel nearest a crossing is a square's corner. Only the inner half of
    the image around `near_xy_um` is searched, which keeps off the grid rim.
    """
    mask = np.asarray(bar_mask, dtype=bool)
    rows, cols = mask.shape
    origin = atlas.stage_to_pixel(np.asarray(near_xy_um, dtype=np.float64))
    yy, xx = np.mgrid[:rows, :cols]
    inside = np.hypot(xx - origin[0], yy - origin[1]) < min(rows, cols) / 2
    if not inside.any() or not 0.02 < mask[inside].mean() < 0.95:
        return []
    distance, nearest = ndimage.distance_transform_edt(mask, return_indices=True)
    ridge = (distance == ndimage.maximum_filter(distance, size=3)) & (distance > 1) & inside
    if not np.any(ridge):
        return []
    # Mid-bar ridge points are w/2 from film, crossings w/2 * sqrt(2); the region outside the grid (also
    # "bar") is much farther. The median ridge value is the mesh's w/2.
    half_width = float(np.median(distance[ridge]))
    band = (distance >= 1.2 * half_width) & (distance <= 1.7 * half_width) & inside
    size = max(3, int(2 * half_width) | 1)
    peaks = band & (distance == ndimage.maximum_filter(np.where(band, distance, 0.0), size=size))
    if not np.any(peaks):
        return []
    peak_rows, peak_cols = np.nonzero(peaks)
    order = np.argsort(np.hypot(peak_cols - origin[0], peak_rows - origin[1]))[:max_corners]
    corner_rc = nearest[:, peak_rows[order], peak_cols[order]]
    xy = atlas.pixel_to_stage_um(np.column_stack([corner_rc[1], corner_rc[0]]).astype(np.float64))
    return [(float(x), float(y)) for x, y in xy]


def locate_near_centre(
    frame: Frame,
    matrix_um_per_px: np.ndarray,
    plan: ScreeningPlan,
    atlas_classes: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float, float, bool] | None:
    """Find the object nearest the centre of a search frame within `confirm.radius_um` (see
    `agent.confirm`); returns its stage position (x_um, y_um), contrast in film-noise sigmas and whether its
    outline is round (an ice ball), or None.

    `atlas_classes(stage_xy_um (n, 2)) -> (n,)` says what the atlas saw at stage points (BAR, FILM,
    OTHER, OFF_ATLAS): bar pixels can never be the target, and film pixels set the film level even when
    objects cover most of the frame's border.
    """
    image = np.asarray(frame.image)
    stage_xy = (frame.metadata.stage.x_um, frame.metadata.stage.y_um)
    pixel_um = float(math.sqrt(abs(np.linalg.det(matrix_um_per_px))))
    exclude = film = None
    if atlas_classes is not None:
        step = max(1, min(image.shape) // 128)
        rows = np.arange(0, image.shape[0], step)
        cols = np.arange(0, image.shape[1], step)
        grid_cols, grid_rows = np.meshgrid(cols, rows)
        points = np.column_stack([grid_cols.ravel(), grid_rows.ravel()]).astype(np.float64)
        stage_points = pixel_to_stage_um(points, image.shape, stage_xy, matrix_um_per_px)
        coarse = atlas_classes(stage_points).reshape(grid_rows.shape)
        full = np.repeat(np.repeat(coarse, step, axis=0), step, axis=1)[: image.shape[0], : image.shape[1]]
        exclude = full == BAR
        # Atlas cells are coarse: keep only film well inside film areas (away from any object).
        film = ndimage.binary_erosion(full == FILM, iterations=max(1, 4 * step))
    found = find_object_near_centre(
        image,
        radius_px=plan.confirm.radius_um / pixel_um,
        min_contrast_sigma=plan.confirm.min_contrast_sigma,
        exclude_mask=exclude,
        film_mask=film,
        min_area_px=math.pi / 4 * (plan.confirm.min_size_um / pixel_um) ** 2,
    )
    if found is None:
        return None
    xy = pixel_to_stage_um(np.array([found.col_px, found.row_px]), image.shape, stage_xy, matrix_um_per_px)
    return float(xy[0]), float(xy[1]), found.contrast_sigma, found.round_outline
