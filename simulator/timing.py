"""Named timing profiles of the simulated microscope, with a source for every figure, and the floor per target.

A `TimingProfile` says what each action costs on the virtual clock (seconds, um/s, um/s^2):

- a stage move: command overhead + a trapezoidal motion (speed, acceleration per axis, axes in parallel);
- settling: the exposure that follows a stage move starts no earlier than `stage_settle_s` after the move
  ended (SerialEM's `StageMoveDelay`), *once*, before the exposure, not after every move;
- a preset change that changes the magnification: `lens_normalisation_s` before the next exposure
  (SerialEM's `LensNormalizationDelay`); the same magnification costs the command overhead only;
- a diffraction snapshot: `diffraction_switch_s` before its exposure when the optics are in imaging
  (switching to diffraction); they stay in diffraction until the next image or preset change, which waits
  `diffraction_switch_s` again (switching back). Consecutive snapshots (several crystals of one field reached
  by image shift, as in serial ED) switch once each way, as SerialEM's Low Dose areas do;
- a re-centre by image shift: `image_shift_s` before the next exposure (SerialEM's `ImageShiftDelays`);
- every frame: `camera_start_s` before the exposure starts, then `camera_return_s +
  camera_transfer_s_per_mpx` x megapixels to get the image back.

Delays that wait "before the next exposure" run in instrument time: whatever happens meanwhile (a move, a
preset change) overlaps with them, and the exposure waits for the latest (as SerialEM does). Each profile
keeps the source of each figure in `sources`, or says it has no published figure; `sources_table()`
renders them for the README.

Profiles: `thermo-serialem` (default: SerialEM's defaults on a Thermo Fisher microscope), `krios`
(Krios-class lens normalisation), `jeol-fast` (the serial-ED set-up of Smeets et al. 2018, instamatic on a
JEOL with a Timepix camera). `resolve_profile` accepts a name, a profile, a dict of fields or a JSON file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivers.base import InvalidParameterError
from simulator.stage import StageModel, VirtualClock, profile_time_s

DEFAULT_PROFILE = "thermo-serialem"
NO_FIGURE = "no published figure"
SEARCH_FRAME_MPX = 2048 * 2048 / 1e6  # the default search preset: 2048 x 2048 px, bin 1
DIFFRACTION_FRAME_MPX = 1024 * 1024 / 1e6  # the default exposure preset: bin 2


class TimingProfile(BaseModel):
    """What each action costs on a simulated instrument (see the module doc for how the figures are used)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(description="profile name")
    description: str = Field(default="", description="what instrument and software the profile stands for")
    stage_xy_speed_um_s: float = Field(150.0, gt=0, description="stage x/y top speed, um/s")
    stage_xy_accel_um_s2: float = Field(300.0, gt=0, description="stage x/y acceleration, um/s^2")
    stage_z_speed_um_s: float = Field(20.0, gt=0, description="stage z top speed, um/s")
    stage_z_accel_um_s2: float = Field(40.0, gt=0, description="stage z acceleration, um/s^2")
    stage_alpha_speed_deg_s: float = Field(10.0, gt=0, description="tilt top speed, deg/s")
    stage_alpha_accel_deg_s2: float = Field(20.0, gt=0, description="tilt acceleration, deg/s^2")
    stage_settle_s: float = Field(2.0, ge=0, description="from the end of a stage move to the next exposure, s")
    lens_normalisation_s: float = Field(2.0, ge=0, description="after a magnification change, before an exposure, s")
    diffraction_switch_s: float = Field(2.0, ge=0, description="after switching to or from diffraction, s")
    image_shift_s: float = Field(0.5, ge=0, description="after an image shift, before an exposure, s")
    camera_start_s: float = Field(0.8, ge=0, description="from the acquire command to the start of exposure, s")
    camera_return_s: float = Field(0.05, ge=0, description="fixed cost of returning a frame after exposure, s")
    camera_transfer_s_per_mpx: float = Field(0.06, ge=0, description="frame return per megapixel (binned), s")
    beam_blank_s: float = Field(0.1, ge=0, description="blank or unblank the beam, s")
    command_overhead_s: float = Field(0.05, ge=0, description="any command (move, preset, stop), s")
    poll_s: float = Field(0.02, ge=0, description="one stage-status poll, s")
    sources: dict[str, str] = Field(default_factory=dict, description="figure -> where it comes from")

    def stage_model(self, **mechanics: float) -> StageModel:
        """The `StageModel` of this profile; `mechanics` (backlash_um, repeat_error_um) go to it as they are."""
        return StageModel(
            xy_speed_um_s=self.stage_xy_speed_um_s, xy_accel_um_s2=self.stage_xy_accel_um_s2,
            z_speed_um_s=self.stage_z_speed_um_s, z_accel_um_s2=self.stage_z_accel_um_s2,
            alpha_speed_deg_s=self.stage_alpha_speed_deg_s, alpha_accel_deg_s2=self.stage_alpha_accel_deg_s2,
            settle_s=self.stage_settle_s, command_overhead_s=self.command_overhead_s, poll_s=self.poll_s,
            **mechanics,
        )

    def frame_return_s(self, megapixels: float) -> float:
        """Seconds to get a frame of `megapixels` (binned) back after its exposure."""
        return self.camera_return_s + self.camera_transfer_s_per_mpx * megapixels

    def source(self, field: str) -> str:
        """Where the figure `field` comes from, or `no published figure`."""
        return self.sources.get(field, NO_FIGURE)

    def figures(self) -> dict[str, float]:
        """The numeric figures of the profile by field name."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, float)}


_SERIALEM = "SerialEM properties:"  # SerialEM help, 'Property File Entries' (hlp/html/about_properties.htm)
_INSTAMATIC = "instamatic serialED:"  # experiments/serialed/experiment.py, the software of Smeets et al. 2018
_UNSOURCED = {
    "stage_xy_speed_um_s": f"{NO_FIGURE} (none found for Thermo Fisher or JEOL goniometers)",
    "camera_return_s": f"{NO_FIGURE} (Leginon's wiki: 1-2 s for a K2/K3 counted-mode return)",
}
_THERMO_SOURCES = {
    **_UNSOURCED,
    "stage_settle_s": f"{_SERIALEM} StageMoveDelay, default 2000 ms (+ the built-in 800 ms, camera_start_s)",
    "lens_normalisation_s": f"{_SERIALEM} LensNormalizationDelay, default 2000 ms (+ the built-in 800 ms)",
    "diffraction_switch_s": f"assumed = LensNormalizationDelay ({_SERIALEM[:-1]}); no separate figure",
    "image_shift_s": f"{_SERIALEM} ImageShiftDelays, recommended table (0.5 s for 0.5-1 um, flat beyond)",
    "camera_start_s": f"{_SERIALEM} the built-in 800 ms before an exposure starts; StartupForISDelays 0.8 s",
}
_KRIOS_SOURCES = {
    **_THERMO_SOURCES,
    "lens_normalisation_s": f"{_SERIALEM} LensNormalizationDelay, 'for Krios ... 5000-6000' ms (midpoint)",
    "diffraction_switch_s": f"assumed = the Krios LensNormalizationDelay ({_SERIALEM[:-1]}); no separate figure",
}
_JEOL_SOURCES = {
    **_UNSOURCED,
    "stage_settle_s": f"{_INSTAMATIC} 0.05 s sleep after each stage move",
    "diffraction_switch_s": f"{_INSTAMATIC} 0.2 s delay before each switch to diffraction or back",
    "lens_normalisation_s": f"{_SERIALEM} MagChangeIntensityDelay, 200 ms on JEOL (no JEOL normalisation)",
    "image_shift_s": f"{_INSTAMATIC} beam shift from crystal to crystal with no delay",
}

PROFILES: dict[str, TimingProfile] = {
    "thermo-serialem": TimingProfile(
        name="thermo-serialem",
        description="SerialEM's defaults on a Thermo Fisher microscope with a CMOS camera (Ceta class)",
        sources=_THERMO_SOURCES,
    ),
    "krios": TimingProfile(
        name="krios",
        description="a Krios-class microscope: SerialEM's recommended 5-6 s lens normalisation delay",
        lens_normalisation_s=5.5, diffraction_switch_s=5.5, sources=_KRIOS_SOURCES,
    ),
    "jeol-fast": TimingProfile(
        name="jeol-fast",
        description="serial ED on a JEOL with a Timepix camera (Smeets et al. 2018: up to 3500 crystals/h)",
        stage_settle_s=0.05, lens_normalisation_s=0.2, diffraction_switch_s=0.2, image_shift_s=0.0,
        camera_start_s=0.05, camera_return_s=0.01, camera_transfer_s_per_mpx=0.02, sources=_JEOL_SOURCES,
    ),
}


def profile_names() -> tuple[str, ...]:
    """The names `resolve_profile` accepts, default first."""
    return tuple(PROFILES)


def resolve_profile(value: TimingProfile | Mapping[str, Any] | str | Path | None) -> TimingProfile:
    """A `TimingProfile` from a profile, a name, a dict of fields, or a `.json` file of fields.

    A dict or file may name a `base` profile (default `thermo-serialem`) and override some of its figures.
    Raises `InvalidParameterError` (a `ValueError`) with a one-line message listing the names otherwise.
    """
    if value is None:
        return PROFILES[DEFAULT_PROFILE]
    if isinstance(value, TimingProfile):
        return value
    if isinstance(value, Mapping):
        return _from_fields(dict(value))
    text = str(value)
    if text in PROFILES:
        return PROFILES[text]
    if text.endswith(".json") and not Path(text).is_file():
        raise InvalidParameterError(f"clock profile file {text}: no such file")
    if text.endswith(".json"):
        try:
            fields = json.loads(Path(text).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidParameterError(f"clock profile file {text}: {exc}") from exc
        if not isinstance(fields, dict):
            raise InvalidParameterError(f"clock profile file {text}: expected a JSON object of profile fields")
        return _from_fields({"name": Path(text).stem, **fields})
    raise InvalidParameterError(
        f"unknown clock profile {text!r}; choose one of: {', '.join(PROFILES)} (or a .json file of figures)"
    )


def _from_fields(fields: dict[str, Any]) -> TimingProfile:
    base_name = str(fields.pop("base", DEFAULT_PROFILE))
    if base_name not in PROFILES:
        raise InvalidParameterError(f"unknown base clock profile {base_name!r}; choose one of: {', '.join(PROFILES)}")
    base = PROFILES[base_name].model_dump()
    given_sources = fields.get("sources", {})
    if not isinstance(given_sources, Mapping) or not all(isinstance(v, str) for v in given_sources.values()):
        raise InvalidParameterError("invalid clock profile: sources must map figure names to texts")
    overridden = {k for k in fields if k not in ("name", "description", "sources")}
    sources = {**base["sources"], **{k: NO_FIGURE + " (given by the user)" for k in overridden}}
    try:
        return TimingProfile.model_validate({**base, **fields, "sources": {**sources, **given_sources}})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise InvalidParameterError(f"invalid clock profile: {where} {error['msg']}") from exc


def sources_table() -> str:
    """A Markdown table, one row per figure per profile: figure, profile, value, source (for the README)."""
    rows = ["| figure | profile | value | source |", "| --- | --- | --- | --- |"]
    for field in PROFILES[DEFAULT_PROFILE].figures():
        for profile in PROFILES.values():
            rows.append(f"| `{field}` | {profile.name} | {profile.figures()[field]:g} | {profile.source(field)} |")
    return "\n".join(rows)


def floor_per_target_s(
    profile: TimingProfile | str,
    search_exposure_s: float,
    diffraction_exposure_s: float,
    move_um: float,
    *,
    search_frame_mpx: float = SEARCH_FRAME_MPX,
    diffraction_frame_mpx: float = DIFFRACTION_FRAME_MPX,
) -> float:
    """The physical floor (s) of one target in a run of targets, by the simulator's own rules.

    One target: the preset command that returns the optics to imaging (at search magnification, so no lens
    normalisation), move the stage `move_um`, settle, take the search image, re-centre by image shift,
    switch to diffraction, take the snapshot (the optics stay in diffraction until the next target's preset
    command: the switch back overlaps its move and settling):

        floor = c + max(n_d, c + m(move_um) + s) + 2 a + e_s + e_d + r(search) + r(diffraction) + max(i, n_d)

    with c the command overhead, m the trapezoidal move time (x/y speed and acceleration), s the stage
    settle, n_d the diffraction switch, i the image-shift delay, a the camera start, e_s / e_d the
    exposures and r(f) = camera_return_s + camera_transfer_s_per_mpx x f the frame return.
    """
    p = resolve_profile(profile)
    for name, value in (("search_exposure_s", search_exposure_s), ("diffraction_exposure_s", diffraction_exposure_s),
                        ("move_um", move_um)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    move_s = p.command_overhead_s + profile_time_s(move_um, p.stage_xy_speed_um_s, p.stage_xy_accel_um_s2)
    search_start = max(p.diffraction_switch_s, move_s + p.stage_settle_s)
    return (
        p.command_overhead_s + search_start + 2 * p.camera_start_s + search_exposure_s + diffraction_exposure_s
        + p.frame_return_s(search_frame_mpx) + p.frame_return_s(diffraction_frame_mpx)
        + max(p.image_shift_s, p.diffraction_switch_s)
    )


class ExposureTimer:
    """Charges a profile's time on a `VirtualClock`: delays that wait before the next exposure (settling,
    normalisation, image shift) are held as the earliest start of that exposure."""

    def __init__(self, clock: VirtualClock, profile: TimingProfile) -> None:
        self.clock = clock
        self.profile = profile
        self._ready_at_s = clock.now_s()
        #: True while the optics are in diffraction (after a snapshot, until the next image or preset change).
        self.in_diffraction = False

    @property
    def ready_at_s(self) -> float:
        """Earliest start (instrument s) of the next exposure's camera sequence."""
        return self._ready_at_s

    def hold(self, delay_s: float, from_s: float | None = None) -> None:
        """The next exposure waits until `delay_s` after `from_s` (default now)."""
        start = self.clock.now_s() if from_s is None else from_s
        self._ready_at_s = max(self._ready_at_s, start + delay_s)

    def preset_changed(self, old_magnification: float, new_magnification: float) -> None:
        """A preset command: the overhead now, the switch back to imaging if the optics are in diffraction, and
        lens normalisation before the next exposure if the magnification changed."""
        self.clock.advance(self.profile.command_overhead_s)
        self.set_diffraction(False)
        if new_magnification != old_magnification:
            self.hold(self.profile.lens_normalisation_s)

    def diffraction_switch(self) -> None:
        """A switch to or from diffraction: the next exposure waits `diffraction_switch_s`."""
        self.hold(self.profile.diffraction_switch_s)

    def set_diffraction(self, diffraction: bool) -> None:
        """Put the optics in diffraction (True) or imaging (False); a change costs `diffraction_switch`."""
        if diffraction != self.in_diffraction:
            self.diffraction_switch()
            self.in_diffraction = diffraction

    def expose(self, exposure_s: float, settled_at_s: float | None) -> float:
        """Wait for pending delays and the stage's settling (`settled_at_s`; None: take it at once, e.g. the
        stage still moves), start the camera, expose; returns the clock at the end of the exposure."""
        if settled_at_s is not None:
            self.clock.advance_to(max(self._ready_at_s, settled_at_s))
        return self.clock.advance(self.profile.camera_start_s + exposure_s)

    def frame(self, exposure_s: float, settled_at_s: float | None, readout_s: float, diffraction: bool) -> float:
        """One frame in diffraction (`diffraction`) or imaging, switching the optics first if they are in the
        other mode (`set_diffraction`), then `expose` and the frame return (`readout_s`); the optics stay in
        that mode. Returns the clock at the end of the exposure."""
        self.set_diffraction(diffraction)
        end_s = self.expose(exposure_s, settled_at_s)
        self.clock.advance(readout_s)
        return end_s
