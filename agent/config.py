"""Screening plans: frozen pydantic models, loadable from TOML, YAML or JSON, saved with each session.

A plan says what to map, how to locate, how many targets to visit and what to do when nobody answers.
Every field has a default that works on the simulator and is a sensible start on an instrument; a plan
file only needs the fields it changes, e.g. (TOML):

    specimen = "protein-plates"
    time_budget_s = 1800
    [area]
    squares_per_round = 4
    [operator]
    fallback = "label-memory"

By default a session is sized by its microscope-time budget (one hour): it maps grid squares a block at a
time (`area.squares_per_round`), visits that block's targets, and maps the next block while budget is left.
`area.squares` (map exactly that many squares, once) and `targeting.max_targets` (a cap on the targets of
the whole session) are optional.

Lengths in micrometres, times in seconds (exposures and budgets are microscope time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.alerts.plan import AlertPlan
from agent.locate.analysis import LocateSettings
from drivers.formats.images import write_atomic

PLAN_NAME = "plan.json"

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def user_data_dir(kind: str, env_var: str) -> Path:
    """The per-user folder of one kind of data (`labels`, `calibrations`): `$<env_var>` if set, else
    `$XDG_DATA_HOME/crystal-locator/<kind>`, else `~/.local/share/crystal-locator/<kind>`. Not created here."""
    override = os.environ.get(env_var)
    if override:
        return Path(override).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME")
    base = Path(data_home).expanduser() if data_home else Path.home() / ".local" / "share"
    return base / "crystal-locator" / kind


class PlanError(ValueError):
    """A plan file could not be read or does not validate; the message names the file and the field."""


class PresetNames(BaseModel):
    """Which optics preset each stage of the loop uses (names as the microscope knows them)."""

    model_config = _FROZEN

    overview: str = "overview"
    atlas: str = "atlas"
    search: str = "search"


class ExposurePlan(BaseModel):
    """Exposure times per step, seconds."""

    model_config = _FROZEN

    overview_s: float = Field(default=0.5, gt=0)
    calibration_s: float = Field(default=0.5, gt=0)
    atlas_s: float = Field(default=0.5, gt=0)
    search_s: float = Field(default=0.5, gt=0)
    diffraction_s: float = Field(default=1.0, gt=0)


class SerialemMapPlan(BaseModel):
    """A SerialEM grid map used as the atlas instead of mapping (`agent.steps.serialem_map`): the montage's
    `.mdoc` (its `.mrc` stack beside it), the navigator holding its map item, and that item's `MapID`. Paths are
    absolute, so that `--resume` finds the same files wherever it runs from."""

    model_config = _FROZEN

    mdoc_path: str = Field(min_length=1, description="the montage's .mrc.mdoc (absolute path)")
    nav_path: str = Field(min_length=1, description="the SerialEM navigator (.nav) with the map item (absolute path)")
    map_id: int = Field(description="MapID of the montage's map item in the navigator")


class AreaPlan(BaseModel):
    """What to map at the atlas preset.

    Either `box_um = (x_min, x_max, y_min, y_max)` (mapped once), or grid squares chosen from the overview:
    `squares` typical squares in one block nearest the stage centre (mapped once), or, with `squares` unset
    (the default), blocks of `squares_per_round` typical squares, one round after the other, each next to the
    last, for as long as the time budget lasts (one block when the plan has no budget).
    """

    model_config = _FROZEN

    squares: int | None = Field(
        default=None, ge=1, le=64, description="map exactly this many squares, once (default: sized by the budget)"
    )
    squares_per_round: int = Field(
        default=4, ge=1, le=64, description="squares mapped per round when the budget sizes the session"
    )
    box_um: tuple[float, float, float, float] | None = None
    overlap_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    margin_um: float = Field(default=5.0, ge=0.0)
    overview: bool = Field(default=True, description="take a whole-grid overview first to choose squares")
    serialem_map: SerialemMapPlan | None = Field(
        default=None,
        description="use this SerialEM grid map as the atlas: no overview, no mapping, one round (see SerialemMapPlan)",
    )

    @model_validator(mode="after")
    def _box_ordered(self) -> AreaPlan:
        if self.box_um is not None:
            x_min, x_max, y_min, y_max = self.box_um
            if not (x_min < x_max and y_min < y_max):
                raise ValueError("box_um must be (x_min, x_max, y_min, y_max) with min < max")
        if self.serialem_map is not None and (self.box_um is not None or self.squares is not None):
            raise ValueError("serialem_map is the area to screen: leave out box_um and squares")
        return self


class TargetingPlan(BaseModel):
    """Which candidates become targets and how the stage gets there."""

    model_config = _FROZEN

    max_targets: int | None = Field(
        default=None, ge=1, le=10000, description="cap on the targets of a whole session (default: the budget decides)"
    )
    min_spacing_um: float = Field(default=4.0, ge=0.0)
    min_bar_distance_um: float = Field(default=4.0, ge=0.0)
    approach_um: float = Field(default=5.0, ge=0.0, description="backlash take-up: always arrive from -x/-y")
    visit_limit: int | None = Field(
        default=None,
        ge=0,
        description=(
            "visit at most this many targets (the best ranked), then stop; 0: an atlas-only pass (map, locate, "
            "label, plan the targets); None: as many as the budget allows"
        ),
    )


class ConfirmPlan(BaseModel):
    """How a target is confirmed at the search preset and checked in diffraction."""

    model_config = _FROZEN

    radius_um: float = Field(default=5.0, gt=0, description="how far from the expected position it may be")
    recentre: bool = True
    image_shift: bool = Field(
        default=True,
        description=(
            "where the microscope has image shift: re-centre on the object by image shift instead of the stage, "
            "and reach later targets inside the same search image by image shift (no move, no new image)"
        ),
    )
    diffraction: bool = True
    min_spots: int = Field(default=4, ge=1, description="Bragg spots needed to call a target diffracting")
    min_size_um: float = Field(
        default=0.5, gt=0, description="smallest object that counts at search (film texture is smaller)"
    )
    min_contrast_sigma: float = Field(
        default=3.0, gt=0, description="object vs surrounding film contrast, in units of the film's noise"
    )
    reject_round: bool = Field(
        default=True,
        description="reject a target whose object nearest the centre has a round outline (an ice ball) at search",
    )
    direct_snapshot: bool = Field(
        default=True,
        description=(
            "snap a target at its atlas position with no search image when its object is wider than the beam plus "
            "the session's measured position error (agent.steps.direct)"
        ),
    )
    direct_after_measured: int = Field(
        default=8,
        ge=3,
        description=(
            "diffracting targets re-centred on search images before direct snapshots start (their offsets give the "
            "position error; with 8 the median is known to about a third of itself)"
        ),
    )
    beam_diameter_um: float = Field(
        default=3.0,
        gt=0,
        description=(
            "diameter of the diffraction beam (or selected area) at the specimen, um; decides which objects are "
            "wide enough for a direct snapshot. Set your instrument's; the default 3 um is a guess at the large end "
            "of MicroED beams (no published figure), so that an unset value errs towards a search image"
        ),
    )


class OperatorPlan(BaseModel):
    """When to ask the operator which clusters hold crystals, and what to do without an answer."""

    model_config = _FROZEN

    ask: bool = True
    min_confidence: float = Field(default=0.8, ge=0.0, le=1.0, description="label-memory confidence to skip asking")
    wait_s: float = Field(default=30.0, ge=0.0, description="real seconds the loop waits for an answer")
    deadline_s: float = Field(default=600.0, gt=0.0, description="real seconds a prompt stays open")
    fallback: Literal["label-memory", "default-rule", "reference", "skip"] = "label-memory"
    mixed: Literal["last", "ask", "skip"] = Field(
        default="last",
        description=(
            "clusters that earlier operators answered both ways (label memory's 'mixed'): 'last' = no prompt "
            "of their own (they join a prompt asked anyway), their targets fill the places the crystal "
            "clusters leave and are visited after them; 'ask' = asked like any unsure cluster (and left to "
            "the fallback); 'skip' = no prompt of their own, no targets. Applies whatever the fallback is"
        ),
    )
    reference_cells: tuple[tuple[int, int], ...] = Field(
        default=(), description="(row, col) cells of the atlas grid that show crystals, for fallback 'reference'"
    )


class RecoveryPlan(BaseModel):
    """Fault handling: retries per step and faults per session before giving up."""

    model_config = _FROZEN

    max_retries: int = Field(default=2, ge=0)
    max_faults: int = Field(default=20, ge=0)


class ScreeningPlan(BaseModel):
    """Everything a screening session needs to know; frozen, validated, saved as `plan.json`."""

    model_config = _FROZEN

    name: str = "screening"
    specimen: str | None = Field(default=None, description="specimen type, used to match label memory")
    seed: int = 0
    presets: PresetNames = PresetNames()
    exposures: ExposurePlan = ExposurePlan()
    area: AreaPlan = AreaPlan()
    locate: LocateSettings = Field(
        default_factory=LocateSettings,
        description="locator settings for the atlas: the locator's defaults, the same as `locate` and `evaluate` use",
    )
    targeting: TargetingPlan = TargetingPlan()
    confirm: ConfirmPlan = Field(default_factory=ConfirmPlan)
    operator: OperatorPlan = OperatorPlan()
    recovery: RecoveryPlan = RecoveryPlan()
    time_budget_s: float | None = Field(
        default=3600.0,
        gt=0,
        description=(
            "microscope seconds the session may use: it sizes the session (rounds of squares, targets ranked by "
            "score when not all fit) and no target is started after it; None: no budget (one round)"
        ),
    )
    alerts: AlertPlan = Field(
        default_factory=AlertPlan, description="webhook / e-mail alerts (agent.alerts.plan); off by default"
    )

    @model_validator(mode="after")
    def _budget_covers_one_target(self) -> ScreeningPlan:
        if self.time_budget_s is not None:
            exposures = self.exposures
            least_s = exposures.atlas_s + exposures.search_s + exposures.diffraction_s
            least_s += exposures.overview_s if self.area.overview and self.area.box_um is None else 0.0
            if self.time_budget_s < least_s:
                raise ValueError(
                    f"time_budget_s {self.time_budget_s:g} s is less than the exposures alone of one atlas frame, one "
                    f"search image and one diffraction snapshot ({least_s:g} s): no target could be reached"
                )
        return self

    @property
    def sized_by_budget(self) -> bool:
        """True when the session maps squares in rounds while its budget lasts (see `AreaPlan`)."""
        return self.time_budget_s is not None and self.area.squares is None and self.area.box_um is None

    def squares_per_block(self) -> int:
        """Squares in one mapped block: `area.squares` if set, else `area.squares_per_round`."""
        return self.area.squares if self.area.squares is not None else self.area.squares_per_round

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON, atomically."""
        return write_atomic(path, self.model_dump_json(indent=2).encode())


def load_plan(path: str | os.PathLike[str]) -> ScreeningPlan:
    """Read a plan from `.toml`, `.yaml`/`.yml` or `.json`; raises `PlanError` naming the problem."""
    plan_path = Path(path)
    try:
        text = plan_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"{plan_path}: not a text file; a plan is .toml, .yaml or .json text") from None
    except OSError as exc:
        raise PlanError(f"{plan_path}: cannot read plan ({exc.strerror or exc})") from exc
    suffix = plan_path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError as exc:
                raise PlanError(f"{plan_path}: YAML plans need PyYAML: pip install 'crystal-locator[yaml]'") from exc
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise PlanError(f"{plan_path}: plan must be .toml, .yaml or .json")
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(f"{plan_path}: cannot parse plan ({exc})") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{plan_path}: a plan is a table of settings, got {type(data).__name__}")
    try:
        return ScreeningPlan.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
        raise PlanError(f"{plan_path}: invalid plan: {problems}") from exc
