"""A simulated autoloader cassette: 12 slots of grids, loaded onto the stage in minutes, each load placing the grid
at a rotation and shift of its own.

- `SlotSpec` / `CassetteSpec` (pydantic) describe the cassette: per slot a grid (specimen type, specimen seed,
  `simulator.specimen.SpecimenOptions` for its quality: crystal count, film thickness, broken / empty squares,
  ice, conditions) or nothing; a slot may be set to fail to load (`fails_to_load`, for bad-input tests).
  `load_cassette_spec(path)` reads one from JSON: a list of slots, or an object with `slots` and the other
  fields. `default_cassette(seed)` is a varied 12-slot cassette (`DEFAULT_SLOTS`: four specimen types, good,
  sparse, broken and thick-ice grids, two empty slots) shuffled and seeded by `seed`.
- `SimulatedCassetteMicroscope` is a `SimulatedMicroscope` with the `drivers.base.CassetteMicroscope`
  capability. `load_grid(slot)` costs `unload_s` (the grid on the stage goes back to its slot) plus `load_s` on
  the microscope clock, generates the slot's specimen and places it by `grid_placement(cassette seed, slot,
  load number)`: a rotation within +-`MAX_ROTATION_DEG` and a shift within `MAX_SHIFT_UM` of the stage origin,
  different after every (re)load, reproducible from the seed, the slot and how many times it was loaded. The
  stage comes back at the origin. Ground truth (`ground_truth`, a `simulator.placement.PlacedSpecimen`) follows
  the loaded grid in stage um; the camera calibration (the instrument's optics errors) does not change.
  A simulator restarted for a resumed run gets `loaded_slot` and `load_counts` (from `load_counts()` of the
  first) and shows the same grid at the same place.

Figures (no published ones were found for them: guesses, change them in `CassetteSpec`): a Thermo Fisher style
autoloader exchange of ~3 minutes, `DEFAULT_UNLOAD_S` 60 s + `DEFAULT_LOAD_S` 120 s; a reload placement within
+-6 deg and 80 um.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from drivers.base import CassetteSlot, GridLoadError, InvalidParameterError, MicroscopeInfo, StagePosition, check_slot
from simulator.microscope import SimulatedMicroscope
from simulator.placement import EmptyStage, GridPlacement, PlacedScene, PlacedSpecimen
from simulator.specimen import SPECIMEN_TYPES, Specimen, SpecimenOptions, generate_specimen
from simulator.stage import SimulatedStage

#: Slots of a Thermo Fisher autoloader cassette.
DEFAULT_SLOT_COUNT = 12
#: Time to put a grid from the cassette on the stage, s. A guess (no published figure found): "a few minutes".
DEFAULT_LOAD_S = 120.0
#: Time to put the grid on the stage back into its slot, s. A guess, as `DEFAULT_LOAD_S`.
DEFAULT_UNLOAD_S = 60.0
#: Largest rotation of a loaded grid, deg (uniform in +-). A guess: cartridges seat a few degrees differently.
MAX_ROTATION_DEG = 6.0
#: Largest shift of a loaded grid's centre from the stage origin, um (uniform in a disc). A guess.
MAX_SHIFT_UM = 80.0

#: Specimen options of the grid qualities of `default_cassette`.
QUALITIES: dict[str, dict[str, Any]] = {
    "good": {},
    "sparse": {"crystal_count": 60},
    "broken": {"broken_fraction": 0.35, "empty_fraction": 0.25},
    # thick ice as a 4x thicker layer on the film and 6x the ice balls; not `ice_gradient_fraction`, which makes
    # every atlas frame ~2.5x slower to render (0.57 -> 1.41 s at 2048 px, measured)
    "thick-ice": {"film_thickness_nm": 80.0, "ice_ball_count": 2500},
}
#: (specimen type, quality) of the 12 slots of `default_cassette` before shuffling; None: an empty slot.
DEFAULT_SLOTS: tuple[tuple[str, str] | None, ...] = (
    ("protein-plates", "good"), ("protein-plates", "sparse"), ("protein-plates", "broken"),
    ("protein-plates", "thick-ice"), ("graphite-flakes", "good"), ("graphite-flakes", "thick-ice"),
    ("asbestos-fibres", "good"), ("asbestos-fibres", "sparse"), ("polymer-faint", "good"),
    ("polymer-faint", "broken"), None, None,
)


class CassetteSpecError(InvalidParameterError):
    """A cassette description is invalid or its file cannot be read."""


class SlotSpec(BaseModel):
    """One slot: a grid (`specimen_type`, `seed`, `options`: `SpecimenOptions` fields) or, without a
    specimen type, an empty slot. `fails_to_load`: every transfer of this grid fails (a fault, for tests)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slot: StrictInt = Field(ge=1)
    specimen_type: str | None = None
    seed: StrictInt = Field(default=0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)
    label: str = Field(default="", max_length=200)
    fails_to_load: bool = False

    @field_validator("specimen_type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is not None and value not in SPECIMEN_TYPES:
            raise ValueError(f"unknown specimen type {value!r}; choose one of: {', '.join(SPECIMEN_TYPES)}")
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> SlotSpec:
        if self.specimen_type is None and (self.options or self.fails_to_load):
            raise ValueError(f"slot {self.slot} is empty (no specimen_type): it takes no options and cannot fail")
        try:
            SpecimenOptions(**self.options)
        except (ValidationError, TypeError) as exc:
            raise ValueError(f"slot {self.slot}: invalid specimen options: {exc}") from None
        return self

    @property
    def empty(self) -> bool:
        """True when the slot holds no grid."""
        return self.specimen_type is None


class CassetteSpec(BaseModel):
    """A cassette: `slot_count` slots (slots not listed in `slots` are empty), the seed of the grids'
    placements after each load, and the exchange times (s)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slots: tuple[SlotSpec, ...] = ()
    slot_count: StrictInt = Field(default=DEFAULT_SLOT_COUNT, ge=1, le=64)
    seed: StrictInt = Field(default=0, ge=0)
    load_s: float = Field(default=DEFAULT_LOAD_S, ge=0.0, le=3600.0)
    unload_s: float = Field(default=DEFAULT_UNLOAD_S, ge=0.0, le=3600.0)

    @model_validator(mode="after")
    def _slots_fit(self) -> CassetteSpec:
        numbers = [s.slot for s in self.slots]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"a slot is listed twice: {sorted(numbers)}")
        outside = [n for n in numbers if n > self.slot_count]
        if outside:
            raise ValueError(f"slots {outside} do not exist in a cassette of {self.slot_count} slots")
        return self

    def slot(self, number: int) -> SlotSpec:
        """The spec of slot `number` (an empty `SlotSpec` if it is not listed)."""
        for spec in self.slots:
            if spec.slot == number:
                return spec
        return SlotSpec(slot=number)

    def to_json(self) -> str:
        """The cassette as JSON (what `load_cassette_spec` reads back)."""
        return self.model_dump_json(indent=2)


def load_cassette_spec(path: str | os.PathLike[str]) -> CassetteSpec:
    """Read a cassette from a JSON file: a list of slots, or an object with `slots` (and `slot_count`, `seed`,
    `load_s`, `unload_s`). `CassetteSpecError` naming the file for a missing file, bad JSON or bad fields."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CassetteSpecError(f"cannot read the cassette file {path}: {exc}") from None
    return cassette_spec_from(raw, where=str(path))


def cassette_spec_from(raw: Any, where: str = "cassette") -> CassetteSpec:
    """A `CassetteSpec` from parsed JSON (a list of slots or an object); `CassetteSpecError` if invalid."""
    try:
        if isinstance(raw, list):
            return CassetteSpec(slots=tuple(SlotSpec.model_validate(s) for s in raw))
        if isinstance(raw, dict):
            return CassetteSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '-'}: {e['msg']}" for e in exc.errors()[:5])
        raise CassetteSpecError(f"invalid cassette in {where}: {problems}") from None
    raise CassetteSpecError(f"a cassette in {where} is a JSON list of slots or an object, got {type(raw).__name__}")


def default_cassette(seed: int = 0) -> CassetteSpec:
    """A varied 12-slot cassette: `DEFAULT_SLOTS` (four specimen types; good, sparse, broken, thick-ice grids;
    two empty slots) in an order and with specimen seeds drawn from `seed`, which also seeds the placements."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CassetteSpecError(f"the cassette seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([int(seed), 89])
    order = rng.permutation(len(DEFAULT_SLOTS))
    specimen_seeds = rng.integers(0, 2**31 - 1, size=len(DEFAULT_SLOTS))
    slots = []
    for index, template in enumerate(order):
        entry = DEFAULT_SLOTS[int(template)]
        if entry is None:
            continue
        kind, quality = entry
        slots.append(SlotSpec(slot=index + 1, specimen_type=kind, seed=int(specimen_seeds[index]),
                              options=dict(QUALITIES[quality]), label=f"{kind} {quality}"))
    return CassetteSpec(slots=tuple(slots), seed=int(seed))


def grid_placement(cassette_seed: int, slot: int, load_number: int) -> GridPlacement:
    """Where load number `load_number` (1, 2, ...) of `slot` puts the grid: a rotation in +-`MAX_ROTATION_DEG`
    and a centre uniform in a disc of `MAX_SHIFT_UM` around the stage origin, drawn from the three numbers."""
    rng = np.random.default_rng([int(cassette_seed), int(slot), int(load_number), 83])
    rotation = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    radius = MAX_SHIFT_UM * float(np.sqrt(rng.uniform()))
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    return GridPlacement(rotation, (radius * float(np.cos(angle)), radius * float(np.sin(angle))))


def slot_specimen(spec: SlotSpec, extra_options: Mapping[str, Any] | None = None) -> Specimen:
    """The specimen of an occupied slot in its own frame; `extra_options` (e.g. a condition set's) are added
    under the slot's own options."""
    if spec.specimen_type is None:
        raise GridLoadError(f"cassette slot {spec.slot} is empty")
    return generate_specimen(spec.specimen_type, spec.seed, **{**(extra_options or {}), **spec.options})


class SimulatedCassetteMicroscope(SimulatedMicroscope):
    """A `SimulatedMicroscope` with an autoloader cassette (`drivers.base.CassetteMicroscope`; module doc).

    `cassette` describes the slots; `loaded_slot` the slot whose grid is on the stage at the start (None:
    none) and `load_counts` how many times each slot was loaded before (the loaded slot's grid lies where its
    last load put it); `specimen_options` are added to every grid's options. Other keyword arguments go to
    `SimulatedMicroscope`."""

    def __init__(
        self,
        cassette: CassetteSpec,
        *,
        loaded_slot: int | None = None,
        load_counts: Mapping[int, int] | None = None,
        specimen_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(cassette, CassetteSpec):
            raise CassetteSpecError(f"cassette must be a CassetteSpec, got {type(cassette).__name__}")
        self._cassette = cassette
        self._extra_options = dict(specimen_options or {})
        self._counts = _checked_counts(load_counts, cassette.slot_count)
        self._loaded: int | None = None
        self._failed: set[int] = set()
        self._truth: PlacedSpecimen | None = None
        self._load_lock = threading.Lock()
        scene: Any = EmptyStage()
        if loaded_slot is not None:
            slot = check_slot(loaded_slot, cassette.slot_count)
            self._counts[slot] = max(1, self._counts.get(slot, 0))
            self._truth = self._place(slot, slot_specimen(cassette.slot(slot), self._extra_options))
            scene, self._loaded = PlacedScene(self._truth.grid, self._truth.placement), slot
        super().__init__(scene, **kwargs)

    # ground truth (tests, evaluation, the simulated operator only) ---------------------------------
    @property
    def ground_truth(self) -> Specimen | None:
        """The loaded grid as it lies on the stage (stage um), None with no grid on the stage."""
        return self._truth

    @property
    def cassette(self) -> CassetteSpec:
        """The cassette's description."""
        return self._cassette

    def grid_placement(self) -> GridPlacement | None:
        """How the loaded grid lies on the stage (None without one). For tests only."""
        truth = self._truth
        return None if truth is None else truth.placement

    def load_counts(self) -> dict[int, int]:
        """How many times each slot was loaded (successfully), by slot: what a resumed simulator needs."""
        with self._lock:
            return dict(self._counts)

    # Microscope + CassetteMicroscope -------------------------------------------------------------
    def info(self) -> MicroscopeInfo:
        """`SimulatedMicroscope.info` with `cassette_slots`."""
        return super().info().model_copy(update={"cassette_slots": self._cassette.slot_count})

    def cassette_slots(self) -> tuple[CassetteSlot, ...]:
        """Every slot, in order: `loaded`, `occupied`, `empty`, or `unknown` after a failed transfer."""
        with self._lock:
            loaded, failed = self._loaded, set(self._failed)
        slots = []
        for number in range(1, self._cassette.slot_count + 1):
            spec = self._cassette.slot(number)
            state = ("empty" if spec.empty else "loaded" if number == loaded
                     else "unknown" if number in failed else "occupied")
            slots.append(CassetteSlot(slot=number, state=state, label=spec.label))  # type: ignore[arg-type]
        return tuple(slots)

    def loaded_slot(self) -> int | None:
        """The slot whose grid is on the stage, None when there is none."""
        with self._lock:
            return self._loaded

    def load_grid(self, slot: int) -> None:
        """Put the grid of `slot` on the stage: `unload_s` (if a grid is on the stage) + `load_s` on the clock.

        Loading the slot already loaded does nothing. `InvalidParameterError` for a slot that does not exist;
        `GridLoadError` for an empty slot (nothing moves, the grid on the stage stays) or a grid that fails to
        load (after the exchange time the stage holds no grid; the slot then reads `unknown`)."""
        slot = check_slot(slot, self._cassette.slot_count)
        spec = self._cassette.slot(slot)
        with self._load_lock:
            if self.loaded_slot() == slot:
                return
            if spec.empty:
                self._clock.advance(self._timing.command_overhead_s)
                raise GridLoadError(f"cassette slot {slot} is empty (by the last inventory); choose another slot")
            grid = None if spec.fails_to_load else slot_specimen(spec, self._extra_options)
            if self.loaded_slot() is not None:
                self._swap(None, None)
                self._clock.advance(self._cassette.unload_s)
            if grid is None:
                self._clock.advance(self._cassette.load_s / 2.0)
                with self._lock:
                    self._failed.add(slot)
                raise GridLoadError(f"the transfer of the grid in cassette slot {slot} failed (simulated fault); "
                                    "the stage holds no grid. Skip the slot and load another.")
            self._clock.advance(self._cassette.load_s)
            with self._lock:
                self._counts[slot] = self._counts.get(slot, 0) + 1
                self._failed.discard(slot)
            self._swap(slot, self._place(slot, grid))

    def _place(self, slot: int, grid: Specimen) -> PlacedSpecimen:
        return PlacedSpecimen(grid, grid_placement(self._cassette.seed, slot, self._counts[slot]))

    def _swap(self, slot: int | None, truth: PlacedSpecimen | None) -> None:
        """Put `truth` (None: nothing) on the stage; the stage comes back at the origin after an exchange."""
        scene = EmptyStage() if truth is None else PlacedScene(truth.grid, truth.placement)
        with self._lock:
            self._scene, self._truth, self._loaded = scene, truth, slot
            old = self._stage
            self._stage = SimulatedStage(old.clock, old.limits, old.model, seed=self._seed,
                                         start=StagePosition(x_um=0.0, y_um=0.0))


def _checked_counts(load_counts: Mapping[int, int] | None, slot_count: int) -> dict[int, int]:
    """`load_counts` as a dict of slot -> count >= 0; `InvalidParameterError` for a slot or count that is not."""
    counts: dict[int, int] = {}
    for slot, count in (load_counts or {}).items():
        number = check_slot(int(slot) if isinstance(slot, str) and slot.isdigit() else slot, slot_count)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise InvalidParameterError(f"load count of slot {number} must be a whole number >= 0, got {count!r}")
        counts[number] = int(count)
    return counts


def create_cassette_microscope(
    cassette: CassetteSpec | str | os.PathLike[str] = "default",
    *,
    seed: int = 0,
    specimen_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> SimulatedCassetteMicroscope:
    """A `SimulatedCassetteMicroscope`: `cassette` is a `CassetteSpec`, `"default"` (`default_cassette(seed)`)
    or the path of a JSON cassette file; `seed` seeds the stage and the noise (and the default cassette); other
    keyword arguments (loaded_slot, load_counts, instrument_seed, camera_shape_px, clock_profile, ...) go to the
    microscope."""
    if isinstance(cassette, str) and cassette == "default":
        spec = default_cassette(seed)
    elif isinstance(cassette, CassetteSpec):
        spec = cassette
    elif isinstance(cassette, (str, os.PathLike)):
        spec = load_cassette_spec(cassette)
    else:
        raise CassetteSpecError(f"cassette must be a CassetteSpec, 'default' or a JSON file, got {cassette!r}")
    return SimulatedCassetteMicroscope(spec, seed=seed, specimen_options=specimen_options, **kwargs)
