"""`SimulatedMicroscope`: a `drivers.base.Microscope` over a procedural specimen or dataset tiles.

Default optics presets (camera 2048 x 2048 sensor, 14-um pixels; magnification = 14 um x binning /
pixel size, i.e. at the camera):

| preset     | um/px   | bin | frame (2k) | field of view      | mag    | defocus | diffraction beam |
|------------|---------|-----|------------|--------------------|--------|---------|------------------|
| `overview` | 1.6 (*) | 1   | 2048 px    | 3.3 mm: the grid   | ~9x    | 0       | 10 um            |
| `atlas`    | 0.3     | 1   | 2048 px    | 614 um: ~5x5 sq.   | ~47x   | -50 um  | 5 um             |
| `search`   | 0.04    | 1   | 2048 px    | 82 um: < 1 square  | ~350x  | -10 um  | 3 um             |
| `exposure` | 0.005   | 2   | 1024 px    | 5 um: one crystal  | ~5600x | -2 um   | 2 um (SA aper.)  |

(*) `overview` is scaled so that the whole 3.05 mm grid fits in one frame for any camera size. The
other presets keep their pixel size whatever the camera shape (their field of view scales with it).
Diffraction uses camera length 1000 mm (200 kV).

Every preset has a hidden rotation between camera and stage axes (a few degrees, differing a little
between presets) and a 1-3 % pixel-size error, seeded by the instrument (`instrument_seed`, default 0; the
instrument is named `simulated-tem`, or `simulated-tem-<n>` for seed n), not by the specimen seed;
`true_image_to_stage_matrix(preset)` exposes the true A for tests only. The agent must calibrate A itself.

Time on the virtual clock (`microscope_time_s()`) follows a timing profile (`clock_profile`, default
`thermo-serialem`; `simulator.timing` has the figures and their sources): stage moves (command overhead +
trapezoidal motion); settling once before the next exposure, not after every move; lens normalisation
before the next exposure after a preset change that changes the magnification; the diffraction switch
before the snapshot and again before the next image; camera start + exposure + return per frame; beam
blank; status polls. Delays before an exposure overlap with whatever happens meanwhile.

Image shift (`set_image_shift`, the optional capability of `drivers.base.ImageShiftMicroscope`) moves the
imaged and illuminated area off the stage position by up to `image_shift_limit_um` per axis (default 15 um,
no published figure), with a 1 % gain error of the instrument's image-shift calibration; it costs the
command overhead and `image_shift_s` before the next exposure.

Beam intensity drift (`beam_drift_fraction`, default 0: off): each image exposure gets the dose times
1 + fraction x a normal draw keyed by the frame, so neighbouring frames of an atlas montage differ in
brightness by a few percent (`simulator.conditions`; the size is a guess).

Stage z (height off the eucentric plane) adds to the preset's defocus: images blur by |defocus + z| x
1 mrad. Limits of the model: alpha (tilt) is tracked, limited and timed but does not change the image
(no foreshortening); a frame taken while the stage moves shows the position at the start of the
exposure (no motion blur).

Randomness after the specimen is made (frame noise, the stage's repeat error) is keyed by what was
acquired or moved and when, not drawn in call order (`simulator.keyed` says why): a simulator created
with `start_time_s`, `start_stage` and `initial_preset` of a killed session's last checkpoint redoes the
cut step exactly as the first simulator did.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import simulator
from drivers.base import (
    AcquisitionTimeout,
    Frame,
    FrameMetadata,
    InvalidParameterError,
    MicroscopeInfo,
    OpticsPreset,
    PresetError,
    StageLimits,
    StagePosition,
    check_exposure_s,
    resolve_stage_target,
)
from simulator.diffraction import DETECTOR_PIXEL_UM, render_diffraction
from simulator.faults import FaultInjector, FaultPlan
from simulator.image_shift import DEFAULT_IMAGE_SHIFT_LIMIT_UM, ImageShiftModel
from simulator.imaging import CameraModel, OpticsErrors, Scene, SimPreset, render, true_matrix
from simulator.keyed import ANGLE_QUANTUM_DEG, POSITION_QUANTUM_UM, TIME_QUANTUM_S, keyed_rng, quantise
from simulator.specimen import Specimen
from simulator.stage import SimulatedStage, StageModel, VirtualClock
from simulator.timing import ExposureTimer, TimingProfile, resolve_profile

log = logging.getLogger(__name__)

DEFAULT_STAGE_LIMITS = StageLimits(x_min_um=-1200.0, x_max_um=1200.0, y_min_um=-1200.0, y_max_um=1200.0)
INSTRUMENT_NAME = "simulated-tem"


def instrument_name(instrument_seed: int) -> str:
    """The name `info()` reports for the simulated instrument `instrument_seed`: `simulated-tem` for seed 0,
    `simulated-tem-<n>` otherwise (its optics errors are `seeded_optics_errors(names, instrument_seed)`)."""
    return INSTRUMENT_NAME if int(instrument_seed) == 0 else f"{INSTRUMENT_NAME}-{int(instrument_seed)}"


def make_preset(
    name: str, pixel_size_um: float, binning: int, defocus_um: float, dose: float, blur_um: float, beam_um: float
) -> SimPreset:
    """A `SimPreset`: pixel size (um/px), binning, defocus (um), vacuum dose (e/px/s), blur sigma (um),
    diffraction beam diameter (um); magnification from the 14-um detector pixel, camera length 1000 mm."""
    magnification = round(DETECTOR_PIXEL_UM * binning / pixel_size_um, 1)
    optics = OpticsPreset(
        name=name,
        magnification=magnification,
        pixel_size_um=pixel_size_um,
        binning=binning,
        defocus_um=defocus_um,
        camera_length_mm=1000.0,
    )
    return SimPreset(optics=optics, dose_e_per_px_s=dose, blur_um=blur_um, beam_diameter_um=beam_um)


def sim_preset_from_optics(optics: OpticsPreset) -> SimPreset:
    """A `SimPreset` for a plain `OpticsPreset`: dose falls with magnification (12000 e/px/s at 0.3 um/px,
    at least 300), blur 1/3 pixel, a diffraction beam of 20 pixels (2-10 um)."""
    if not isinstance(optics, OpticsPreset):
        raise InvalidParameterError(f"presets must be SimPreset or OpticsPreset, got {type(optics).__name__}")
    ps = optics.pixel_size_um
    dose = max(300.0, 12000.0 * min(1.0, (ps / 0.3) ** 0.5))
    return SimPreset(optics=optics, dose_e_per_px_s=dose, blur_um=ps / 3.0,
                     beam_diameter_um=float(np.clip(20 * ps, 2.0, 10.0)))


def default_presets(camera_shape_px: tuple[int, int] = (2048, 2048)) -> tuple[SimPreset, ...]:
    """The default presets (see the module doc); `overview` fits a 3.3 mm field in the frame."""
    overview_um_px = max(1.6, 3300.0 / max(1, min(camera_shape_px)))
    return (
        make_preset("overview", overview_um_px, 1, 0.0, 16000.0, 1.0, 10.0),
        make_preset("atlas", 0.3, 1, -50.0, 12000.0, 0.1, 5.0),
        make_preset("search", 0.04, 1, -10.0, 4000.0, 0.012, 3.0),
        make_preset("exposure", 0.005, 2, -2.0, 1200.0, 0.002, 2.0),
    )


def seeded_optics_errors(names: Sequence[str], seed: int) -> dict[str, OpticsErrors]:
    """Per-preset hidden errors: a shared rotation (-5..5 deg) plus a per-preset +-1.5 deg, 1-3 % scale
    error of random sign, an off-centre beam and 10-30 % illumination fall-off at the corners.

    They belong to the instrument: `SimulatedMicroscope` seeds them with its `instrument_seed`, not with the
    specimen seed, so one calibration serves every grid put into the same simulated instrument. (Stream 7 of
    the seed: instrument 0, the default, then has clear errors of 3-5 deg and 1-2.5 %.)"""
    rng = np.random.default_rng([seed, 7])
    base_rotation = float(rng.uniform(-5.0, 5.0))
    errors = {}
    for name in names:
        errors[name] = OpticsErrors(
            rotation_deg=base_rotation + float(rng.uniform(-1.5, 1.5)),
            scale_error=float(rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.03)),
            illumination_centre=(float(rng.uniform(-0.25, 0.25)), float(rng.uniform(-0.25, 0.25))),
            illumination_falloff=float(rng.uniform(0.1, 0.3)),
        )
    return errors


def frame_metadata(
    kind: str, preset: SimPreset, stage: StagePosition, exposure_s: float, time_s: float, blanked: bool,
    instrument: str, extra: dict[str, Any],
) -> FrameMetadata:
    """The metadata of a simulated frame (`extra` gets the beam state and, for diffraction, the camera length
    and beam diameter)."""
    if blanked:
        extra["beam_blanked"] = True
    if kind == "diffraction":
        extra["camera_length_mm"] = preset.optics.camera_length_mm
        extra["beam_diameter_um"] = preset.beam_diameter_um
    return FrameMetadata(
        kind=kind,  # type: ignore[arg-type]
        preset=preset.name,
        magnification=preset.optics.magnification,
        pixel_size_um=preset.pixel_size_um,
        binning=preset.optics.binning,
        stage=stage,
        exposure_s=exposure_s,
        time_s=time_s,
        instrument=instrument,
        extra=extra,
    )


def _check_arguments(specimen: object, camera_shape_px: tuple[int, int], instrument_seed: object, start_time_s: object
                     ) -> None:
    """`InvalidParameterError` for a `SimulatedMicroscope` argument it cannot work with."""
    if len(camera_shape_px) != 2 or min(int(camera_shape_px[0]), int(camera_shape_px[1])) < 16:
        raise InvalidParameterError(f"camera_shape_px must be (rows, cols) of >= 16 px each, got {camera_shape_px}")
    if not isinstance(specimen, Specimen) and not callable(getattr(specimen, "transmission", None)):
        raise InvalidParameterError(
            f"specimen must be a simulator Specimen or a Scene with transmission(), got {type(specimen).__name__}"
        )
    integral = isinstance(instrument_seed, (int, np.integer)) and not isinstance(instrument_seed, bool)
    if not integral or instrument_seed < 0:  # type: ignore[operator]
        raise InvalidParameterError(f"instrument_seed must be a non-negative integer, got {instrument_seed!r}")
    if isinstance(start_time_s, bool) or not isinstance(start_time_s, (int, float)) or not start_time_s >= 0:
        raise InvalidParameterError(f"start_time_s must be a non-negative number of seconds, got {start_time_s!r}")


class SimulatedMicroscope:
    """A simulated TEM implementing `drivers.base.Microscope` (see the module doc for presets and timing).

    `specimen` is a `Specimen` (procedural, with ground truth) or any `imaging.Scene` (e.g. dataset tiles,
    no ground truth). The same seed and the same sequence of calls give identical frames: a frame's noise
    is keyed by what was acquired and when (`simulator.keyed`), so a simulator started with
    `start_time_s`, `start_stage`, `initial_preset` and `initial_diffraction` (the optics left in diffraction
    by a snapshot) where another stopped continues as that one would have (a resumed session's simulator).
    Methods are thread-safe; rendering happens outside the state lock so status calls stay fast during an
    acquisition.
    """

    def __init__(
        self,
        specimen: Specimen | Scene,
        *,
        seed: int = 0,
        camera_shape_px: tuple[int, int] = (2048, 2048),
        presets: Sequence[SimPreset | OpticsPreset] | None = None,
        faults: FaultPlan | None = None,
        realtime: bool = False,
        stage_limits: StageLimits | None = None,
        stage_model: StageModel | None = None,
        optics_errors: Mapping[str, OpticsErrors] | None = None,
        camera_noise: bool = True,
        initial_preset: str | None = None,
        initial_diffraction: bool = False,
        instrument_seed: int = 0,
        start_time_s: float = 0.0,
        start_stage: StagePosition | None = None,
        clock_profile: TimingProfile | str | None = None,
        image_shift_limit_um: float = DEFAULT_IMAGE_SHIFT_LIMIT_UM,
        beam_drift_fraction: float = 0.0,
    ) -> None:
        _check_arguments(specimen, camera_shape_px, instrument_seed, start_time_s)
        self._scene = specimen
        self._seed = int(seed)
        self._timing = resolve_profile(clock_profile)
        self._camera = CameraModel(
            shape_px=(int(camera_shape_px[0]), int(camera_shape_px[1])), hot_pixel_seed=self._seed, noise=camera_noise,
            readout_base_s=self._timing.camera_return_s, readout_s_per_mpx=self._timing.camera_transfer_s_per_mpx,
        )
        if presets is not None:
            preset_list = tuple(p if isinstance(p, SimPreset) else sim_preset_from_optics(p) for p in presets)
        else:
            preset_list = default_presets(self._camera.shape_px)
        if not preset_list:
            raise InvalidParameterError("a simulated microscope needs at least one optics preset")
        self._presets = {p.name: p for p in preset_list}
        self._instrument_seed = int(instrument_seed)
        self._name = instrument_name(self._instrument_seed)
        errors = seeded_optics_errors(list(self._presets), self._instrument_seed)
        if optics_errors is not None:
            errors.update(optics_errors)
        self._errors = errors
        self._clock = VirtualClock(realtime=realtime, start_s=float(start_time_s))
        self._stage = SimulatedStage(self._clock, stage_limits or DEFAULT_STAGE_LIMITS,
                                     stage_model or self._timing.stage_model(), seed=self._seed, start=start_stage)
        self._timer = ExposureTimer(self._clock, self._timing)
        self._timer.in_diffraction = bool(initial_diffraction)
        self._faults = FaultInjector(faults)
        self._lock = threading.RLock()
        default_name = "atlas" if "atlas" in self._presets else preset_list[0].name
        self._preset_name = initial_preset or default_name
        if self._preset_name not in self._presets:
            raise PresetError(f"unknown initial preset {self._preset_name!r}; known: {', '.join(self._presets)}")
        self._blanked = False
        self._frames = 0
        self._image_shift = ImageShiftModel(image_shift_limit_um, self._instrument_seed)
        self._beam_drift = check_beam_drift(beam_drift_fraction)  # per-exposure intensity (`drifted_preset`)

    # ground truth (tests, evaluation, the simulated operator only) ---------------------------------
    @property
    def ground_truth(self) -> Specimen | None:
        """The procedural specimen (None when serving dataset tiles). Never for the agent's decisions."""
        return self._scene if isinstance(self._scene, Specimen) else None

    @property
    def scene(self) -> Specimen | Scene:
        """What the camera looks at."""
        return self._scene

    def true_image_to_stage_matrix(self, preset: str) -> np.ndarray:
        """The true 2x2 A (um/px) of `preset` in the drivers.geometry convention. For tests only."""
        return true_matrix(self._sim_preset(preset), self._errors[preset])

    def true_stage_xy_um(self) -> tuple[float, float]:
        """Where the specimen really is under the beam (reported stage + backlash + repeat error). Tests only."""
        with self._lock:
            return self._stage.true_xy_um()

    @property
    def fault_counts(self) -> dict[str, int]:
        """Calls counted so far for fault planning: move, acquire, diffraction (1-based numbering)."""
        return {
            "move": self._faults.move_calls,
            "acquire": self._faults.acquire_calls,
            "diffraction": self._faults.diffraction_calls,
        }

    @property
    def clock(self) -> VirtualClock:
        """The virtual clock (advance it to model idle time)."""
        return self._clock

    @property
    def timing(self) -> TimingProfile:
        """The timing profile the clock is charged by (`simulator.timing`; e.g. for `floor_per_target_s`)."""
        return self._timing

    def sim_preset(self, name: str) -> SimPreset:
        """The simulator's full preset record (dose, blur, beam diameter)."""
        return self._sim_preset(name)

    def _sim_preset(self, name: str) -> SimPreset:
        if not isinstance(name, str) or name not in self._presets:
            raise PresetError(f"unknown optics preset {name!r}; this microscope has: {', '.join(self._presets)}")
        return self._presets[name]

    # Microscope protocol ---------------------------------------------------------------------------
    def info(self) -> MicroscopeInfo:
        """Instrument name, camera shape, presets, stage limits and software version."""
        return MicroscopeInfo(
            name=self._name,
            camera_shape_px=self._camera.shape_px,
            presets=tuple(p.optics for p in self._presets.values()),
            stage_limits=self._stage.limits,
            software_version=f"crystal-locator simulator {simulator.__version__}",
            simulated=True,
            image_shift_limit_um=self._image_shift.limit_um,
        )

    def microscope_time_s(self) -> float:
        """Virtual instrument time in seconds since the simulator started."""
        return self._clock.now_s()

    def get_stage(self) -> StagePosition:
        """The reported stage position (during a move: where the stage is on its way). Costs no time."""
        with self._lock:
            return self._stage.position()

    def stage_limits(self) -> StageLimits:
        """The travel limits (default x, y in [-1200, 1200] um, z [-300, 300] um, alpha [-70, 70] deg)."""
        return self._stage.limits

    def move_stage(
        self,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        alpha_deg: float | None = None,
        wait: bool = True,
    ) -> None:
        """Move to an absolute position (None keeps an axis). See `drivers.base.Microscope.move_stage`.

        Raises `InvalidParameterError` for non-numbers, `StageLimitError` before anything moves, and
        `StageMoveError` for an injected failure (the stage then reports where it stopped).
        """
        with self._lock:
            fail_fraction = self._faults.next_move()
            target = resolve_stage_target(self._stage.position(), self._stage.limits, x_um, y_um, z_um, alpha_deg)
            self._stage.start_move(target, fail_fraction=fail_fraction)
        if wait:
            self._stage.wait(math.inf, self._lock)


    def is_stage_moving(self) -> bool:
        """True until the clock passes the end of the move; each poll costs 0.02 s of clock time."""
        self._clock.advance(self._stage.model.poll_s)
        with self._lock:
            return self._stage.is_moving()

    def wait_for_stage(self, timeout_s: float = 60.0) -> None:
        """Advance the clock to the end of the current move; `StageMoveError` if it ends after `timeout_s`."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
            raise InvalidParameterError(f"timeout_s must be a non-negative number of seconds, got {timeout_s!r}")
        self._stage.wait(float(timeout_s), self._lock)

    def stop_stage(self) -> None:
        """Stop any motion at once; the stage reports where it stopped."""
        with self._lock:
            self._stage.stop()

    def get_preset(self) -> str:
        """Name of the active optics preset."""
        return self._preset_name

    def set_preset(self, name: str) -> None:
        """Apply preset `name` (command overhead; lens normalisation if the magnification changes)."""
        new = self._sim_preset(name).optics.magnification
        self._timer.preset_changed(self._sim_preset(self._preset_name).optics.magnification, new)
        with self._lock:
            self._preset_name = name

    def get_image_shift(self) -> tuple[float, float]:
        """The image shift (x_um, y_um) set last (specimen um along the stage axes)."""
        return self._image_shift.shift_xy_um

    def set_image_shift(self, x_um: float, y_um: float) -> None:
        """Shift the imaged and illuminated area by (x_um, y_um) from the stage position (absolute). Costs the
        command overhead now and `image_shift_s` before the next exposure; `InvalidParameterError` beyond
        `image_shift_limit_um` (0: this simulator has no image shift)."""
        shift = self._image_shift.validate(x_um, y_um)
        self._clock.advance(self._timing.command_overhead_s)
        with self._lock:
            self._image_shift.shift_xy_um = shift
        # charged even when the shift does not change, so that a call costs the same whatever came before
        self._timer.hold(self._timing.image_shift_s)

    def set_beam_blanked(self, blanked: bool) -> None:
        """Blank or unblank the beam (the profile's `beam_blank_s`). A blanked beam gives dark frames."""
        if not isinstance(blanked, (bool, np.bool_)):
            raise InvalidParameterError(f"blanked must be True or False, got {blanked!r}")
        self._clock.advance(self._timing.beam_blank_s)
        with self._lock:
            self._blanked = bool(blanked)

    def is_beam_blanked(self) -> bool:
        """True if the beam is blanked."""
        return self._blanked

    def acquire(self, exposure_s: float) -> Frame:
        """Expose for `exposure_s` s in the active preset (after any pending settling or normalisation).

        The frame shows the specimen where the stage is at the start of the exposure. Raises
        `InvalidParameterError` for a bad exposure and `AcquisitionTimeout` when a fault is planned.
        """
        return self._acquire("image", exposure_s)

    def acquire_diffraction(self, exposure_s: float) -> Frame:
        """A diffraction pattern of the area under the beam (beam diameter per preset). The optics stay in
        diffraction until the next image or preset change (the profile's diffraction switch before the first
        snapshot and before that image), so consecutive snapshots switch once."""
        return self._acquire("diffraction", exposure_s)

    def _acquire(self, kind: str, exposure_s: float) -> Frame:
        exposure_s = check_exposure_s(exposure_s)
        with self._lock:
            preset = self._sim_preset(self._preset_name)
            timed_out = self._faults.next_diffraction() if kind == "diffraction" else self._faults.next_acquire()
            if not timed_out:
                moving = self._stage.is_moving()
                if moving:
                    log.warning("acquiring while the stage moves; the frame shows the start of the exposure")
                reported = self._stage.position()
                shift_xy = self._image_shift.shift_xy_um
                true_xy = self._image_shift.view_xy_um(self._stage.true_xy_um())
                key = frame_key(preset.name, exposure_s, reported, self._clock.now_s())
                rng = keyed_rng(self._seed, f"frame-{kind}", *key)
                self._frames += 1
                frame_number = self._frames
                blanked = self._blanked
        if timed_out:
            lost = exposure_s + self._faults.plan.acquire_timeout_s
            self._clock.advance(lost)
            raise AcquisitionTimeout(
                f"{'acquire_diffraction' if kind == 'diffraction' else 'acquire'}: the camera delivered no frame "
                f"within {lost:.1f} s (injected fault); retry the acquisition"
            )
        frame_shape = self._camera.frame_shape(preset.optics.binning)
        time_s = self._timer.frame(exposure_s, None if moving else self._stage.settled_at_s,
                                   self._camera.readout_s(frame_shape), diffraction=kind == "diffraction")
        if kind == "diffraction":
            image = render_diffraction(
                self.ground_truth, true_xy, preset, self._camera, rng, exposure_s=exposure_s, beam_blanked=blanked
            )
        else:
            image = render(
                self._scene, true_xy, drifted_preset(preset, self._beam_drift, self._seed, key), self._camera,
                self._errors[preset.name], rng,
                exposure_s=exposure_s, beam_blanked=blanked, z_um=reported.z_um,
            )
        specimen = getattr(self._scene, "specimen_type", "tiles")  # a Specimen, a placed grid, or tiles
        extra: dict[str, Any] = {"simulated": True, "frame_number": frame_number, "specimen": specimen}
        metadata = frame_metadata(kind, preset, reported, exposure_s, time_s, blanked, self._name, extra)
        return Frame(image=image, metadata=metadata.model_copy(update={"image_shift_xy_um": shift_xy}))


def frame_key(preset: str, exposure_s: float, stage: StagePosition, now_s: float) -> tuple[int | str, ...]:
    """What makes a frame starting now unique (see `simulator.keyed`): preset, exposure (us), stage position
    (1 nm, 1e-4 deg) and microscope time (1 us), not how many frames came before."""
    return (
        preset, quantise(exposure_s, TIME_QUANTUM_S), quantise(stage.x_um, POSITION_QUANTUM_UM),
        quantise(stage.y_um, POSITION_QUANTUM_UM), quantise(stage.z_um, POSITION_QUANTUM_UM),
        quantise(stage.alpha_deg, ANGLE_QUANTUM_DEG), quantise(now_s, TIME_QUANTUM_S),
    )


def check_beam_drift(fraction: object) -> float:
    """`beam_drift_fraction` checked: a number in [0, 0.3]; `InvalidParameterError` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 0.3:
        raise InvalidParameterError(f"beam_drift_fraction must be a number in [0, 0.3], got {fraction!r}")
    return float(fraction)


def drifted_preset(preset: SimPreset, fraction: float, seed: int, key: tuple[int | str, ...]) -> SimPreset:
    """`preset` with the beam intensity of one exposure: its dose x (1 + `fraction` x a normal draw clipped to
    +-3), keyed by the frame (`frame_key`), so a restarted simulator draws the same. A few percent between
    exposures is a guess (gun emission and condenser drift; no published figure for this instrument). With
    `fraction` 0 the preset itself."""
    if fraction <= 0.0:
        return preset
    draw = float(np.clip(keyed_rng(seed, "beam-drift", *key).standard_normal(), -3.0, 3.0))
    return dataclasses.replace(preset, dose_e_per_px_s=preset.dose_e_per_px_s * (1.0 + fraction * draw))
