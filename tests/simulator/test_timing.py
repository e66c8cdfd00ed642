"""Timing profiles: settling once before an exposure, normalisation per magnification change, camera overhead
per frame, the floor per target, and `--clock` from the command line to the simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import CommandError, build_parser, main
from agent.commands import screen
from drivers.base import InvalidParameterError
from drivers.formats.images import read_frame_tiff
from simulator import create_simulated_microscope
from simulator.microscope import SimulatedMicroscope
from simulator.timing import NO_FIGURE, PROFILES, TimingProfile, floor_per_target_s, resolve_profile

CAMERA_PX = 64
FRAME_MPX = CAMERA_PX * CAMERA_PX / 1e6


def _scope(profile: str = "thermo-serialem", camera_px: int = CAMERA_PX) -> SimulatedMicroscope:
    return create_simulated_microscope("protein-plates", seed=5, camera_shape_px=(camera_px, camera_px),
                                       specimen_options={"crystal_count": 20}, clock_profile=profile)


def _elapsed(scope: SimulatedMicroscope, action: object) -> float:
    t0 = scope.microscope_time_s()
    action()  # type: ignore[operator]
    return scope.microscope_time_s() - t0


@pytest.mark.parametrize("name", list(PROFILES))
def test_each_profile_loads_with_a_source_or_says_it_has_none(name: str) -> None:
    profile = resolve_profile(name)
    assert profile.name == name and profile is PROFILES[name]
    assert set(profile.sources) <= set(profile.figures())  # sources name real figures
    for field in profile.figures():
        assert profile.source(field)  # a citation, or "no published figure"
    assert profile.source("stage_xy_speed_um_s").startswith(NO_FIGURE)
    scope = _scope(name)
    assert scope.timing == profile
    assert scope._stage.model.settle_s == profile.stage_settle_s


def test_serialem_defaults_are_cited() -> None:
    thermo, krios = PROFILES["thermo-serialem"], PROFILES["krios"]
    assert thermo.stage_settle_s == 2.0 and "StageMoveDelay" in thermo.source("stage_settle_s")
    assert thermo.lens_normalisation_s == 2.0 and "LensNormalizationDelay" in thermo.source("lens_normalisation_s")
    assert thermo.camera_start_s == 0.8 and "800 ms" in thermo.source("camera_start_s")
    assert 5.0 <= krios.lens_normalisation_s <= 6.0 and "Krios" in krios.source("lens_normalisation_s")


def test_a_move_then_an_exposure_settles_once() -> None:
    scope = _scope()
    p = scope.timing
    frame_s = p.camera_start_s + 0.5 + p.frame_return_s(FRAME_MPX)
    scope.move_stage(x_um=40.0, y_um=0.0)
    assert _elapsed(scope, lambda: scope.acquire(0.5)) == pytest.approx(p.stage_settle_s + frame_s)
    # a second exposure without a move does not settle again
    assert _elapsed(scope, lambda: scope.acquire(0.5)) == pytest.approx(frame_s)
    # two moves before one exposure: one settle, counted from the end of the last move
    scope.move_stage(x_um=0.0)
    scope.move_stage(x_um=20.0)
    assert _elapsed(scope, lambda: scope.acquire(0.5)) == pytest.approx(p.stage_settle_s + frame_s)
    # time spent after a move (here idle) overlaps the settling
    scope.move_stage(x_um=40.0)
    scope.clock.advance(p.stage_settle_s + 1.0)
    assert _elapsed(scope, lambda: scope.acquire(0.5)) == pytest.approx(frame_s)


def test_a_magnification_change_charges_normalisation_the_same_preset_does_not() -> None:
    scope = _scope()
    p = scope.timing
    scope.acquire(0.2)
    frame_s = p.camera_start_s + 0.2 + p.frame_return_s(FRAME_MPX)
    assert scope.get_preset() == "atlas"
    changed = _elapsed(scope, lambda: (scope.set_preset("search"), scope.acquire(0.2)))
    assert changed == pytest.approx(p.command_overhead_s + p.lens_normalisation_s + frame_s)
    same = _elapsed(scope, lambda: (scope.set_preset("search"), scope.acquire(0.2)))
    assert same == pytest.approx(p.command_overhead_s + frame_s)


def test_a_diffraction_snapshot_switches_before_it_and_before_the_next_image() -> None:
    scope = _scope("krios")
    p = scope.timing
    diffraction_mpx = (CAMERA_PX // 2) ** 2 / 1e6  # the exposure preset bins by 2
    scope.set_preset("exposure")
    scope.acquire(0.2)
    snapshot = _elapsed(scope, lambda: scope.acquire_diffraction(1.0))
    frame_return_s = p.frame_return_s(diffraction_mpx)
    assert snapshot == pytest.approx(p.diffraction_switch_s + p.camera_start_s + 1.0 + frame_return_s)
    after = _elapsed(scope, lambda: scope.acquire(0.2))
    assert after == pytest.approx(p.diffraction_switch_s + p.camera_start_s + 0.2 + frame_return_s)


def test_consecutive_snapshots_switch_to_diffraction_once() -> None:
    """The optics stay in diffraction after a snapshot: a second snapshot (another crystal of the field, reached
    by image shift) pays the image shift, not two more switches; the next image pays the switch back."""
    scope = _scope("thermo-serialem")
    p = scope.timing
    diffraction_mpx = CAMERA_PX**2 / 1e6  # the search preset: bin 1
    scope.set_preset("search")
    scope.acquire(0.2)
    scope.acquire_diffraction(1.0)
    second = _elapsed(scope, lambda: (scope.set_image_shift(2.0, 1.0), scope.acquire_diffraction(1.0)))
    frame_return_s = p.frame_return_s(diffraction_mpx)
    assert second == pytest.approx(p.command_overhead_s + p.image_shift_s + p.camera_start_s + 1.0 + frame_return_s)
    assert second < p.diffraction_switch_s + p.camera_start_s + 1.0 + frame_return_s
    back = _elapsed(scope, lambda: scope.acquire(0.2))
    assert back == pytest.approx(p.diffraction_switch_s + p.camera_start_s + 0.2 + frame_return_s)


@pytest.mark.parametrize("name", list(PROFILES))
def test_the_floor_is_what_the_simulator_charges_for_a_target(name: str) -> None:
    """Preset, move, search image, diffraction snapshot, in steady state (the optics in diffraction from the
    previous target's snapshot).
    No image shift in the simulator: the floor's max(image shift, switch) is the switch for every profile."""
    scope = _scope(name, camera_px=128)
    p = scope.timing
    assert p.image_shift_s <= p.diffraction_switch_s
    scope.set_preset("search")
    scope.acquire_diffraction(1.0)

    def target() -> None:
        scope.set_preset("search")  # back to imaging (the optics stay in diffraction after a snapshot)
        scope.move_stage(x_um=scope.get_stage().x_um + 40.0)
        scope.acquire(0.5)
        scope.acquire_diffraction(1.0)

    elapsed = _elapsed(scope, target)
    mpx = 128 * 128 / 1e6  # search and diffraction frames here: the search preset (bin 1)
    assert elapsed == pytest.approx(floor_per_target_s(p, 0.5, 1.0, 40.0, search_frame_mpx=mpx,
                                                       diffraction_frame_mpx=mpx))


@pytest.mark.parametrize("name", list(PROFILES))
def test_the_floor_is_monotone_in_exposure_and_distance(name: str) -> None:
    base = floor_per_target_s(name, 0.5, 1.0, 40.0)
    assert floor_per_target_s(name, 1.0, 1.0, 40.0) > base
    assert floor_per_target_s(name, 0.5, 2.0, 40.0) > base
    assert floor_per_target_s(name, 0.5, 1.0, 400.0) >= base
    assert floor_per_target_s(name, 0.25, 0.5, 40.0) < base
    with pytest.raises(ValueError):
        floor_per_target_s(name, -1.0, 1.0, 40.0)


def test_the_profiles_order_as_the_instruments_do() -> None:
    thermo, krios, jeol = (floor_per_target_s(n, 0.5, 1.0, 40.0) for n in ("thermo-serialem", "krios", "jeol-fast"))
    assert jeol < thermo < krios


def test_unknown_profiles_are_refused_with_the_names() -> None:
    with pytest.raises(InvalidParameterError, match="thermo-serialem, krios, jeol-fast"):
        create_simulated_microscope("protein-plates", seed=1, camera_shape_px=(32, 32), clock_profile="fast")
    with pytest.raises(InvalidParameterError, match="unknown base"):
        resolve_profile({"base": "nope"})
    with pytest.raises(InvalidParameterError, match="stage_settle_s"):
        resolve_profile({"stage_settle_s": -1.0})
    with pytest.raises(InvalidParameterError, match=r"stage_settle_s .*finite"):
        resolve_profile({"stage_settle_s": float("inf")})
    with pytest.raises(InvalidParameterError, match="sources must map"):
        resolve_profile({"sources": 5})
    with pytest.raises(InvalidParameterError, match="no such file"):
        resolve_profile("/nonexistent/figures.json")


def test_a_json_file_overrides_figures_of_a_base_profile(tmp_path: Path) -> None:
    path = tmp_path / "slow-stage.json"
    path.write_text(json.dumps({"base": "krios", "stage_xy_speed_um_s": 50.0}))
    profile = resolve_profile(str(path))
    assert isinstance(profile, TimingProfile) and profile.name == "slow-stage"
    assert profile.stage_xy_speed_um_s == 50.0
    assert profile.lens_normalisation_s == PROFILES["krios"].lens_normalisation_s
    assert profile.source("stage_xy_speed_um_s").startswith(NO_FIGURE)
    assert profile.source("lens_normalisation_s") == PROFILES["krios"].source("lens_normalisation_s")


def test_simulate_snapshot_takes_the_clock_from_the_command_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ends = {}
    for name in ("thermo-serialem", "jeol-fast"):
        out = tmp_path / f"{name}.tif"
        assert main(["simulate", "snapshot", "--camera-px", "32", "--preset", "search", "--x-um", "40",
                     "--clock", name, "--out", str(out)]) == 0
        assert f"clock {name}" in capsys.readouterr().out
        ends[name] = read_frame_tiff(out).metadata.time_s
    p, q = PROFILES["thermo-serialem"], PROFILES["jeol-fast"]
    # preset change, move, exposure: the normalisation overlaps the move and its settling on both clocks
    assert ends["thermo-serialem"] - ends["jeol-fast"] == pytest.approx(
        p.stage_settle_s - q.stage_settle_s + p.camera_start_s - q.camera_start_s)
    bogus = ["simulate", "snapshot", "--camera-px", "32", "--clock", "bogus", "--out", str(tmp_path / "x.tif")]
    assert main(bogus) == 2
    assert "thermo-serialem, krios, jeol-fast" in capsys.readouterr().err


def test_screen_keeps_the_clock_in_the_session_source(tmp_path: Path) -> None:
    args = build_parser().parse_args(["screen", "--simulated", "--camera-px", "32", "--clock", "jeol-fast"])
    source = screen._source_from_args(args)
    assert source["clock"] == "jeol-fast"
    microscope, _ = screen.make_microscope(source)
    assert microscope.timing.name == "jeol-fast"
    # --resume reads source.json, and with it the clock; an older source without one gets the default
    (tmp_path / screen.SOURCE_NAME).write_text(json.dumps(source))
    resumed = screen._source_from_args(build_parser().parse_args(["screen", "--resume", str(tmp_path)]))
    assert screen.make_microscope(resumed)[0].timing.name == "jeol-fast"
    with pytest.raises(CommandError, match="keeps the session's clock"):
        screen._source_from_args(build_parser().parse_args(["screen", "--resume", str(tmp_path), "--clock", "krios"]))
    older = {k: v for k, v in source.items() if k != "clock"}
    assert screen.make_microscope(older)[0].timing.name == "thermo-serialem"
    with pytest.raises(CommandError, match="choose one of"):
        screen._source_from_args(build_parser().parse_args(["screen", "--simulated", "--clock", "slowest"]))
    with pytest.raises(CommandError, match="bridge"):
        screen._source_from_args(build_parser().parse_args(["screen", "--bridge", "tcp://127.0.0.1:1", "--clock",
                                                             "krios"]))


def test_the_readme_table_is_the_profiles_table() -> None:
    from simulator.timing import sources_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert sources_table() in readme
