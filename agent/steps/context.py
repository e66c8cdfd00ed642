"""The typed context the screening steps read, and the output port through which they report.

`SessionContext` holds what one session knows, in the order the steps build it: plan and microscope,
calibration, overview and atlas, the cluster analysis, the labelling decision, the targets and their
outcomes, and `visit`, what the steps of the target being visited found so far. The session applies each
step's typed result to it; no step keeps state of its own between calls.

Steps know no files and no journal: they send records (`agent.session.records`) and frames to
`StepOutput`, and the session's subscribers (journal, event publisher, file writers) do the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from agent.config import ScreeningPlan
from agent.session.outcomes import TargetRecord, TargetResult
from agent.session.records import Record
from agent.steps.atlas import Atlas
from agent.steps.stage_calibration import CalibrationSet
from drivers.base import Frame, Microscope, MicroscopeInfo, image_shift_limit_um


class StepOutput(Protocol):
    """Where steps send what they produce; the session routes it to its subscribers, in order."""

    def record(self, record: Record) -> None:
        """Journal and publish one record before the step goes on."""

    def save_frame(self, kind: str, relative_path: str, frame: Frame, target_id: str | None = None) -> str:
        """Have `frame` written (TIFF with its metadata) at `relative_path`; returns that path once written
        and journalled."""

    def save_target_previews(self, target_id: str, search: Frame | None, diffraction: Frame | None) -> dict[str, str]:
        """Have a target's PNG previews written; returns kind -> relative path."""

    def save_atlas_outputs(
        self, atlas: Atlas, analysis: Any, decision: Any, targets: list[TargetRecord], folder: str = "atlas"
    ) -> None:
        """Have the atlas' heat map, masks, gallery and cluster table written in `folder` (relative to the
        session folder) and announced."""


@dataclass(frozen=True)
class SearchField:
    """The search image the stage still sits on (`frame`, saved at `path`): a later target inside it is
    confirmed on this image and reached by image shift, with no stage move and no new search image."""

    frame: Frame
    path: str


@dataclass
class VisitState:
    """What the steps of one target visit found so far (search frame, re-centred position, diffraction)."""

    target: TargetRecord
    search: Frame | None = None
    diffraction: Frame | None = None
    images: dict[str, str] = field(default_factory=dict)
    #: True when the target lies in the search field of an earlier target (no move, no new search image).
    in_field: bool = False
    #: True when the stage was put at the centre of a new field for this target and its neighbours
    #: (`agent.steps.visit.field_point`), not on the target: it is found and reached like an in-field one.
    off_centre: bool = False
    #: True when the target is snapped at its atlas position with no search image (`agent.steps.direct`).
    direct: bool = False
    #: The id of a target already snapped on the same atlas object (`agent.steps.visit.same_object_as`): this one
    #: is rejected without a move or an image.
    same_as: str | None = None
    x_um: float | None = None
    y_um: float | None = None
    confirm_score: float = 0.0
    offset_um: float = 0.0
    n_spots: int = 0
    signal_to_background: float = 0.0


@dataclass
class SessionContext:
    """Everything the steps of one session read (see the module docstring)."""

    plan: ScreeningPlan
    microscope: Microscope
    info: MicroscopeInfo
    session_id: str
    output: StepOutput
    clock_s: Callable[[], float]
    calibration: CalibrationSet
    labels: Any | None = None
    #: The instrument's stored calibration (`agent.steps.calibration_store`): each preset in it is checked with
    #: one test move instead of measured. None: every preset is measured.
    stored_calibration: CalibrationSet | None = None
    #: True: measure every preset even if stored (`--recalibrate`).
    recalibrate: bool = False
    operator: Any | None = None
    calibration_attempt: int = 0
    overview: Atlas | None = None
    overview_bar_mask: np.ndarray | None = None
    atlas: Atlas | None = None
    map_box_um: tuple[float, float, float, float] | None = None
    #: Rounds of mapping so far (the current atlas is round `rounds`) and the stage box of each, in order (the
    #: last is `map_box_um`).
    rounds: int = 0
    map_boxes_um: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: Microscope seconds the last round's montage took (from its `mapping` records): what another round costs.
    last_mapping_s: float = 0.0
    analysis: Any | None = None
    #: The atlas as the analysis prepared it (float64), kept from locating to targeting only (then None).
    atlas_prepared: np.ndarray | None = None
    decision: Any | None = None
    targets: list[TargetRecord] = field(default_factory=list)
    results: dict[str, TargetResult] = field(default_factory=dict)
    prompts: int = 0
    visit: VisitState | None = None
    #: The search image the stage sits on now, while targets can be reached in it by image shift.
    field: SearchField | None = None
    #: When the session started (UTC; from its journal on resume): the label-memory records it wrote since are
    #: its own (`agent.steps.learn`).
    started_utc: datetime | None = None
    #: What the session learnt so far (`agent.steps.learn.SessionLearning`), created at the first targeting.
    learning: Any | None = None

    def image_shift_limit_um(self) -> float:
        """How far (um per axis) the steps may use image shift: the microscope's limit, 0 when it has none
        or the plan turns it off (`confirm.image_shift`)."""
        if not self.plan.confirm.image_shift:
            return 0.0
        return image_shift_limit_um(self.microscope, self.info)

    def frame_shape(self, preset: str) -> tuple[int, int]:
        """(rows, cols) of a frame taken with `preset` (the camera binned by the preset)."""
        binning = self.info.preset(preset).binning
        return (self.info.camera_shape_px[0] // binning, self.info.camera_shape_px[1] // binning)

    def require_visit(self) -> VisitState:
        """The target being visited; a step of the visit called without one is a bug of the session."""
        if self.visit is None:
            raise RuntimeError("no target is being visited")
        return self.visit
