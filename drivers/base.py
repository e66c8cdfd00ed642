"""The microscope contract: the `Microscope` protocol, its data types and its errors.

Everything the agent does to an instrument goes through `Microscope`. Three things implement it:
the simulator (`simulator.microscope.SimulatedMicroscope`), the ZeroMQ bridge client
(`drivers.zmq_bridge.BridgeClient`) and vendor adapters (e.g. `drivers.temscript_adapter`).

Conventions (see DESIGN.md):
- lengths in micrometres (`_um`), angles in degrees (`_deg`), times in seconds (`_s`);
- images are numpy arrays, row-major `(row, col)`, `uint16`;
- every data type here is frozen; every error is a subclass of `MicroscopeError` with a message that
  says what was wrong and what to do.

Blocking behaviour: every method blocks until its effect is complete, except `move_stage(...,
wait=False)`, which returns once the move has started (poll `is_stage_moving()` or call
`wait_for_stage()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class MicroscopeError(Exception):
    """Base class of every error a microscope driver raises."""


class StageLimitError(MicroscopeError):
    """A stage target lies outside the stage limits. Raised before anything moves."""


class StageMoveError(MicroscopeError):
    """A stage move started but failed (hardware fault, collision guard, interrupted)."""


class PresetError(MicroscopeError):
    """An optics preset name is unknown, or the preset could not be applied."""


class AcquisitionError(MicroscopeError):
    """The camera did not deliver a frame (readout failure, beam blanked when it must not be)."""


class AcquisitionTimeout(AcquisitionError):
    """The camera did not deliver a frame within its time limit."""


class InvalidParameterError(MicroscopeError, ValueError):
    """A call had a parameter of the wrong type or out of its range (e.g. a negative exposure)."""


class BridgeError(MicroscopeError):
    """The ZeroMQ bridge failed: protocol mismatch, malformed message, remote failure."""


class BridgeTimeout(BridgeError, TimeoutError):
    """The bridge server did not answer within the call's time limit."""


class ProtocolMismatchError(BridgeError):
    """Client and server speak different protocol versions."""


class AuthenticationError(BridgeError):
    """The server refused the client's credentials (CURVE key not on the allow-list)."""


class GridLoadError(MicroscopeError):
    """A grid could not be loaded from the autoloader cassette: the slot is empty, or the transfer failed.

    After it the stage holds no grid (`loaded_slot()` is None) or, when the transfer never started, the grid it
    held before; the caller skips that slot and goes on with the next."""


#: Every error type that may cross the bridge, by name. The bridge client re-raises a remote error as
#: the class of the same name; unknown names become `MicroscopeError`.
ERROR_TYPES: dict[str, type[MicroscopeError]] = {
    cls.__name__: cls
    for cls in (
        MicroscopeError,
        StageLimitError,
        StageMoveError,
        PresetError,
        AcquisitionError,
        AcquisitionTimeout,
        InvalidParameterError,
        BridgeError,
        BridgeTimeout,
        ProtocolMismatchError,
        AuthenticationError,
        GridLoadError,
    )
}


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class StagePosition(BaseModel):
    """A stage position: x, y, z in micrometres, alpha (tilt) in degrees."""

    model_config = _FROZEN

    x_um: float
    y_um: float
    z_um: float = 0.0
    alpha_deg: float = 0.0

    @field_validator("x_um", "y_um", "z_um", "alpha_deg")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("stage coordinates must be finite numbers")
        return value

    def distance_xy_um(self, other: StagePosition) -> float:
        """Euclidean distance in the x-y plane, in micrometres."""
        return math.hypot(self.x_um - other.x_um, self.y_um - other.y_um)


class StageLimits(BaseModel):
    """The travel range of each stage axis (inclusive): micrometres and degrees."""

    model_config = _FROZEN

    x_min_um: float = -1000.0
    x_max_um: float = 1000.0
    y_min_um: float = -1000.0
    y_max_um: float = 1000.0
    z_min_um: float = -300.0
    z_max_um: float = 300.0
    alpha_min_deg: float = -70.0
    alpha_max_deg: float = 70.0

    def violations(self, position: StagePosition) -> list[str]:
        """Human-readable descriptions of every axis of `position` outside the limits (empty if none)."""
        problems = []
        for axis, unit in (("x", "um"), ("y", "um"), ("z", "um"), ("alpha", "deg")):
            value = getattr(position, f"{axis}_{unit}")
            low = getattr(self, f"{axis}_min_{unit}")
            high = getattr(self, f"{axis}_max_{unit}")
            if not low <= value <= high:
                problems.append(f"{axis}={value:.3f} {unit} outside [{low:.3f}, {high:.3f}]")
        return problems

    def check(self, position: StagePosition) -> None:
        """Raise `StageLimitError` if any axis of `position` lies outside the limits."""
        problems = self.violations(position)
        if problems:
            raise StageLimitError(
                "stage target out of range: " + "; ".join(problems) + ". Choose a target inside the limits."
            )


class OpticsPreset(BaseModel):
    """A named set of optics and camera settings (e.g. `atlas`, `search`, `exposure`).

    `pixel_size_um` is the size of one camera pixel (after binning) projected onto the specimen.
    """

    model_config = _FROZEN

    name: str
    magnification: float = Field(gt=0)
    pixel_size_um: float = Field(gt=0)
    binning: int = Field(default=1, ge=1)
    defocus_um: float = 0.0
    spot_size: int = 1
    camera_length_mm: float | None = Field(
        default=None, description="camera length used by acquire_diffraction() in this preset"
    )


class MicroscopeInfo(BaseModel):
    """What a microscope is and can do; returned by `Microscope.info()`."""

    model_config = _FROZEN

    name: str
    camera_shape_px: tuple[int, int] = Field(
        description="(rows, cols) of the unbinned sensor; a frame is camera_shape_px // preset.binning"
    )
    presets: tuple[OpticsPreset, ...]
    stage_limits: StageLimits
    software_version: str
    simulated: bool = False
    image_shift_limit_um: float = Field(
        default=0.0,
        ge=0.0,
        description=(
            "largest image shift (specimen um from the stage position, each axis) the driver applies with "
            "`set_image_shift`; 0: the driver has no image shift (the optional `ImageShiftMicroscope` capability)"
        ),
    )
    cassette_slots: int = Field(
        default=0,
        ge=0,
        description=(
            "slots of the autoloader cassette the driver can load grids from; 0: no cassette (the optional "
            "`CassetteMicroscope` capability)"
        ),
    )

    def preset(self, name: str) -> OpticsPreset:
        """The preset called `name`; raises `PresetError` if there is none."""
        for preset in self.presets:
            if preset.name == name:
                return preset
        known = ", ".join(p.name for p in self.presets)
        raise PresetError(f"unknown optics preset {name!r}; this microscope has: {known}")


class FrameMetadata(BaseModel):
    """Everything known about a frame at the moment it was taken."""

    model_config = _FROZEN

    kind: Literal["image", "diffraction"] = "image"
    preset: str
    magnification: float
    pixel_size_um: float = Field(gt=0, description="specimen size of one pixel; for diffraction frames nominal")
    binning: int = 1
    stage: StagePosition
    exposure_s: float = Field(ge=0)
    time_s: float = Field(description="microscope clock (Microscope.microscope_time_s) at the end of exposure")
    instrument: str = ""
    image_shift_xy_um: tuple[float, float] = Field(
        default=(0.0, 0.0), description="image shift at the exposure, specimen um along the stage axes"
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="driver-specific, JSON-serialisable")

    @property
    def view_xy_um(self) -> tuple[float, float]:
        """Stage (x_um, y_um) at the centre of the frame: the stage position plus the image shift."""
        return (self.stage.x_um + self.image_shift_xy_um[0], self.stage.y_um + self.image_shift_xy_um[1])


@dataclass(frozen=True)
class Frame:
    """A camera frame: a 2-D `uint16` image plus its metadata.

    The array is made read-only so that a frame passed around the agent cannot be changed behind the
    back of whoever else holds it.
    """

    image: np.ndarray
    metadata: FrameMetadata

    def __post_init__(self) -> None:
        if not isinstance(self.image, np.ndarray):
            raise InvalidParameterError(f"Frame.image must be a numpy array, got {type(self.image).__name__}")
        if self.image.ndim != 2:
            raise InvalidParameterError(f"Frame.image must be 2-D (rows, cols), got shape {self.image.shape}")
        if self.image.dtype != np.uint16:
            raise InvalidParameterError(f"Frame.image must be uint16, got {self.image.dtype}")
        if self.image.flags.writeable:
            view = self.image.view()
            view.flags.writeable = False
            object.__setattr__(self, "image", view)

    @property
    def shape_px(self) -> tuple[int, int]:
        """(rows, cols) of the image."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Microscope(Protocol):
    """A transmission electron microscope with a stage, optics presets and a camera.

    Every method may raise `MicroscopeError` (or a subclass) and nothing else for instrument
    problems; `InvalidParameterError` for bad arguments. Bridge clients may also raise `BridgeError`
    / `BridgeTimeout`.
    """

    def info(self) -> MicroscopeInfo:
        """Instrument name, camera shape, presets, stage limits and software version. Cheap."""
        ...

    def microscope_time_s(self) -> float:
        """Seconds of instrument time since the driver started.

        The simulator returns its virtual clock (advanced by every move, preset change and exposure);
        a real instrument returns wall-clock time. Throughput is measured on this clock.
        """
        ...

    # stage ----------------------------------------------------------------------------------------
    def get_stage(self) -> StagePosition:
        """The current stage position (um, deg). Cheap; valid while moving (then the current estimate)."""
        ...

    def stage_limits(self) -> StageLimits:
        """The travel limits of the stage."""
        ...

    def move_stage(
        self,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        alpha_deg: float | None = None,
        wait: bool = True,
    ) -> None:
        """Move to an absolute position; axes left `None` keep their current value.

        Raises `StageLimitError` before anything moves if the target is outside the limits, and
        `StageMoveError` if the move fails. With `wait=True` it returns once the stage has settled.
        """
        ...

    def is_stage_moving(self) -> bool:
        """True while a move started with `wait=False` is in progress."""
        ...

    def wait_for_stage(self, timeout_s: float = 60.0) -> None:
        """Block until the stage has settled; `StageMoveError` if it has not after `timeout_s`."""
        ...

    def stop_stage(self) -> None:
        """Stop any stage motion at once. Safe to call when nothing moves."""
        ...

    # optics ---------------------------------------------------------------------------------------
    def get_preset(self) -> str:
        """Name of the active optics preset."""
        ...

    def set_preset(self, name: str) -> None:
        """Apply the optics preset `name` (magnification, pixel size, binning). `PresetError` if unknown."""
        ...

    def set_beam_blanked(self, blanked: bool) -> None:
        """Blank (True) or unblank (False) the beam."""
        ...

    def is_beam_blanked(self) -> bool:
        """True if the beam is blanked."""
        ...

    # camera ---------------------------------------------------------------------------------------
    def acquire(self, exposure_s: float) -> Frame:
        """Expose for `exposure_s` seconds in the active preset and return the image.

        Raises `InvalidParameterError` for a non-positive exposure, `AcquisitionError` /
        `AcquisitionTimeout` when the camera fails.
        """
        ...

    def acquire_diffraction(self, exposure_s: float) -> Frame:
        """A diffraction pattern of the area under the beam at the current stage position.

        The frame's `metadata.kind` is `"diffraction"`. The optics are back in imaging for the next `acquire`:
        a driver may return at once, or stay in diffraction until the next `acquire` or `set_preset` (the
        simulator does, as SerialEM's Low Dose areas do), so that consecutive snapshots switch modes once.
        """
        ...


#: Method names of the protocol, in the order above (used by conformance tests and the bridge).
MICROSCOPE_METHODS: tuple[str, ...] = (
    "info",
    "microscope_time_s",
    "get_stage",
    "stage_limits",
    "move_stage",
    "is_stage_moving",
    "wait_for_stage",
    "stop_stage",
    "get_preset",
    "set_preset",
    "set_beam_blanked",
    "is_beam_blanked",
    "acquire",
    "acquire_diffraction",
)


@runtime_checkable
class ImageShiftMicroscope(Microscope, Protocol):
    """A `Microscope` that can also shift the imaged and illuminated area off the stage position (image shift
    with its compensating beam shift), an optional capability: `info().image_shift_limit_um > 0` says a driver
    has it. Shifts are specimen micrometres along the stage axes, so that the area seen by `acquire` and
    `acquire_diffraction` is centred at the stage position plus the shift (`FrameMetadata.view_xy_um`).

    A shift is much faster than a stage move and has no backlash; it holds until set again (a stage move
    leaves it as it is).
    """

    def get_image_shift(self) -> tuple[float, float]:
        """The current image shift (x_um, y_um)."""
        ...

    def set_image_shift(self, x_um: float, y_um: float) -> None:
        """Set the image shift (absolute, um). `InvalidParameterError` beyond `image_shift_limit_um` on an axis
        or for a value that is not a finite number; nothing changes then."""
        ...


#: Method names of the image-shift capability (bridge and conformance tests).
IMAGE_SHIFT_METHODS: tuple[str, ...] = ("get_image_shift", "set_image_shift")


def image_shift_limit_um(microscope: Microscope, info: MicroscopeInfo | None = None) -> float:
    """How far (um per axis) `microscope` can shift the image: its `image_shift_limit_um` when it has the
    image-shift methods, else 0 (move the stage instead)."""
    limit = (info or microscope.info()).image_shift_limit_um
    if limit <= 0 or not all(callable(getattr(microscope, name, None)) for name in IMAGE_SHIFT_METHODS):
        return 0.0
    return float(limit)


def check_image_shift_um(x_um: float, y_um: float, limit_um: float) -> tuple[float, float]:
    """Validate an image shift (um); `InvalidParameterError` for a non-number or beyond `limit_um` per axis."""
    values = []
    for axis, value in (("x_um", x_um), ("y_um", y_um)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidParameterError(f"image shift {axis} must be a number (um), got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise InvalidParameterError(f"image shift {axis} must be finite, got {value}")
        if abs(float(value)) > limit_um + 1e-9:
            raise InvalidParameterError(
                f"image shift {axis}={float(value):.2f} um is beyond this microscope's limit of +-{limit_um:g} um; "
                "move the stage instead"
            )
        values.append(float(value))
    return values[0], values[1]


def check_exposure_s(exposure_s: float, max_exposure_s: float = 600.0) -> float:
    """Validate an exposure time in seconds; raise `InvalidParameterError` if it is not usable."""
    if isinstance(exposure_s, bool) or not isinstance(exposure_s, (int, float)):
        raise InvalidParameterError(f"exposure_s must be a number of seconds, got {type(exposure_s).__name__}")
    if not math.isfinite(exposure_s) or exposure_s <= 0 or exposure_s > max_exposure_s:
        raise InvalidParameterError(f"exposure_s must be in (0, {max_exposure_s}] s, got {exposure_s}")
    return float(exposure_s)


def resolve_stage_target(
    current: StagePosition,
    limits: StageLimits,
    x_um: float | None = None,
    y_um: float | None = None,
    z_um: float | None = None,
    alpha_deg: float | None = None,
) -> StagePosition:
    """The absolute target of `Microscope.move_stage`: axes left None keep their `current` value (um, deg).

    Raises `InvalidParameterError` for a value that is not a finite number, and `StageLimitError` when the
    target lies outside `limits`; both before anything moves.
    """
    values: dict[str, float] = {}
    for axis, value, default in (
        ("x_um", x_um, current.x_um),
        ("y_um", y_um, current.y_um),
        ("z_um", z_um, current.z_um),
        ("alpha_deg", alpha_deg, current.alpha_deg),
    ):
        if value is None:
            values[axis] = default
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidParameterError(f"{axis} must be a number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise InvalidParameterError(f"{axis} must be finite, got {value}")
        values[axis] = float(value)
    target = StagePosition(**values)
    limits.check(target)
    return target


class CassetteSlot(BaseModel):
    """One slot of an autoloader cassette, as the last inventory found it.

    `slot` is 1-based, as on the instrument's own user interface. `state`: `occupied` (a grid, not on the
    stage), `loaded` (its grid is on the stage now), `empty`, or `unknown` (not inventoried, or the autoloader
    could not tell). `label` is whatever name the instrument keeps for the grid (may be empty)."""

    model_config = _FROZEN

    slot: int = Field(ge=1)
    state: Literal["occupied", "loaded", "empty", "unknown"]
    label: str = ""


@runtime_checkable
class CassetteMicroscope(Microscope, Protocol):
    """A `Microscope` with an autoloader: a cassette of grids, one of which is on the stage. An optional
    capability: `info().cassette_slots > 0` says a driver has it.

    Loading a grid takes minutes (the previous grid goes back to its slot first) and puts the new one on the
    stage at a rotation and shift of its own, different after every reload: stage coordinates of an earlier
    load do not hold (register the grid's map again)."""

    def cassette_slots(self) -> tuple[CassetteSlot, ...]:
        """Every slot of the cassette (1 .. `info().cassette_slots`), in order. Cheap: the last inventory."""
        ...

    def loaded_slot(self) -> int | None:
        """The slot whose grid is on the stage, None when the stage holds no grid from the cassette."""
        ...

    def load_grid(self, slot: int) -> None:
        """Put the grid of `slot` on the stage and return when it is there (minutes). Loading the slot already
        loaded does nothing. `InvalidParameterError` for a slot out of 1 .. `cassette_slots`; `GridLoadError` for
        an empty slot or a transfer that failed."""
        ...


#: Method names of the cassette capability (bridge and conformance tests).
CASSETTE_METHODS: tuple[str, ...] = ("cassette_slots", "loaded_slot", "load_grid")


def cassette_slot_count(microscope: Microscope, info: MicroscopeInfo | None = None) -> int:
    """How many cassette slots `microscope` can load grids from: its `cassette_slots` when it has the cassette
    methods, else 0 (one grid, loaded by hand)."""
    count = (info or microscope.info()).cassette_slots
    if count <= 0 or not all(callable(getattr(microscope, name, None)) for name in CASSETTE_METHODS):
        return 0
    return int(count)


def check_slot(slot: int, slot_count: int) -> int:
    """Validate a 1-based cassette slot number; `InvalidParameterError` when it is not an int in 1 .. slot_count."""
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
        raise InvalidParameterError(f"a cassette slot is a whole number, got {type(slot).__name__}")
    if not 1 <= int(slot) <= slot_count:
        raise InvalidParameterError(f"cassette slot {int(slot)} does not exist; this cassette has slots 1-{slot_count}")
    return int(slot)
