"""A `drivers.base.Microscope` over SerialEM's Python scripting module (`import serialem`), for the bridge.

SerialEM runs Thermo Fisher / FEI, JEOL, Hitachi and Zeiss microscopes with Gatan, Thermo Fisher and Direct
Electron cameras; this adapter drives whichever one SerialEM drives. An outside Python process attaches with
`serialem.ConnectToSEM(port, ip)` once SerialEM listens for it: in `SerialEMproperties.txt` set
`EnableExternalPython 1`, `SocketServerIP 7 <ip of the SerialEM PC>` and `SocketServerPort 7 <port, e.g. 48888>`
and restart SerialEM (SmartScope's set-up notes; channel 7 is the external-Python socket, 48888 the module's
default port, PY_SERIALEM_IP / PY_SERIALEM_PORT its environment overrides: PySEMSocket.cpp). The
`serialem` module itself ships with SerialEM (its `PythonModules` folder: put it on `PYTHONPATH`).

`SerialEMMicroscope(module, config)` takes the module as an argument, so that `simulator.serialem_emulator` (a
test double of the module over the simulated microscope) can stand in for it; `connect_serialem(config)` imports
the real module lazily and connects. Optics presets are SerialEM's Low Dose areas (View / Focus / Trial / Record /
Search) or magnification indexes, each with a camera parameter set (`SerialEMConfig`, JSON).

Commands used, as SerialEM's help (hlp/html/script_commands.htm, hlp/html/about_scripts.htm#Python) and its
master command list (MacroMasterList.h: argument keys D/I/S = double/int/string, lower case optional) give them:

| command (keys) | does / returns | units |
|---|---|---|
| `ConnectToSEM(port, ip)` (module, `|is`) | connects the socket; `SEMmoduleError` if it cannot (PySEMSocket.cpp) | - |
| `ReportTickTime()`, `ElapsedTickTime(t)` (`D`) | s since SerialEM started (ms, < 50 days); s since tick t | s |
| `ReportStageXYZ()` | (x, y, z) stage position | um |
| `ReportTiltAngle()` | tilt angle | deg |
| `ReportStageBusy()` | 1 if the stage is busy, else 0 | - |
| `MoveStageTo(x, y[, z])` (`DDd`) | moves to the position; z unchanged if omitted | um |
| `TiltTo(a)` (`Didd`) | tilts to the angle | deg |
| `SetMagIndex(i)` (`I`) / `ReportMagIndex()` | magnification index / (index, 1 if low mag) | - |
| `GoToLowDoseArea(a)` (`S`: V, F, T, R or S) | goes to the Low Dose area | - |
| `SetLowDoseMode(on)` (`I`) / `ReportLowDose()` | returns the previous state / (on, area number) | - |
| `SetSpotSize(i)` (`I`), `SetDefocus(d)` (`D`) | spot size; defocus | -, um |
| `SetExposure(set, e)` (`SDd`), `SetBinning(set, b)` (`SI`) | exposure, binning of parameter set V/F/T/R/P/S | s, - |
| `V()`, `F()`, `T()`, `R()`, `L()`, `Search()` | acquire (View/Focus/Trial/Record/Preview/Search) into buffer A | - |
| `bufferImage("A")` (module type) | buffer A's image by the buffer protocol (2-D, row-major, read-only) | counts |
| `CameraProperties()` (`ii`) | (size x, size y, RotationAndFlip, detector pixel, ...), unbinned | px, um |
| `SetCamLenIndex(i)` (`I`) / `ReportCameraLength()` | camera length index / length, 0 if not in diffraction | -, m |
| `SetBeamBlank(on)` (`I`) | blanks (1) or unblanks (0) the beam | - |
| `ReportSpecimenShift()` | image shift in "specimen" coordinates (X along the tilt axis) | um |
| `ImageShiftByMicrons(dx, dy)` (`DDdi`) | changes the image shift by a specimen distance (X along the tilt axis) | um |
| `ReportSlotStatus(n)` (`I`) | autoloader slot n (from 1): -1 error, 0 empty, 1 occupied | - |
| `LoadCartridge(n)` (`I`) | loads the cartridge of slot n (a "long operation") | - |

Where the help is silent (kept explicit in comments below): it names no command that reports whether the beam is
blanked (this adapter keeps the state it set), none that stops a stage move, none that reports stage limits (they
are configured), no unit for the pixel size `ImageProperties` reports (pixel sizes are configured), whether
`SetCamLenIndex` switches an imaging column into diffraction and `SetMagIndex` back (the adapter checks
`ReportCameraLength` after the switch and refuses a "diffraction" frame taken in imaging), and what
`ReportSlotStatus` says for the slot whose cartridge is on the stage. Newer SerialEM versions have more cartridge
commands (e.g. cartridge inventories by ID) that could not be checked here; only the three above are used.

Errors (about_scripts.htm#Python; the module source, SerialEMModule.cpp): a failed SerialEM operation raises
`serialem.SEMerror` (mapped to the typed error of what was attempted: `StageMoveError`, `PresetError`,
`AcquisitionError`, `GridLoadError`, else `MicroscopeError`); a broken link raises `serialem.SEMmoduleError`, a
script exit `serialem.SEMexited` (both `MicroscopeError` naming host and port); arguments of the wrong type raise
`TypeError` before anything is sent (a bug here or a SerialEM version mismatch: `MicroscopeError`).

Threads: the module has one socket to SerialEM and runs one command at a time, so every command goes through one
lock. Read methods (`get_stage`, `microscope_time_s`, `get_preset`, ...) never wait for a long command: while one
runs they answer from the last values read (the bridge's read calls stay quick). The module's C code
(RunCommand) shows no release of the GIL while it waits for SerialEM; if it holds it, other Python threads of the
serving process wait anyway during a long command (the bridge client's time limits allow for that).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.adapter_config import AdapterConfig
from drivers.base import (
    AcquisitionError,
    AcquisitionTimeout,
    CassetteSlot,
    Frame,
    FrameMetadata,
    GridLoadError,
    InvalidParameterError,
    MicroscopeError,
    MicroscopeInfo,
    OpticsPreset,
    PresetError,
    StageLimits,
    StageMoveError,
    StagePosition,
    check_exposure_s,
    check_image_shift_um,
    check_slot,
    resolve_stage_target,
)

logger = logging.getLogger(__name__)

LowDoseArea = Literal["V", "F", "T", "R", "S"]
CameraSet = Literal["V", "F", "T", "R", "P", "S"]

#: The acquisition command of each camera parameter set (script_commands.htm, "Acquisition Commands").
ACQUIRE_COMMANDS: dict[str, str] = {"V": "V", "F": "F", "T": "T", "R": "R", "P": "L", "S": "Search"}

#: What to set in SerialEMproperties.txt so that an outside Python process can attach.
PROPERTIES_HINT = (
    "in SerialEMproperties.txt set EnableExternalPython 1, SocketServerIP 7 <this SerialEM PC's address> and "
    "SocketServerPort 7 <port>, then restart SerialEM"
)

DEFAULT_PORT = 48888


class SerialEMPreset(BaseModel):
    """One optics preset as SerialEM settings: a Low Dose area or a magnification index, the camera parameter
    set that acquires in it, and the figures SerialEM does not report (pixel size after binning, um)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    low_dose_area: LowDoseArea | None = Field(default=None, description="Low Dose area (V, F, T, R, S) to go to")
    magnification_index: int | None = Field(default=None, ge=0, description="else the magnification index to set")
    magnification: float = Field(gt=0, description="nominal magnification, for metadata")
    pixel_size_um: float = Field(gt=0, description="specimen um per camera pixel after binning")
    binning: int = Field(default=1, ge=1)
    camera_set: CameraSet | None = Field(
        default=None, description="parameter set to acquire with; default: the Low Dose area's own, else Record"
    )
    spot_size: int | None = Field(default=None, ge=1)
    defocus_um: float | None = None
    diffraction_area: LowDoseArea | None = Field(
        default=None, description="a Low Dose area set up in diffraction in SerialEM, for acquire_diffraction"
    )
    camera_length_index: int | None = Field(default=None, ge=0, description="else SetCamLenIndex for diffraction")
    diffraction_camera_set: CameraSet | None = Field(
        default=None, description="parameter set of the diffraction exposure; default: the diffraction area's, else R"
    )
    camera_length_mm: float | None = Field(default=None, gt=0, description="nominal camera length, for metadata")

    @model_validator(mode="after")
    def _one_way_each(self) -> SerialEMPreset:
        if (self.low_dose_area is None) == (self.magnification_index is None):
            raise ValueError(f"preset {self.name!r}: give exactly one of low_dose_area and magnification_index")
        if self.diffraction_area is not None and self.camera_length_index is not None:
            raise ValueError(f"preset {self.name!r}: give at most one of diffraction_area and camera_length_index")
        return self

    @property
    def acquire_set(self) -> str:
        """The camera parameter set of an image in this preset (V, F, T, R, P or S)."""
        return self.camera_set or self.low_dose_area or "R"

    @property
    def diffraction_set(self) -> str:
        """The camera parameter set of a diffraction pattern in this preset."""
        return self.diffraction_camera_set or self.diffraction_area or "R"

    @property
    def has_diffraction(self) -> bool:
        """True when the preset says how to switch to diffraction."""
        return self.diffraction_area is not None or self.camera_length_index is not None

    def as_optics_preset(self) -> OpticsPreset:
        """The `drivers.base.OpticsPreset` the agent sees."""
        return OpticsPreset(
            name=self.name, magnification=self.magnification, pixel_size_um=self.pixel_size_um, binning=self.binning,
            defocus_um=self.defocus_um or 0.0, spot_size=self.spot_size or 1, camera_length_mm=self.camera_length_mm,
        )


class SerialEMConfig(AdapterConfig):
    """Where SerialEM listens and how preset names map to SerialEM settings (JSON: `SerialEMConfig.from_file`).

    Example: `{"host": "192.168.0.32", "port": 48888, "stage_limits": {"x_min_um": -990, "x_max_um": 990,
    "y_min_um": -990, "y_max_um": 990}, "presets": [{"name": "atlas", "low_dose_area": "V", "magnification": 135,
    "pixel_size_um": 0.52, "binning": 2}, {"name": "exposure", "low_dose_area": "R", "magnification": 19500,
    "pixel_size_um": 0.0036, "diffraction_area": "F", "camera_length_mm": 830}]}`
    """

    ADAPTER: ClassVar[str] = "SerialEM"

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    presets: tuple[SerialEMPreset, ...] = Field(min_length=1)
    instrument_name: str = "SerialEM"
    simulated: bool = Field(default=False, description="True when the SerialEM behind is an emulator")
    stage_limits: StageLimits = Field(
        default_factory=StageLimits, description="SerialEM reports none: the travel the agent may use (um, deg)"
    )
    max_exposure_s: float = Field(default=60.0, gt=0)
    image_shift_limit_um: float = Field(
        default=0.0, ge=0.0, le=100.0, description="largest image shift per axis (um); 0 turns the capability off"
    )
    image_shift_matrix: tuple[tuple[float, float], tuple[float, float]] = Field(
        default=((1.0, 0.0), (0.0, 1.0)),
        description="SerialEM specimen um (X along the tilt axis) per stage-axis um; SpecimenToStageMatrix inverts it",
    )
    cassette_slots: int = Field(default=0, ge=0, le=64, description="autoloader slots (12 on Thermo Fisher); 0: none")


def import_serialem() -> Any:
    """The real `serialem` module; `MicroscopeError` saying where it comes from when it is not installed."""
    try:
        import serialem  # type: ignore[import-not-found]
    except ImportError:
        raise MicroscopeError(
            "the serialem Python module is not installed; put SerialEM's PythonModules folder (it ships with "
            "SerialEM) on PYTHONPATH"
        ) from None
    return serialem


def connect_serialem(config: SerialEMConfig) -> SerialEMMicroscope:
    """A `SerialEMMicroscope` attached to the SerialEM at `config.host`:`config.port` through the real module."""
    return SerialEMMicroscope(import_serialem(), config)


class SerialEMLink:
    """The one connection to SerialEM: every command under one lock, SerialEM's exceptions mapped to typed ones.

    One SerialEM per process: the module keeps a single socket and takes the port and address of its first
    connection only (PySEMSocket::InitializeSocket)."""

    def __init__(self, module: Any, host: str, port: int) -> None:
        self.module = module
        self.where = f"SerialEM at {host}:{port}"
        self.lock = threading.RLock()
        self._command_error = _exception(module, "SEMerror")
        self._link_errors = (_exception(module, "SEMmoduleError"), _exception(module, "SEMexited"))
        try:
            module.ConnectToSEM(int(port), str(host))
            module.ReportTickTime()  # a first command proves that SerialEM answers on that socket
        except (*self._link_errors, self._command_error, OSError, TypeError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise MicroscopeError(f"{self.where} is not reachable ({detail}); {PROPERTIES_HINT}") from None

    def call(self, error: type[MicroscopeError], name: str, *args: Any) -> Any:
        """Run the command `name(*args)`; a SerialEM failure raises `error`, a lost link `MicroscopeError`."""
        function = getattr(self.module, name, None)
        if function is None:
            raise MicroscopeError(f"{self.where}: this serialem module has no command {name}; update SerialEM")
        with self.lock:
            try:
                return function(*args)
            except self._command_error as exc:
                raise error(f"{self.where}: {name}{_args_text(args)} failed: {exc}") from exc
            except self._link_errors as exc:
                raise MicroscopeError(f"{self.where}: lost the link during {name} ({exc}); {PROPERTIES_HINT}") from exc
            except TypeError as exc:
                raise MicroscopeError(f"{self.where}: {name}{_args_text(args)} refused its arguments: {exc}") from exc

    def read(self, name: str, *args: Any) -> Any | None:
        """`call` for a status query that must not wait: None when another command holds the link."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self.call(MicroscopeError, name, *args)
        finally:
            self.lock.release()

    def image(self, buffer: str = "A") -> np.ndarray:
        """A copy of the image in `buffer` as uint16 (signed data clipped at 0, floats rounded and clipped)."""
        buffer_image = getattr(self.module, "bufferImage", None)
        if buffer_image is None:
            raise MicroscopeError(f"{self.where}: this serialem module has no bufferImage (Python 3.4 or later)")
        with self.lock:
            try:
                raw = np.array(buffer_image(buffer), copy=True)
            # the module's bufferImage sets its error but reports success on failure, which Python turns into a
            # SystemError ("returned a result with an error set", as its source notes)
            except (*self._link_errors, self._command_error, SystemError, TypeError, ValueError) as exc:
                raise AcquisitionError(f"{self.where}: could not read buffer {buffer}: {exc}") from exc
        if raw.ndim != 2:
            raise AcquisitionError(f"{self.where}: buffer {buffer} holds an array of shape {raw.shape}, expected 2-D")
        if raw.dtype == np.uint16:
            return raw
        if np.issubdtype(raw.dtype, np.floating):
            raw = np.rint(np.nan_to_num(raw))
        return np.clip(raw, 0, 65535).astype(np.uint16)


def _exception(module: Any, name: str) -> type[BaseException]:
    found = getattr(module, name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else _NeverRaised


class _NeverRaised(Exception):
    """Stands in for an exception class a module does not define, so that `except` clauses stay valid."""


def _args_text(args: tuple[Any, ...]) -> str:
    return "(" + ", ".join(repr(a) for a in args) + ")"


class _SerialEMCassette:
    """The autoloader part of `SerialEMMicroscope` (the `CassetteMicroscope` capability), split off for size."""

    config: SerialEMConfig
    link: SerialEMLink
    _loaded_slot: int | None
    _slots: tuple[CassetteSlot, ...]
    _stage: StagePosition

    def get_stage(self) -> StagePosition:  # pragma: no cover - SerialEMMicroscope's
        raise NotImplementedError

    # cassette -------------------------------------------------------------------------------------
    def cassette_slots(self) -> tuple[CassetteSlot, ...]:
        """Every slot by ReportSlotStatus (1 occupied, 0 empty, -1 error: unknown); the slot this adapter loaded
        is `loaded`. The last answers while a command runs."""
        slots = []
        for slot in range(1, self.config.cassette_slots + 1):
            status = self.link.read("ReportSlotStatus", slot)
            if status is None:
                return self._slots
            state = {1: "occupied", 0: "empty"}.get(int(float(status)), "unknown")
            slots.append(CassetteSlot(slot=slot, state="loaded" if slot == self._loaded_slot else state))
        self._slots = tuple(slots)
        return self._slots

    def loaded_slot(self) -> int | None:
        """The slot loaded through this adapter (SerialEM reports no cartridge on the stage), None before."""
        return self._loaded_slot

    def load_grid(self, slot: int) -> None:
        """LoadCartridge `slot` (minutes); `GridLoadError` for a slot ReportSlotStatus calls empty (nothing moves)
        or a failed transfer (then no grid is known to be on the stage)."""
        slot = check_slot(slot, self.config.cassette_slots)
        if slot == self._loaded_slot:
            return
        with self.link.lock:
            status = int(float(self.link.call(GridLoadError, "ReportSlotStatus", slot)))
            if status == 0 and self._loaded_slot is not None:
                raise GridLoadError(f"cassette slot {slot} is empty (ReportSlotStatus 0); skip it")
            # status 0 while the adapter does not know which grid is on the stage: that grid's own slot reads empty
            # too (its cartridge is out), so LoadCartridge decides; SerialEM refuses a truly empty slot
            try:
                # a "long operation" on SerialEM's side; the script command returns when it is over (the help
                # does not say whether an occupied stage is unloaded first: on Thermo Fisher loaders it is)
                self.link.call(GridLoadError, "LoadCartridge", slot)
            except GridLoadError:
                self._loaded_slot = None
                raise
        self._loaded_slot = slot
        self._stage = self.get_stage()



class SerialEMMicroscope(_SerialEMCassette):
    """`drivers.base.Microscope` (with image shift and cassette) over SerialEM's `serialem` module; see the
    module docstring for the commands, their units and the threading rule."""

    def __init__(self, module: Any, config: SerialEMConfig) -> None:
        self.config = config
        self.link = SerialEMLink(module, config.host, config.port)
        self._tick0_s = float(self.link.call(MicroscopeError, "ReportTickTime"))
        self._tick = (0.0, time.monotonic())
        camera = self.link.call(MicroscopeError, "CameraProperties")
        self._camera_shape_px = (int(camera[1]), int(camera[0]))  # SerialEM reports X (columns) first
        low_dose = self.link.call(MicroscopeError, "ReportLowDose")
        self._low_dose = bool(low_dose[0]) if isinstance(low_dose, tuple) else bool(low_dose)
        self._preset_name: str | None = None
        self._blanked = False  # SerialEM has no command that reports it: the state this adapter set last
        self._stage = StagePosition(x_um=0.0, y_um=0.0)
        self._stage = self.get_stage()
        self._image_shift_xy_um = (0.0, 0.0)
        self._move_thread: threading.Thread | None = None
        self._move_error: MicroscopeError | None = None
        self._loaded_slot: int | None = None
        self._slots: tuple[CassetteSlot, ...] = tuple(
            CassetteSlot(slot=n, state="unknown") for n in range(1, config.cassette_slots + 1)
        )

    # info and clock -------------------------------------------------------------------------------
    def info(self) -> MicroscopeInfo:
        """Name, camera shape (rows, cols, read at connect), presets, configured stage limits; cheap."""
        return MicroscopeInfo(
            name=self.config.instrument_name, camera_shape_px=self._camera_shape_px,
            presets=tuple(p.as_optics_preset() for p in self.config.presets), stage_limits=self.config.stage_limits,
            software_version="SerialEM (Python scripting)", simulated=self.config.simulated,
            image_shift_limit_um=self.config.image_shift_limit_um, cassette_slots=self.config.cassette_slots,
        )

    def microscope_time_s(self) -> float:
        """Seconds of SerialEM's tick time since this adapter connected (ElapsedTickTime, right past the tick
        counter's wrap after 49.7 days); while a long command runs, the last value read plus the wall-clock time
        since (the tick cannot be read then)."""
        elapsed = self.link.read("ElapsedTickTime", self._tick0_s)
        if elapsed is None:
            last_s, read_at_s = self._tick
            return last_s + (time.monotonic() - read_at_s)
        self._tick = (float(elapsed), time.monotonic())
        return float(elapsed)

    # stage ----------------------------------------------------------------------------------------
    def get_stage(self) -> StagePosition:
        """The stage position (um, deg): ReportStageXYZ and ReportTiltAngle; the last one read while a command
        runs (during a move: where it was before)."""
        with_lock = self.link.lock.acquire(blocking=False)
        if not with_lock:
            return self._stage
        try:
            x_um, y_um, z_um = (float(v) for v in self.link.call(MicroscopeError, "ReportStageXYZ"))
            alpha_deg = float(self.link.call(MicroscopeError, "ReportTiltAngle"))
        finally:
            self.link.lock.release()
        self._stage = StagePosition(x_um=x_um, y_um=y_um, z_um=z_um, alpha_deg=alpha_deg)
        return self._stage

    def stage_limits(self) -> StageLimits:
        """The configured travel limits (SerialEM reports none)."""
        return self.config.stage_limits

    def move_stage(
        self,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        alpha_deg: float | None = None,
        wait: bool = True,
    ) -> None:
        """Absolute move (MoveStageTo for x, y, z; TiltTo for alpha); limits checked before anything moves.
        `wait=False` runs the move in a background thread (MoveStageTo itself returns when the stage stopped)."""
        if self._moving():
            raise StageMoveError("a stage move is in progress; wait_for_stage() before starting another")
        current = self.get_stage()
        target = resolve_stage_target(current, self.config.stage_limits, x_um, y_um, z_um, alpha_deg)
        xyz = any(v is not None for v in (x_um, y_um, z_um))
        tilt = alpha_deg is not None and target.alpha_deg != current.alpha_deg
        if not (xyz or tilt):
            return
        self._move_error = None
        if wait:
            self._go(target, xyz, tilt, z_um is not None)
            return
        self._move_thread = threading.Thread(
            target=self._go_background, args=(target, xyz, tilt, z_um is not None), daemon=True
        )
        self._move_thread.start()

    def _go(self, target: StagePosition, xyz: bool, tilt: bool, with_z: bool) -> None:
        with self.link.lock:
            if xyz:
                args = (target.x_um, target.y_um, target.z_um) if with_z else (target.x_um, target.y_um)
                self.link.call(StageMoveError, "MoveStageTo", *args)
            if tilt:
                self.link.call(StageMoveError, "TiltTo", target.alpha_deg)
            self._stage = target

    def _go_background(self, target: StagePosition, xyz: bool, tilt: bool, with_z: bool) -> None:
        try:
            self._go(target, xyz, tilt, with_z)
        except MicroscopeError as exc:
            self._move_error = exc if isinstance(exc, StageMoveError) else StageMoveError(str(exc))

    def _moving(self) -> bool:
        thread = self._move_thread
        return thread is not None and thread.is_alive()

    def is_stage_moving(self) -> bool:
        """True while a background move runs, else ReportStageBusy (the last answer while a command runs)."""
        if self._moving():
            return True
        busy = self.link.read("ReportStageBusy")
        return bool(busy) if busy is not None else False

    def wait_for_stage(self, timeout_s: float = 60.0) -> None:
        """Wait for a background move to end; `StageMoveError` after `timeout_s` or if it failed. MoveStageTo
        returns only once the stage has stopped, so there is nothing to poll afterwards."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
            raise InvalidParameterError(f"timeout_s must be a non-negative number of seconds, got {timeout_s!r}")
        thread = self._move_thread
        if thread is not None:
            thread.join(float(timeout_s))
            if thread.is_alive():
                raise StageMoveError(f"the stage has not settled after {timeout_s} s; check SerialEM")
        if self._move_error is not None:
            error, self._move_error = self._move_error, None
            raise error

    def stop_stage(self) -> None:
        """SerialEM's script commands include no stage stop: a no-op when still, `StageMoveError` while moving."""
        if self._moving():
            raise StageMoveError("SerialEM cannot stop a stage move from a script; use the microscope's controls")

    # optics ---------------------------------------------------------------------------------------
    def get_preset(self) -> str:
        """The preset applied last, else the first whose magnification index SerialEM reports, else ''."""
        if self._preset_name is not None:
            return self._preset_name
        reported = self.link.read("ReportMagIndex")
        index = int(reported[0] if isinstance(reported, tuple) else reported) if reported is not None else None
        return next((p.name for p in self.config.presets if p.magnification_index == index), "")

    def set_preset(self, name: str) -> None:
        """GoToLowDoseArea (Low Dose on) or SetMagIndex (Low Dose off), then spot size and defocus if configured."""
        preset = self.config.preset(name)
        with self.link.lock:
            self._imaging(preset)
            if preset.spot_size is not None:
                self.link.call(PresetError, "SetSpotSize", preset.spot_size)
            if preset.defocus_um is not None:
                self.link.call(PresetError, "SetDefocus", float(preset.defocus_um))
        self._preset_name = name

    def _imaging(self, preset: SerialEMPreset) -> None:
        """Go to the imaging state of `preset` (also the way back from diffraction)."""
        if preset.low_dose_area is not None:
            self._set_low_dose(True)
            self.link.call(PresetError, "GoToLowDoseArea", preset.low_dose_area)
        else:
            self._set_low_dose(False)
            self.link.call(PresetError, "SetMagIndex", int(preset.magnification_index or 0))

    def _set_low_dose(self, on: bool) -> None:
        if self._low_dose != on:
            self.link.call(PresetError, "SetLowDoseMode", int(on))
            self._low_dose = on

    def set_beam_blanked(self, blanked: bool) -> None:
        """SetBeamBlank 1 / 0."""
        if not isinstance(blanked, (bool, np.bool_)):
            raise InvalidParameterError(f"blanked must be True or False, got {blanked!r}")
        self.link.call(MicroscopeError, "SetBeamBlank", int(bool(blanked)))
        self._blanked = bool(blanked)

    def is_beam_blanked(self) -> bool:
        """The state set last through this adapter (SerialEM's script commands cannot report it)."""
        return self._blanked

    def get_image_shift(self) -> tuple[float, float]:
        """The image shift (x_um, y_um along the stage axes) from ReportSpecimenShift and `image_shift_matrix`."""
        reported = self.link.read("ReportSpecimenShift")
        if reported is None:
            return self._image_shift_xy_um
        specimen = np.array([float(reported[0]), float(reported[1])])
        x_um, y_um = np.linalg.solve(np.array(self.config.image_shift_matrix), specimen)
        self._image_shift_xy_um = (float(x_um), float(y_um))
        return self._image_shift_xy_um

    def set_image_shift(self, x_um: float, y_um: float) -> None:
        """Set the image shift (absolute, um along the stage axes) by ImageShiftByMicrons of the difference to the
        reported one; `InvalidParameterError` beyond `image_shift_limit_um` (0: capability off)."""
        if self.config.image_shift_limit_um <= 0:
            raise InvalidParameterError("image shift is off for this instrument (config image_shift_limit_um=0)")
        shift = check_image_shift_um(x_um, y_um, self.config.image_shift_limit_um)
        matrix = np.array(self.config.image_shift_matrix)
        with self.link.lock:
            reported = self.link.call(MicroscopeError, "ReportSpecimenShift")
            delta = matrix @ np.array(shift) - np.array([float(reported[0]), float(reported[1])])
            self.link.call(MicroscopeError, "ImageShiftByMicrons", float(delta[0]), float(delta[1]))
        self._image_shift_xy_um = shift

    # camera ---------------------------------------------------------------------------------------
    def _current_preset(self) -> SerialEMPreset:
        name = self.get_preset()
        if not name:
            raise PresetError("no optics preset is active; call set_preset() first")
        return self.config.preset(name)

    def _expose(self, camera_set: str, preset: SerialEMPreset, exposure_s: float) -> np.ndarray:
        self.link.call(AcquisitionError, "SetExposure", camera_set, exposure_s)
        self.link.call(AcquisitionError, "SetBinning", camera_set, preset.binning)
        command = ACQUIRE_COMMANDS[camera_set]
        try:
            self.link.call(AcquisitionError, command)
        except AcquisitionError as exc:
            if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
                raise AcquisitionTimeout(str(exc)) from exc
            raise
        return self.link.image("A")

    def _frame(self, image: np.ndarray, preset: SerialEMPreset, exposure_s: float, extra: dict[str, Any]) -> Frame:
        stage = self.get_stage()
        metadata = FrameMetadata(
            kind="diffraction" if "camera_length_mm" in extra else "image", preset=preset.name,
            magnification=preset.magnification, pixel_size_um=preset.pixel_size_um, binning=preset.binning,
            stage=stage, exposure_s=exposure_s,
            time_s=self.microscope_time_s(),  # after the frame arrived: SerialEM reports no end of exposure
            instrument=self.config.instrument_name, image_shift_xy_um=self._image_shift_xy_um, extra=extra,
        )
        return Frame(image=image, metadata=metadata)

    def acquire(self, exposure_s: float) -> Frame:
        """An image with the preset's camera parameter set (SetExposure, SetBinning, V/F/T/R/L/Search, buffer A)."""
        exposure_s = check_exposure_s(exposure_s, self.config.max_exposure_s)
        preset = self._current_preset()
        with self.link.lock:
            image = self._expose(preset.acquire_set, preset, exposure_s)
        return self._frame(image, preset, exposure_s, {"camera_set": preset.acquire_set, "serialem": True})

    def acquire_diffraction(self, exposure_s: float) -> Frame:
        """Switch to the preset's diffraction area (GoToLowDoseArea) or camera length (SetCamLenIndex), check
        ReportCameraLength, expose, and always return to the preset's imaging state."""
        exposure_s = check_exposure_s(exposure_s, self.config.max_exposure_s)
        preset = self._current_preset()
        if not preset.has_diffraction:
            raise PresetError(f"preset {preset.name!r} has no diffraction_area or camera_length_index in the config")
        with self.link.lock:
            try:
                camera_length_m, image = self._diffract(preset, exposure_s)
            except BaseException:
                try:
                    self._imaging(preset)
                except MicroscopeError as exc:  # keep the first error; this one goes to the log
                    logger.error("could not return to imaging after a failed diffraction exposure: %s", exc)
                raise
            self._imaging(preset)
        extra = {"camera_set": preset.diffraction_set, "camera_length_mm": camera_length_m * 1000.0, "serialem": True}
        return self._frame(image, preset, exposure_s, extra)

    def _diffract(self, preset: SerialEMPreset, exposure_s: float) -> tuple[float, np.ndarray]:
        """Switch to diffraction, check it took, expose; (camera length in m, image)."""
        if preset.diffraction_area is not None:
            self._set_low_dose(True)
            self.link.call(PresetError, "GoToLowDoseArea", preset.diffraction_area)
        else:
            self.link.call(PresetError, "SetCamLenIndex", int(preset.camera_length_index or 0))
        camera_length_m = float(self.link.call(AcquisitionError, "ReportCameraLength"))
        if not camera_length_m > 0:
            raise AcquisitionError(
                f"{self.link.where} is not in diffraction after switching for preset {preset.name!r} "
                "(ReportCameraLength 0); set the diffraction area or camera length index up in SerialEM"
            )
        return camera_length_m, self._expose(preset.diffraction_set, preset, exposure_s)
