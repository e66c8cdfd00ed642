"""A test double of SerialEM's Python module (`serialem`) over a simulated microscope.

`make_serialem_module(microscope)` returns a module-like object (a `types.SimpleNamespace`; never importable as
`serialem`) whose functions have the names, argument keys and return conventions of the commands
`drivers.serialem_adapter` uses (see that module's table; keys from SerialEM's MacroMasterList.h): arguments are
positional only and type-checked as the real module's `PyArg_ParseTuple` checks them (`TypeError` for a string
where a number goes, a float where an int goes, too few or too many), a command reports None, one float, or a
tuple of floats; a failed operation raises `SEMerror`, a missing link `SEMmoduleError`. Behind it stands a
`simulator.SimulatedMicroscope` (any `drivers.base.Microscope` with image shift, and the cassette capability if
it has one): its presets are the magnification indexes 1..n in order of magnification, optionally Low Dose areas
(`low_dose_areas`, and `diffraction_areas` set up in diffraction), its clock is SerialEM's tick time.

Time on the simulated clock is charged by the simulated microscope, once per physical event, as it charges the
same event for the agent calling it directly: a command that changes the instrument calls the microscope method
that models it (MoveStageTo -> move_stage, SetMagIndex / GoToLowDoseArea -> set_preset, R / V / ... ->
acquire or acquire_diffraction, ImageShiftByMicrons -> set_image_shift, SetBeamBlank -> set_beam_blanked,
ReportStageBusy -> is_stage_moving, LoadCartridge -> load_grid). Status reports and parameter-set edits
(ReportStageXYZ, ReportTickTime, SetExposure, SetBinning, ...) cost nothing: on SerialEM they are a socket round
trip of milliseconds that touch no lens or motor. Switching into diffraction (SetCamLenIndex, a diffraction Low
Dose area) and back to the same preset is charged by `acquire_diffraction`, which models a snapshot as "switch,
expose, switch back"; charging the switches again would count them twice.
"""

# SerialEM's command names are MixedCase (the module's functions are named as the script commands)
# ruff: noqa: N802

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from drivers.base import (
    AcquisitionTimeout,
    Frame,
    Microscope,
    MicroscopeError,
    cassette_slot_count,
)
from drivers.serialem_adapter import DEFAULT_PORT, SerialEMConfig, SerialEMPreset

#: Buffers A..T (SerialEM's MAX_BUFFERS 20); a new image goes to A and the others roll down.
BUFFER_LETTERS = "ABCDEFGHIJKLMNOPQRST"
#: Low Dose area numbers as ReportLowDose gives them (0 for V, etc.; the order of SerialEM's areas).
AREA_NUMBERS = {"V": 0, "F": 1, "T": 2, "R": 3, "S": 4}
#: The Low Dose area a camera parameter set acquires in when Low Dose is on (Preview acquires in Record).
AREA_OF_SET = {"V": "V", "F": "F", "T": "T", "R": "R", "P": "R", "S": "S"}
#: Parameter sets by letter or number (script_commands.htm: V, F, T, R, P, S, M or 0-6).
SET_LETTERS = {"0": "V", "1": "F", "2": "T", "3": "R", "4": "P", "5": "S", "6": "M"}
#: ReportMag's low-mag flag: below this magnification (a guess; SerialEM takes it from the scope's mag table).
LOW_MAG_BELOW = 1000.0


class SEMerror(Exception):
    """A SerialEM operation failed (the real module's `serialem.SEMerror`)."""


class SEMmoduleError(Exception):
    """The module could not talk to SerialEM (the real module's `serialem.SEMmoduleError`)."""


class SEMexited(Exception):
    """The script was ended in SerialEM (the real module's `serialem.SEMexited`)."""


def _check_args(name: str, keys: str, args: tuple[Any, ...]) -> None:
    """`TypeError` as `PyArg_ParseTuple` raises it for `args` against SerialEM's keys (D/I/S: double, int,
    string; lower case optional)."""
    required = sum(1 for k in keys if k.isupper())
    if len(args) < required:
        raise TypeError(f"{name}() takes at least {required} argument{'s' * (required != 1)} ({len(args)} given)")
    if len(args) > len(keys):
        raise TypeError(f"{name}() takes at most {len(keys)} argument{'s' * (len(keys) != 1)} ({len(args)} given)")
    for position, (key, value) in enumerate(zip(keys[: len(args)], args, strict=True), start=1):
        kind = key.upper()
        if kind == "S" and not isinstance(value, str):
            raise TypeError(f"{name}() argument {position} must be str, not {type(value).__name__}")
        if kind == "D" and (isinstance(value, str) or not hasattr(value, "__float__")):
            raise TypeError(f"{name}() argument {position} must be real number, not {type(value).__name__}")
        if kind == "I" and (isinstance(value, (float, np.floating)) or not hasattr(value, "__index__")):
            raise TypeError(f"{name}() argument {position}: '{type(value).__name__}' object cannot be interpreted "
                            "as an integer")


def command(keys: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark an emulator method as the SerialEM command of its name, with argument `keys` (MacroMasterList.h)."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs:
                raise TypeError(f"{method.__name__}() takes no keyword arguments")
            _check_args(method.__name__, keys, args)
            self.require_link()
            try:
                return method(self, *args)
            except MicroscopeError as exc:
                if isinstance(exc, AcquisitionTimeout):
                    raise SEMerror(f"camera timeout: {exc}") from exc
                raise SEMerror(str(exc)) from exc

        run.serialem_keys = keys  # type: ignore[attr-defined]
        return run

    return wrap


def _floats(*values: float) -> Any:
    """A command's report: one float, or a tuple of floats (about_scripts.htm#Python)."""
    return float(values[0]) if len(values) == 1 else tuple(float(v) for v in values)


class _EmulatedCameraAndLoader:
    """The camera, buffer and autoloader commands of `SerialEMEmulator` (a part of it, split off for size)."""

    microscope: Any
    presets: dict[str, Any]
    camera_sets: dict[str, dict[str, Any]]
    buffers: list[np.ndarray]
    low_dose: bool
    diffraction: bool
    cassette: bool

    def require_link(self) -> None:  # pragma: no cover - SerialEMEmulator's
        raise NotImplementedError

    def _go_to_area(self, area: str, charged: bool) -> None:  # pragma: no cover - SerialEMEmulator's
        raise NotImplementedError

    # camera ---------------------------------------------------------------------------------------
    def _set_letter(self, camera_set: str) -> str:
        letter = SET_LETTERS.get(camera_set, camera_set.upper())
        if letter not in self.camera_sets:
            raise SEMerror(f"{camera_set!r} is not a camera parameter set (V, F, T, R, P, S, M or 0-6)")
        return letter

    @command("SDd")
    def SetExposure(self, camera_set: str, exposure_s: float, *_drift: Any) -> None:
        """Exposure (s) of a parameter set."""
        if not float(exposure_s) > 0:
            raise SEMerror(f"exposure {exposure_s} s is not positive")
        self.camera_sets[self._set_letter(camera_set)]["exposure_s"] = float(exposure_s)

    @command("SI")
    def SetBinning(self, camera_set: str, binning: int) -> None:
        """Binning of a parameter set."""
        if int(binning) < 1:
            raise SEMerror(f"binning {int(binning)} is not valid")
        self.camera_sets[self._set_letter(camera_set)]["binning"] = int(binning)

    @command("ii")
    def CameraProperties(self, camera: int = 1, *_mag: Any) -> tuple[float, ...]:
        """(size x, size y, RotationAndFlip, detector pixel um) of the one simulated camera, unbinned."""
        if int(camera) != 1:
            raise SEMerror(f"there is no active camera {int(camera)}; this scope has one")
        rows, cols = self.microscope.info().camera_shape_px
        return _floats(cols, rows, 0, 14.0)

    def _acquire(self, camera_set: str) -> None:
        if self.low_dose:
            self._go_to_area(AREA_OF_SET[camera_set], charged=False)
        parameters = self.camera_sets[camera_set]
        preset = self.presets[self.microscope.get_preset()]
        if parameters["binning"] != preset.binning:
            wanted = parameters["binning"]
            raise SEMerror(f"the simulated camera bins by {preset.binning} in {preset.name}, not {wanted}")
        exposure_s = float(parameters["exposure_s"])
        frame: Frame = (self.microscope.acquire_diffraction(exposure_s) if self.diffraction
                        else self.microscope.acquire(exposure_s))
        self.buffers = [frame.image, *self.buffers][: len(BUFFER_LETTERS)]

    @command("")
    def V(self) -> None:
        """Acquire with View parameters."""
        self._acquire("V")

    @command("")
    def F(self) -> None:
        """Acquire with Focus parameters."""
        self._acquire("F")

    @command("")
    def T(self) -> None:
        """Acquire with Trial parameters."""
        self._acquire("T")

    @command("")
    def R(self) -> None:
        """Acquire with Record parameters."""
        self._acquire("R")

    @command("")
    def L(self) -> None:
        """Acquire with Preview parameters."""
        self._acquire("P")

    @command("")
    def Search(self) -> None:
        """Acquire with Search parameters."""
        self._acquire("S")

    def bufferImage(self, buffer: str) -> memoryview:
        """The image of a buffer through the buffer protocol (read-only, 2-D, uint16 'H')."""
        if not isinstance(buffer, str):
            raise TypeError(f"bufferImage() argument 1 must be str, not {type(buffer).__name__}")
        self.require_link()
        if len(buffer) != 1 or buffer not in BUFFER_LETTERS:
            raise SEMmoduleError(f'"{buffer}" is not a valid buffer specification')
        index = BUFFER_LETTERS.index(buffer)
        if index >= len(self.buffers):
            raise SEMmoduleError(f"there is no image in buffer {buffer}")
        return memoryview(self.buffers[index])

    # autoloader -----------------------------------------------------------------------------------
    def _require_loader(self) -> Any:
        if not self.cassette:
            raise SEMerror("there is no autoloader on this scope")
        return self.microscope

    @command("I")
    def ReportSlotStatus(self, slot: int) -> float:
        """1 occupied, 0 empty (also the slot whose cartridge is on the stage), -1 unknown or error."""
        slots = self._require_loader().cassette_slots()
        if not 1 <= int(slot) <= len(slots):
            return _floats(-1.0)
        state = slots[int(slot) - 1].state
        return _floats({"occupied": 1.0, "empty": 0.0, "loaded": 0.0}.get(state, -1.0))

    @command("I")
    def LoadCartridge(self, slot: int) -> None:
        """Load the cartridge of a slot (the simulated autoloader charges the exchange)."""
        self._require_loader().load_grid(int(slot))


class SerialEMEmulator(_EmulatedCameraAndLoader):
    """The state of an emulated SerialEM over `microscope` (see the module doc); its commands are the methods
    marked with `command`."""

    def __init__(
        self,
        microscope: Microscope,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        low_dose_areas: Mapping[str, str] | None = None,
        diffraction_areas: Iterable[str] = (),
    ) -> None:
        self.microscope = microscope
        self.address = (str(host), int(port))
        info = microscope.info()
        self.presets = {p.name: p for p in info.presets}
        by_mag = sorted(info.presets, key=lambda p: p.magnification)
        self.mag_indexes = {index: p.name for index, p in enumerate(by_mag, start=1)}
        self.low_dose_areas = dict(low_dose_areas or {})
        self.diffraction_areas = frozenset(diffraction_areas)
        for area, preset in self.low_dose_areas.items():
            if area not in AREA_NUMBERS or preset not in self.presets or area in self.diffraction_areas:
                raise ValueError(f"low dose area {area!r} -> {preset!r}: not an imaging area over a known preset")
        if not self.diffraction_areas <= set(AREA_NUMBERS):
            raise ValueError(f"diffraction areas must be among {', '.join(AREA_NUMBERS)}")
        self.connected = False
        self.low_dose = False
        self.area: str | None = None
        self.diffraction = False
        self.camera_sets = {s: {"exposure_s": 1.0, "binning": 1} for s in "VFTRPSM"}
        self.buffers: list[np.ndarray] = []
        self.spot_size = 1
        self.defocus_um = 0.0
        self.cassette = cassette_slot_count(microscope, info) > 0

    def require_link(self) -> None:
        """Before ConnectToSEM a command connects to the default address, as the real module does (PySEMSocket.cpp:
        `PY_SERIALEM_IP` / `PY_SERIALEM_PORT` from the environment, else 127.0.0.1 and 48888); `SEMmoduleError`
        when SerialEM does not listen there."""
        if not self.connected:
            port = int(os.environ.get("PY_SERIALEM_PORT", DEFAULT_PORT))
            self._connect(os.environ.get("PY_SERIALEM_IP", "127.0.0.1"), port)

    def _connect(self, ip: str, port: int) -> None:
        if (ip, port) != self.address:
            # the message of the real module's socket (PySEMSocket::OpenServerSocket), 111: connection refused
            raise SEMmoduleError(f"PySEMSocket: Error connecting to Server socket at IP {ip} on port {port} (111)")
        self.connected = True

    def config(self, low_dose: bool = False, **fields: Any) -> SerialEMConfig:
        """A `drivers.serialem_adapter.SerialEMConfig` for this emulator: every preset of the microscope with its
        figures, by magnification index, or (`low_dose`) by the Low Dose areas that image it, with the first
        diffraction area (else the camera length index 1) for diffraction."""
        info = self.microscope.info()
        areas = {preset: area for area, preset in self.low_dose_areas.items()}
        index_of = {name: index for index, name in self.mag_indexes.items()}
        presets = []
        for optics in info.presets:
            way: dict[str, Any] = {"magnification_index": index_of[optics.name]}
            if low_dose and optics.name in areas:
                way = {"low_dose_area": areas[optics.name]}
            diffraction: dict[str, Any] = {}
            if optics.camera_length_mm is not None:
                first = sorted(self.diffraction_areas)[:1]
                diffraction = {"diffraction_area": first[0]} if low_dose and first else {"camera_length_index": 1}
            presets.append(SerialEMPreset(
                name=optics.name, magnification=optics.magnification, pixel_size_um=optics.pixel_size_um,
                binning=optics.binning, defocus_um=optics.defocus_um, camera_length_mm=optics.camera_length_mm,
                **way, **diffraction,
            ))
        values: dict[str, Any] = {
            "host": self.address[0], "port": self.address[1], "presets": tuple(presets), "simulated": info.simulated,
            "instrument_name": f"SerialEM emulator ({info.name})", "stage_limits": info.stage_limits,
            "image_shift_limit_um": info.image_shift_limit_um, "cassette_slots": info.cassette_slots,
        }
        return SerialEMConfig(**{**values, **fields})

    # link and clock -------------------------------------------------------------------------------
    def ConnectToSEM(self, *args: Any) -> None:
        """Attach (keys `|is`: port, ip); `SEMmoduleError` unless SerialEM listens at that address."""
        _check_args("ConnectToSEM", "is", args)
        port = int(args[0]) if args and args[0] else int(os.environ.get("PY_SERIALEM_PORT", DEFAULT_PORT))
        ip = args[1] if len(args) > 1 else os.environ.get("PY_SERIALEM_IP", "127.0.0.1")
        if port <= 0:
            raise SEMmoduleError("The port number must be positive")
        self._connect(ip, port)

    @command("")
    def ReportTickTime(self) -> float:
        """Seconds since SerialEM started: the simulated clock."""
        return _floats(self.microscope.microscope_time_s())

    @command("D")
    def ElapsedTickTime(self, tick_s: float) -> float:
        """Seconds since the tick time `tick_s` (a ReportTickTime value)."""
        return _floats(self.microscope.microscope_time_s() - float(tick_s))

    # stage ----------------------------------------------------------------------------------------
    @command("")
    def ReportStageXYZ(self) -> tuple[float, ...]:
        """(x, y, z) in um."""
        stage = self.microscope.get_stage()
        return _floats(stage.x_um, stage.y_um, stage.z_um)

    @command("")
    def ReportTiltAngle(self) -> float:
        """Tilt in degrees."""
        return _floats(self.microscope.get_stage().alpha_deg)

    @command("")
    def ReportStageBusy(self) -> float:
        """1 while the stage moves, else 0 (a status poll on the clock)."""
        return _floats(1.0 if self.microscope.is_stage_moving() else 0.0)

    @command("DDd")
    def MoveStageTo(self, x_um: float, y_um: float, z_um: float | None = None) -> None:
        """Move to (x, y[, z]) um and return when the stage has stopped."""
        self.microscope.move_stage(x_um=float(x_um), y_um=float(y_um), z_um=None if z_um is None else float(z_um))

    @command("Didd")
    def TiltTo(self, alpha_deg: float, *_restore: Any) -> None:
        """Tilt to the angle (deg); the optional restore entries are not emulated."""
        self.microscope.move_stage(alpha_deg=float(alpha_deg))

    # optics ---------------------------------------------------------------------------------------
    def _go_to_preset(self, name: str, charged: bool) -> None:
        """Image in preset `name`: leaving diffraction into the preset it was taken in is free (see the module
        doc); otherwise `charged` says whether this is a command to the scope (set_preset charges it)."""
        same = name == self.microscope.get_preset()
        if self.diffraction and same:
            self.diffraction = False
            return
        self.diffraction = False
        if charged or not same:
            self.microscope.set_preset(name)

    @command("I")
    def SetMagIndex(self, index: int) -> None:
        """Magnification index -> the preset of that index (imaging)."""
        if int(index) not in self.mag_indexes:
            raise SEMerror(f"magnification index {int(index)} is not in this scope's table 1-{len(self.mag_indexes)}")
        self._go_to_preset(self.mag_indexes[int(index)], charged=True)

    def _index(self) -> int:
        current = self.microscope.get_preset()
        return next(index for index, name in self.mag_indexes.items() if name == current)

    @command("")
    def ReportMagIndex(self) -> tuple[float, ...]:
        """(index, 1 if low mag)."""
        magnification = self.presets[self.microscope.get_preset()].magnification
        return _floats(self._index(), magnification < LOW_MAG_BELOW)

    @command("")
    def ReportMag(self) -> tuple[float, ...]:
        """(magnification, 1 if low mag)."""
        magnification = self.presets[self.microscope.get_preset()].magnification
        return _floats(magnification, magnification < LOW_MAG_BELOW)

    @command("I")
    def SetCamLenIndex(self, index: int) -> None:
        """Into diffraction at the current preset's camera length (one per preset here)."""
        if int(index) < 1:
            raise SEMerror(f"camera length index {int(index)} is not valid")
        if self.presets[self.microscope.get_preset()].camera_length_mm is None:
            raise SEMerror("this simulated preset has no diffraction camera length")
        self.diffraction = True

    @command("")
    def ReportCameraLength(self) -> float:
        """Camera length in metres, 0 in imaging."""
        length_mm = self.presets[self.microscope.get_preset()].camera_length_mm
        return _floats(length_mm / 1000.0 if self.diffraction and length_mm else 0.0)

    @command("I")
    def SetLowDoseMode(self, on: int) -> float:
        """Low Dose on or off; reports the previous state."""
        previous, self.low_dose = self.low_dose, bool(on)
        if not self.low_dose:
            self.area = None
        return _floats(previous)

    @command("")
    def ReportLowDose(self) -> tuple[float, ...]:
        """(1 if Low Dose is on, number of the current area or -1)."""
        return _floats(self.low_dose, AREA_NUMBERS.get(self.area or "", -1))

    def _go_to_area(self, area: str, charged: bool) -> None:
        if area not in AREA_NUMBERS:
            raise SEMerror(f"low dose area must be one of V, F, T, R, S, not {area!r}")
        if not self.low_dose:
            raise SEMerror("Low Dose mode is off")
        if area in self.diffraction_areas:
            if self.presets[self.microscope.get_preset()].camera_length_mm is None:
                raise SEMerror("this simulated preset has no diffraction camera length")
            self.diffraction, self.area = True, area
            return
        if area not in self.low_dose_areas:
            raise SEMerror(f"Low Dose area {area} is not set up")
        self._go_to_preset(self.low_dose_areas[area], charged=charged or self.area != area)
        self.area = area

    @command("S")
    def GoToLowDoseArea(self, area: str) -> None:
        """Go to a Low Dose area (V, F, T, R, S)."""
        self._go_to_area(area, charged=True)

    @command("I")
    def SetSpotSize(self, spot: int) -> None:
        """Kept only: the simulated optics take their illumination from the preset."""
        self.spot_size = int(spot)

    @command("D")
    def SetDefocus(self, defocus_um: float) -> None:
        """Kept only: the simulated optics take their defocus from the preset."""
        self.defocus_um = float(defocus_um)

    @command("I")
    def SetBeamBlank(self, on: int) -> None:
        """Blank (1) or unblank (0)."""
        self.microscope.set_beam_blanked(bool(on))

    @command("")
    def ReportSpecimenShift(self) -> tuple[float, ...]:
        """Image shift in um (specimen axes: here the stage axes)."""
        get = getattr(self.microscope, "get_image_shift", None)
        x_um, y_um = get() if callable(get) else (0.0, 0.0)
        return _floats(x_um, y_um)

    @command("DDdi")
    def ImageShiftByMicrons(self, dx_um: float, dy_um: float, *_settling: Any) -> None:
        """Change the image shift by (dx, dy) um on the specimen."""
        x_um, y_um = self.ReportSpecimenShift()
        set_shift = getattr(self.microscope, "set_image_shift", None)
        if not callable(set_shift):
            raise SEMerror("image shift is not available on this simulated microscope")
        set_shift(x_um + float(dx_um), y_um + float(dy_um))


def make_serialem_module(
    microscope: Microscope,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    low_dose_areas: Mapping[str, str] | None = None,
    diffraction_areas: Iterable[str] = (),
) -> types.SimpleNamespace:
    """A module-like stand-in for `serialem` over `microscope`, listening at `host`:`port` (see the module doc).

    Besides the commands it has `SEMerror`, `SEMmoduleError`, `SEMexited`, `bufferImage` and, for tests and the
    bridge command, `emulator` (the `SerialEMEmulator`; `emulator.config()` is a matching adapter config)."""
    emulator = SerialEMEmulator(microscope, host, port, low_dose_areas, diffraction_areas)
    functions = {
        name: getattr(emulator, name)
        for name in dir(type(emulator))
        if hasattr(getattr(type(emulator), name), "serialem_keys")
    }
    return types.SimpleNamespace(
        __name__="serialem_emulator", ConnectToSEM=emulator.ConnectToSEM, bufferImage=emulator.bufferImage,
        SEMerror=SEMerror, SEMmoduleError=SEMmoduleError, SEMexited=SEMexited, emulator=emulator, **functions,
    )
