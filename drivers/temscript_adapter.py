"""A `drivers.base.Microscope` over `temscript` (Thermo Fisher / FEI TEM Scripting), for the bridge.

Install with `pip install 'crystal-locator[temscript]'`. On the microscope PC use
`create_temscript_microscope("local", config)`; `"null"` uses temscript's `NullMicroscope`, which runs
anywhere (no instrument, all-zero images) and is what the tests use; `"remote"` talks to a
`temscript` server (`RemoteMicroscope`).

Units are converted here, at the edge: temscript speaks metres and radians, this adapter micrometres
and degrees. Optics presets are not something TEM Scripting knows: a small `TemscriptConfig` maps each
preset name to a magnification index, spot size, defocus and camera binning (and, for
`acquire_diffraction`, the magnification index that selects the camera length in diffraction mode).
Example (JSON, load with `TemscriptConfig.from_file`):

    {"camera": "BM-Ceta", "presets": [
        {"name": "atlas", "magnification_index": 3, "magnification": 135, "pixel_size_um": 0.52, "binning": 2},
        {"name": "exposure", "magnification_index": 24, "magnification": 19500, "pixel_size_um": 0.0036,
         "diffraction_index": 12, "camera_length_mm": 830}]}

Threads: TEM Scripting is COM; a COM object must be used from the thread that created it. With
`per_thread=True` (used for "local") every calling thread gets its own instrument object from the
factory, so the bridge may read the stage from one thread while another waits for a move.

Autoloader (the optional `drivers.base.CassetteMicroscope` capability), off unless the config says
`"autoloader": true`. It maps to TEM Scripting's `Instrument.AutoLoader` object (TEM Scripting manual,
"TEM.Basic" for Titan 2.6 / Talos 1.6 / Tecnai 5.6: the AutoLoader object; the same names in temscript's COM
wrapper `_instrument_com.AutoLoader` of the azazellochg/temscript fork, in Leginon's `fei.py` and in
pytemscript's `Autoloader`): `AutoLoaderAvailable` (bool), `NumberOfCassetteSlots` (long),
`SlotStatus(slot)` (1-based slot -> CassetteSlotStatus: 0 Unknown, 1 Occupied, 2 Empty, 3 Error),
`LoadCartridge(slot)` (puts the cartridge of that slot on the stage), `UnloadCartridge()` (puts the
cartridge on the stage back into its slot) and `PerformCassetteInventory()` (scans the cassette; run it with
`TemscriptMicroscope.cassette_inventory()`, slots read `unknown` until then). TEM Scripting does not say which
slot is on the stage: the adapter remembers the slot it loaded (None at start, or `autoloader_loaded_slot`).
niermann's temscript 2.x does not wrap the AutoLoader; the adapter takes it from the instrument's COM object
(`_tem_instrument.AutoLoader`, present in the fork) or from an `autoloader_factory` you pass.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from drivers.adapter_config import AdapterConfig
from drivers.base import (
    AcquisitionError,
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

_UM_PER_M = 1e6


class TemscriptUnavailableError(MicroscopeError):
    """The `temscript` package is not installed (or its instrument could not be reached)."""


class TemscriptPreset(BaseModel):
    """One optics preset as TEM Scripting settings. `pixel_size_um` is per camera pixel after binning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    magnification_index: int = Field(ge=0)
    magnification: float = Field(gt=0, description="nominal magnification, for metadata")
    pixel_size_um: float = Field(gt=0)
    binning: int = Field(default=1, ge=1)
    spot_size: int | None = Field(default=None, ge=1, le=11)
    defocus_um: float | None = None
    diffraction_index: int | None = Field(default=None, ge=0, description="magnification index in diffraction")
    camera_length_mm: float | None = Field(default=None, gt=0)

    def as_optics_preset(self) -> OpticsPreset:
        """The `drivers.base.OpticsPreset` the agent sees."""
        return OpticsPreset(
            name=self.name,
            magnification=self.magnification,
            pixel_size_um=self.pixel_size_um,
            binning=self.binning,
            defocus_um=self.defocus_um or 0.0,
            spot_size=self.spot_size or 1,
            camera_length_mm=self.camera_length_mm,
        )


class TemscriptConfig(AdapterConfig):
    """Which camera to use and how preset names map to TEM Scripting settings."""

    ADAPTER: ClassVar[str] = "temscript"

    camera: str = "CCD"
    presets: tuple[TemscriptPreset, ...] = Field(min_length=1)
    instrument_name: str = "temscript"
    max_exposure_s: float = Field(default=60.0, gt=0)
    int16_images: Literal["clip", "reinterpret"] = Field(
        default="clip",
        description="signed 16-bit camera data: clip negatives to 0, or reinterpret the bits as uint16",
    )
    image_shift_limit_um: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description=(
            "largest image shift per axis (specimen um) the agent may use instead of a stage move; 0 (default) "
            "turns the capability off. Set it only after checking `image_shift_matrix` on the instrument"
        ),
    )
    image_shift_matrix: tuple[tuple[float, float], tuple[float, float]] = Field(
        default=((1.0, 0.0), (0.0, 1.0)),
        description=(
            "TEM Scripting's Projection.ImageShift (um, i.e. its metres x 1e6) per specimen um along the stage "
            "axes; identity trusts the microscope's own image-shift calibration"
        ),
    )

    autoloader: bool = Field(
        default=False,
        description="serve the autoloader (TEM Scripting's AutoLoader) as the cassette capability; off by default",
    )
    autoloader_loaded_slot: int | None = Field(
        default=None, ge=1, description="the cassette slot whose grid is on the stage when the adapter starts"
    )


#: A config for temscript's NullMicroscope (2048 px CCD), used by tests and `bridge serve --adapter temscript-null`.
NULL_CONFIG = TemscriptConfig(
    camera="CCD",
    instrument_name="temscript NullMicroscope",
    presets=(
        TemscriptPreset(name="atlas", magnification_index=2, magnification=150, pixel_size_um=0.4, binning=4),
        TemscriptPreset(name="search", magnification_index=10, magnification=2500, pixel_size_um=0.02, binning=2),
        TemscriptPreset(
            name="exposure", magnification_index=20, magnification=20000, pixel_size_um=0.0012, binning=1,
            diffraction_index=8, camera_length_mm=800.0,
        ),
    ),
)


def _import_temscript() -> Any:
    try:
        import temscript
    except ImportError as exc:
        raise TemscriptUnavailableError(
            "the temscript package is not installed; install it with `pip install 'crystal-locator[temscript]'`"
        ) from exc
    return temscript


#: TEM Scripting's CassetteSlotStatus -> `drivers.base.CassetteSlot.state` (Error: the autoloader could not tell).
SLOT_STATES: dict[int, Literal["occupied", "empty", "unknown"]] = {
    0: "unknown", 1: "occupied", 2: "empty", 3: "unknown",
}


def default_autoloader(instrument: Any) -> Any:
    """TEM Scripting's AutoLoader object behind a temscript microscope (its COM `Instrument.AutoLoader`);
    `TemscriptUnavailableError` when this temscript does not reach it (pass `autoloader_factory` then)."""
    autoloader = getattr(getattr(instrument, "_tem_instrument", None), "AutoLoader", None)
    if autoloader is None:
        raise TemscriptUnavailableError(
            "this temscript gives no access to TEM Scripting's AutoLoader; create the adapter with an "
            "autoloader_factory (e.g. win32com Dispatch('TEMScripting.Instrument.1').AutoLoader) or turn "
            "`autoloader` off in the config"
        )
    return autoloader


class TemscriptAutoloader:
    """The cassette capability over TEM Scripting's AutoLoader (names in the module docstring).

    `autoloader(instrument)` gives the AutoLoader object for the calling thread's temscript instrument."""

    def __init__(self, autoloader: Callable[[Any], Any], loaded_slot: int | None = None) -> None:
        self._autoloader = autoloader
        self._loaded = loaded_slot
        self._lock = threading.Lock()

    def slot_count(self, instrument: Any) -> int:
        """NumberOfCassetteSlots, 0 when AutoLoaderAvailable is false (e.g. a side-entry holder)."""
        loader = self._autoloader(instrument)
        return int(loader.NumberOfCassetteSlots) if bool(loader.AutoLoaderAvailable) else 0

    def slots(self, instrument: Any) -> tuple[CassetteSlot, ...]:
        """Every slot's SlotStatus (the last inventory); the slot this adapter loaded reads `loaded`."""
        loader = self._autoloader(instrument)
        count = self.slot_count(instrument)
        states = [SLOT_STATES.get(int(loader.SlotStatus(n)), "unknown") for n in range(1, count + 1)]
        return tuple(CassetteSlot(slot=n, state="loaded" if n == self._loaded else state)
                     for n, state in enumerate(states, start=1))

    def loaded_slot(self) -> int | None:
        """The slot this adapter last loaded (TEM Scripting cannot tell), None when none."""
        return self._loaded

    def load(self, instrument: Any, slot: int) -> None:
        """UnloadCartridge (if a grid is on the stage), then LoadCartridge(slot); see `CassetteMicroscope`."""
        slot = check_slot(slot, self.slot_count(instrument))
        loader = self._autoloader(instrument)
        with self._lock:
            if slot == self._loaded:
                return
            if int(loader.SlotStatus(slot)) == 2:
                raise GridLoadError(f"cassette slot {slot} is empty (by the last inventory); choose another slot")
            try:
                if self._loaded is not None:
                    self._loaded = None  # from here on the stage may hold no grid
                    loader.UnloadCartridge()
                loader.LoadCartridge(slot)
            except Exception as exc:
                raise GridLoadError(f"the autoloader could not load slot {slot}: {exc}") from exc
            self._loaded = slot

    def inventory(self, instrument: Any) -> None:
        """PerformCassetteInventory: scan the cassette so that SlotStatus tells occupied from empty."""
        try:
            self._autoloader(instrument).PerformCassetteInventory()
        except Exception as exc:
            raise MicroscopeError(f"the cassette inventory failed: {exc}") from exc


def create_temscript_microscope(
    kind: Literal["local", "null", "remote"] = "local",
    config: TemscriptConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
) -> TemscriptMicroscope:
    """A `TemscriptMicroscope` on the local instrument (COM), a `NullMicroscope`, or a temscript server."""
    temscript = _import_temscript()
    if kind == "local":
        if config is None:
            raise InvalidParameterError("a real instrument needs a TemscriptConfig (presets -> magnification indices)")
        return TemscriptMicroscope(temscript.Microscope, config, per_thread=True)
    if kind == "null":
        instrument = temscript.NullMicroscope(wait_exposure=True)
        return TemscriptMicroscope(lambda: instrument, config or NULL_CONFIG)
    if kind == "remote":
        if config is None:
            raise InvalidParameterError("a remote instrument needs a TemscriptConfig (presets -> magnification index)")
        remote = temscript.RemoteMicroscope((host, int(port)))
        return TemscriptMicroscope(lambda: remote, config)
    raise InvalidParameterError(f"unknown temscript kind {kind!r}; use local, null or remote")


class TemscriptMicroscope:
    """`drivers.base.Microscope` over a temscript `BaseMicroscope` (see the module docstring)."""

    def __init__(
        self, instrument_factory: Callable[[], Any], config: TemscriptConfig, *, per_thread: bool = False,
        autoloader_factory: Callable[[Any], Any] = default_autoloader,
    ) -> None:
        self._factory = instrument_factory
        self._per_thread = per_thread
        self._local = threading.local()
        self._shared: Any = None if per_thread else instrument_factory()
        self.config = config
        self._start_s = time.monotonic()
        self._lock = threading.Lock()
        self._preset_name: str | None = None
        self._move_thread: threading.Thread | None = None
        self._move_error: BaseException | None = None
        self._image_shift_xy_um = (0.0, 0.0)
        self.autoloader = (TemscriptAutoloader(autoloader_factory, config.autoloader_loaded_slot)
                           if config.autoloader else None)

    @property
    def instrument(self) -> Any:
        """The temscript microscope object for the calling thread."""
        if not self._per_thread:
            return self._shared
        instrument = getattr(self._local, "instrument", None)
        if instrument is None:
            instrument = self._factory()
            self._local.instrument = instrument
        return instrument

    # info -----------------------------------------------------------------------------------------
    def info(self) -> MicroscopeInfo:
        """Name, camera shape (rows, cols), presets, stage limits (um, deg) and software version."""
        instrument = self.instrument
        try:
            camera = instrument.get_cameras()[self.config.camera]
            family = instrument.get_family()
        except KeyError:
            raise AcquisitionError(
                f"camera {self.config.camera!r} not found; the instrument has: {', '.join(instrument.get_cameras())}"
            ) from None
        temscript = _import_temscript()
        return MicroscopeInfo(
            name=f"{self.config.instrument_name} ({family})",
            camera_shape_px=(int(camera["height"]), int(camera["width"])),
            presets=tuple(p.as_optics_preset() for p in self.config.presets),
            stage_limits=self.stage_limits(),
            software_version=f"temscript {temscript.version}",
            simulated=family == "NULL",
            image_shift_limit_um=self.config.image_shift_limit_um,
            cassette_slots=0 if self.autoloader is None else self.autoloader.slot_count(instrument),
        )

    def microscope_time_s(self) -> float:
        """Wall-clock seconds since the adapter was created."""
        return time.monotonic() - self._start_s

    # stage ----------------------------------------------------------------------------------------
    def get_stage(self) -> StagePosition:
        """Stage position: temscript metres/radians converted to um/deg."""
        pos = self.instrument.get_stage_position()
        return StagePosition(
            x_um=float(pos.get("x", 0.0)) * _UM_PER_M,
            y_um=float(pos.get("y", 0.0)) * _UM_PER_M,
            z_um=float(pos.get("z", 0.0)) * _UM_PER_M,
            alpha_deg=math.degrees(float(pos.get("a", 0.0))),
        )

    def stage_limits(self) -> StageLimits:
        """Travel limits from the instrument (m, rad) in um and degrees."""
        limits = self.instrument.get_stage_limits()
        return StageLimits(
            x_min_um=limits["x"][0] * _UM_PER_M,
            x_max_um=limits["x"][1] * _UM_PER_M,
            y_min_um=limits["y"][0] * _UM_PER_M,
            y_max_um=limits["y"][1] * _UM_PER_M,
            z_min_um=limits["z"][0] * _UM_PER_M,
            z_max_um=limits["z"][1] * _UM_PER_M,
            alpha_min_deg=math.degrees(limits["a"][0]),
            alpha_max_deg=math.degrees(limits["a"][1]),
        )

    def move_stage(
        self,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        alpha_deg: float | None = None,
        wait: bool = True,
    ) -> None:
        """Absolute move; limits checked before anything moves. `wait=False` moves in a background thread."""
        resolve_stage_target(self.get_stage(), self.stage_limits(), x_um, y_um, z_um, alpha_deg)
        pos: dict[str, float] = {}
        for key, value in (("x", x_um), ("y", y_um), ("z", z_um)):
            if value is not None:
                pos[key] = value / _UM_PER_M
        if alpha_deg is not None:
            pos["a"] = math.radians(alpha_deg)
        if not pos:
            return
        with self._lock:
            if self._move_thread is not None and self._move_thread.is_alive():
                raise StageMoveError("a stage move is in progress; wait_for_stage() before starting another")
            self._move_error = None
            if wait:
                self._go(pos)
                return
            self._move_thread = threading.Thread(target=self._go_background, args=(pos,), daemon=True)
            self._move_thread.start()

    def _go(self, pos: dict[str, float]) -> None:
        try:
            self.instrument.set_stage_position(pos)
        except Exception as exc:
            raise StageMoveError(f"the stage move to {pos} (m, rad) failed: {exc}") from exc

    def _go_background(self, pos: dict[str, float]) -> None:
        try:
            self._go(pos)
        except StageMoveError as exc:
            self._move_error = exc

    def is_stage_moving(self) -> bool:
        """True while a background move runs or the instrument reports GOING/MOVING."""
        thread = self._move_thread
        if thread is not None and thread.is_alive():
            return True
        return str(self.instrument.get_stage_status()) in ("GOING", "MOVING")

    def wait_for_stage(self, timeout_s: float = 60.0) -> None:
        """Wait until the stage is still; `StageMoveError` after `timeout_s` or if the move failed."""
        deadline = time.monotonic() + timeout_s
        thread = self._move_thread
        if thread is not None:
            thread.join(max(0.0, timeout_s))
        while self.is_stage_moving():
            if time.monotonic() > deadline:
                raise StageMoveError(f"the stage has not settled after {timeout_s} s; check the instrument")
            time.sleep(0.05)
        if self._move_error is not None:
            error, self._move_error = self._move_error, None
            raise StageMoveError(str(error))

    def stop_stage(self) -> None:
        """TEM Scripting has no stop command: a no-op when still, `StageMoveError` while moving."""
        if self.is_stage_moving():
            raise StageMoveError("temscript cannot stop a stage move; use the stage controls on the microscope PC")

    # optics ---------------------------------------------------------------------------------------
    def get_preset(self) -> str:
        """The last preset applied, else the first whose magnification index matches the instrument, else ''."""
        if self._preset_name is not None:
            return self._preset_name
        index = self.instrument.get_magnification_index()
        for preset in self.config.presets:
            if preset.magnification_index == index:
                return preset.name
        return ""

    def set_preset(self, name: str) -> None:
        """Apply magnification index, spot size and defocus (um -> m) of the preset `name`."""
        preset = self.config.preset(name)
        instrument = self.instrument
        try:
            instrument.set_projection_mode("IMAGING")
            instrument.set_magnification_index(preset.magnification_index)
            if preset.spot_size is not None:
                instrument.set_spot_size_index(preset.spot_size)
            if preset.defocus_um is not None:
                instrument.set_defocus(preset.defocus_um / _UM_PER_M)
        except Exception as exc:
            raise PresetError(f"could not apply preset {name!r}: {exc}") from exc
        self._preset_name = name

    def set_beam_blanked(self, blanked: bool) -> None:
        """Blank or unblank the beam."""
        self.instrument.set_beam_blanked(bool(blanked))

    def is_beam_blanked(self) -> bool:
        """True if the beam is blanked."""
        return bool(self.instrument.get_beam_blanked())

    def get_image_shift(self) -> tuple[float, float]:
        """The image shift (x_um, y_um, specimen um along the stage axes) read back from Projection.ImageShift."""
        raw = self.instrument.get_image_shift()  # temscript: (x, y) in metres
        instrument_um = np.array([float(raw[0]), float(raw[1])]) * _UM_PER_M
        x_um, y_um = np.linalg.solve(np.array(self.config.image_shift_matrix), instrument_um)
        return (float(x_um), float(y_um))

    def set_image_shift(self, x_um: float, y_um: float) -> None:
        """Set Projection.ImageShift so that the view moves by (x_um, y_um) on the specimen; beyond
        `image_shift_limit_um` (or with the capability off) `InvalidParameterError`."""
        if self.config.image_shift_limit_um <= 0:
            raise InvalidParameterError("image shift is off for this instrument (config image_shift_limit_um=0)")
        shift = check_image_shift_um(x_um, y_um, self.config.image_shift_limit_um)
        instrument_um = np.array(self.config.image_shift_matrix) @ np.array(shift)
        try:
            self.instrument.set_image_shift((float(instrument_um[0]) / _UM_PER_M, float(instrument_um[1]) / _UM_PER_M))
        except Exception as exc:
            raise MicroscopeError(f"setting the image shift to {shift} um failed: {exc}") from exc
        self._image_shift_xy_um = shift

    # autoloader (off unless the config enables it) -------------------------------------------------
    def _loader(self) -> TemscriptAutoloader:
        if self.autoloader is None:
            raise MicroscopeError("the autoloader is off for this instrument (config autoloader=false)")
        return self.autoloader

    def cassette_slots(self) -> tuple[CassetteSlot, ...]:
        """Every cassette slot by TEM Scripting's SlotStatus (the last inventory)."""
        return self._loader().slots(self.instrument)

    def loaded_slot(self) -> int | None:
        """The slot this adapter loaded last, None when none."""
        return self._loader().loaded_slot()

    def load_grid(self, slot: int) -> None:
        """Unload the grid on the stage (UnloadCartridge), load `slot`'s (LoadCartridge). Minutes."""
        self._loader().load(self.instrument, slot)

    def cassette_inventory(self) -> None:
        """Scan the cassette (PerformCassetteInventory); not part of the protocol."""
        self._loader().inventory(self.instrument)

    # camera ---------------------------------------------------------------------------------------
    def _current_preset(self) -> TemscriptPreset:
        name = self.get_preset()
        if not name:
            raise PresetError("no optics preset is active; call set_preset() first")
        return self.config.preset(name)

    def _expose(self, exposure_s: float, preset: TemscriptPreset) -> np.ndarray:
        instrument = self.instrument
        camera = self.config.camera
        try:
            instrument.set_camera_param(camera, {"exposure(s)": exposure_s, "binning": preset.binning})
            images = instrument.acquire(camera)
            raw = np.asarray(images[camera])
        except Exception as exc:
            raise AcquisitionError(f"camera {camera!r} did not deliver a frame: {exc}") from exc
        if raw.ndim != 2:
            raise AcquisitionError(f"camera {camera!r} returned an array of shape {raw.shape}, expected 2-D")
        if raw.dtype == np.uint16:
            return raw
        if raw.dtype == np.int16 and self.config.int16_images == "reinterpret":
            return raw.view(np.uint16)
        return np.clip(raw, 0, 65535).astype(np.uint16)

    def _frame(self, image: np.ndarray, preset: TemscriptPreset, exposure_s: float, kind: str) -> Frame:
        extra: dict[str, Any] = {"magnification_index": preset.magnification_index, "camera": self.config.camera}
        if kind == "diffraction":
            extra["diffraction_index"] = preset.diffraction_index
        metadata = FrameMetadata(
            kind="diffraction" if kind == "diffraction" else "image",
            preset=preset.name,
            magnification=preset.magnification,
            pixel_size_um=preset.pixel_size_um,
            binning=preset.binning,
            stage=self.get_stage(),
            exposure_s=exposure_s,
            time_s=self.microscope_time_s(),
            instrument=self.config.instrument_name,
            image_shift_xy_um=self._image_shift_xy_um,
            extra=extra,
        )
        return Frame(image=image, metadata=metadata)

    def acquire(self, exposure_s: float) -> Frame:
        """An image of `exposure_s` seconds with the active preset's binning, as uint16."""
        exposure_s = check_exposure_s(exposure_s, self.config.max_exposure_s)
        preset = self._current_preset()
        return self._frame(self._expose(exposure_s, preset), preset, exposure_s, "image")

    def acquire_diffraction(self, exposure_s: float) -> Frame:
        """Switch to diffraction at the preset's `diffraction_index`, expose, and always return to imaging."""
        exposure_s = check_exposure_s(exposure_s, self.config.max_exposure_s)
        preset = self._current_preset()
        if preset.diffraction_index is None:
            raise PresetError(f"preset {preset.name!r} has no diffraction_index; add one to the temscript config")
        instrument = self.instrument
        try:
            instrument.set_projection_mode("DIFFRACTION")
            instrument.set_magnification_index(preset.diffraction_index)
            image = self._expose(exposure_s, preset)
        finally:
            instrument.set_projection_mode("IMAGING")
            instrument.set_magnification_index(preset.magnification_index)
        return self._frame(image, preset, exposure_s, "diffraction")
