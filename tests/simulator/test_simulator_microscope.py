"""SimulatedMicroscope: protocol conformance, errors, determinism, geometry, diffraction and faults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from drivers.base import (
    MICROSCOPE_METHODS,
    AcquisitionTimeout,
    Frame,
    InvalidParameterError,
    Microscope,
    MicroscopeInfo,
    OpticsPreset,
    PresetError,
    StageLimits,
    StageMoveError,
    StagePosition,
)
from drivers.geometry import image_centre_px, pixel_to_stage_um
from simulator import create_simulated_microscope
from simulator.faults import FaultPlan
from simulator.imaging import OpticsErrors
from simulator.microscope import SimulatedMicroscope
from simulator.specimen import CrystalTruth, Specimen, generate_specimen
from simulator.stage import StageModel


@pytest.fixture(scope="module")
def specimen() -> Specimen:
    return generate_specimen("protein-plates", 7)


def _scope(specimen: Specimen, **kwargs: object) -> SimulatedMicroscope:
    kwargs.setdefault("camera_shape_px", (256, 256))
    return SimulatedMicroscope(specimen, seed=7, **kwargs)  # type: ignore[arg-type]


def _lone_crystal(spec: Specimen, min_length_um: float, max_length_um: float, clear_um: float,
                  diffracting: bool = False) -> CrystalTruth:
    """A crystal with nothing else (crystal, ice, debris, bar, hole) within `clear_um`."""
    for t in spec.crystal_truth():
        if not (min_length_um <= t.length_um <= max_length_um and t.width_um >= 0.5 * min_length_um):
            continue
        if t.contrast < 0.2 or (diffracting and not (t.diffracts and t.diffraction_quality > 0.6)):
            continue
        if len(spec.crystals_near(t.x_um, t.y_um, clear_um)) != 1:
            continue
        ring = np.linspace(0, 2 * np.pi, 32)
        xs = t.x_um + clear_um * np.cos(ring)
        ys = t.y_um + clear_um * np.sin(ring)
        if not spec.film_mask_xy(xs, ys).all():
            continue
        others = [(spec.ice, spec.ice["radius_um"]), (spec.debris, spec.debris["radius_um"] * 1.8)]
        if any((np.hypot(o["x_um"] - t.x_um, o["y_um"] - t.y_um) < clear_um + r).any() for o, r in others):
            continue
        return t
    raise AssertionError("no lone crystal found")


def test_protocol_conformance_every_method(specimen: Specimen) -> None:
    scope = _scope(specimen)
    assert isinstance(scope, Microscope)
    called = set()
    info = scope.info()
    called.add("info")
    assert isinstance(info, MicroscopeInfo) and info.simulated
    assert [p.name for p in info.presets] == ["overview", "atlas", "search", "exposure"]
    assert info.camera_shape_px == (256, 256)
    assert isinstance(scope.microscope_time_s(), float)
    called.add("microscope_time_s")
    assert isinstance(scope.get_stage(), StagePosition)
    called.add("get_stage")
    assert isinstance(scope.stage_limits(), StageLimits)
    called.add("stage_limits")
    scope.move_stage(x_um=10.0, y_um=-5.0, z_um=1.0, alpha_deg=2.0)
    called.add("move_stage")
    assert scope.get_stage() == StagePosition(x_um=10.0, y_um=-5.0, z_um=1.0, alpha_deg=2.0)
    scope.move_stage(x_um=20.0, wait=False)
    assert scope.is_stage_moving() is True
    called.add("is_stage_moving")
    scope.wait_for_stage(30.0)
    called.add("wait_for_stage")
    scope.stop_stage()
    called.add("stop_stage")
    assert scope.get_preset() == "atlas"
    called.add("get_preset")
    scope.set_preset("search")
    called.add("set_preset")
    assert scope.get_preset() == "search"
    scope.set_beam_blanked(True)
    called.add("set_beam_blanked")
    assert scope.is_beam_blanked() is True
    called.add("is_beam_blanked")
    dark = scope.acquire(0.2)
    called.add("acquire")
    assert np.percentile(dark.image, 99.9) < 1000  # blanked: offset, read noise (and a few hot pixels)
    scope.set_beam_blanked(False)
    frame = scope.acquire(0.2)
    assert isinstance(frame, Frame) and frame.image.dtype == np.uint16 and frame.shape_px == (256, 256)
    diff = scope.acquire_diffraction(0.5)
    called.add("acquire_diffraction")
    assert diff.metadata.kind == "diffraction" and scope.get_preset() == "search"
    assert called == set(MICROSCOPE_METHODS)


def test_frame_metadata_carries_no_truth(specimen: Specimen) -> None:
    scope = _scope(specimen)
    scope.set_preset("exposure")
    scope.move_stage(x_um=-30.0, y_um=40.0)
    frame = scope.acquire(0.3)
    md = frame.metadata
    assert md.preset == "exposure" and md.binning == 2 and frame.shape_px == (128, 128)
    assert md.pixel_size_um == 0.005 and md.stage.x_um == -30.0 and md.exposure_s == 0.3
    assert md.extra["simulated"] is True and md.extra["specimen"] == "protein-plates"
    text = json.dumps(md.model_dump(mode="json"))
    assert "matrix" not in text and "crystal" not in text and "true" not in text.lower().replace("true,", "")


def test_unknown_preset_and_bad_exposure(specimen: Specimen) -> None:
    scope = _scope(specimen)
    with pytest.raises(PresetError, match="unknown optics preset"):
        scope.set_preset("diffraction-party")
    assert scope.get_preset() == "atlas"
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e6, "1", True):
        with pytest.raises(InvalidParameterError):
            scope.acquire(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidParameterError):
            scope.acquire_diffraction(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError):
        scope.set_beam_blanked("yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError):
        SimulatedMicroscope(specimen, camera_shape_px=(4, 4))
    with pytest.raises(InvalidParameterError):
        SimulatedMicroscope("protein-plates")  # type: ignore[arg-type]


def test_plain_optics_presets_are_accepted(specimen: Specimen) -> None:
    custom = OpticsPreset(name="lm", magnification=100.0, pixel_size_um=0.5)
    scope = SimulatedMicroscope(specimen=specimen, presets=[custom], camera_shape_px=(64, 64))
    assert scope.get_preset() == "lm" and [p.name for p in scope.info().presets] == ["lm"]
    frame = scope.acquire(0.1)
    assert frame.metadata.pixel_size_um == 0.5 and frame.image.mean() > 200


def test_same_seed_same_frames_other_seed_differs() -> None:
    frames = []
    for seed in (3, 3, 4):
        scope = create_simulated_microscope("asbestos-fibres", seed=seed, camera_shape_px=(128, 128),
                                            specimen_options={"crystal_count": 200})
        scope.move_stage(x_um=50.0, y_um=50.0)
        scope.acquire(0.1)
        frames.append((scope.acquire(0.5).image, scope.acquire_diffraction(0.5).image))
    np.testing.assert_array_equal(frames[0][0], frames[1][0])
    np.testing.assert_array_equal(frames[0][1], frames[1][1])
    assert not np.array_equal(frames[0][0], frames[2][0])


def test_true_matrix_has_rotation_and_scale_error(specimen: Specimen) -> None:
    scope = _scope(specimen)
    for name in ("overview", "atlas", "search", "exposure"):
        a = scope.true_image_to_stage_matrix(name)
        nominal = scope.info().preset(name).pixel_size_um
        scale = np.sqrt(abs(np.linalg.det(a))) / nominal
        rotation = np.degrees(np.arctan2(a[1, 0], a[0, 0]))
        assert 0.0095 <= abs(scale - 1.0) <= 0.031
        assert 0.05 < abs(rotation) < 7.0


def test_pixel_to_stage_follows_the_convention(specimen: Specimen) -> None:
    """Render a lone crystal off-centre, find its pixel, map it back with A_true: the crystal's centre."""
    errors = {"search": OpticsErrors(rotation_deg=6.0, scale_error=0.025)}
    scope = _scope(specimen, camera_shape_px=(512, 512), optics_errors=errors, camera_noise=False)
    crystal = _lone_crystal(specimen, 3.0, 8.0, clear_um=16.0)
    scope.set_preset("search")
    scope.move_stage(x_um=crystal.x_um + 4.0, y_um=crystal.y_um - 3.0)
    frame = scope.acquire(0.5)
    image = frame.image.astype(np.float64)
    mask = image < 0.9 * np.median(image)
    labels, n = ndimage.label(mask)
    assert n >= 1
    largest = 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))
    row, col = ndimage.center_of_mass(labels == largest)
    a_true = scope.true_image_to_stage_matrix("search")
    found = pixel_to_stage_um(np.array([col, row]), frame.shape_px, scope.true_stage_xy_um(), a_true)
    assert np.hypot(found[0] - crystal.x_um, found[1] - crystal.y_um) < 0.15
    # the crystal is not at the frame centre, and the nominal matrix would put it elsewhere
    assert np.hypot(*(np.array([col, row]) - image_centre_px(frame.shape_px))) > 50
    nominal = pixel_to_stage_um(np.array([col, row]), frame.shape_px, scope.true_stage_xy_um(), np.eye(2) * 0.04)
    assert np.hypot(nominal[0] - crystal.x_um, nominal[1] - crystal.y_um) > 0.4


def test_grid_bars_and_crystals_visible_in_atlas(specimen: Specimen) -> None:
    scope = _scope(specimen, camera_shape_px=(512, 512))
    centre = specimen.square_centres_um()[20]
    scope.move_stage(x_um=float(centre[0]) + 40.0, y_um=float(centre[1]) + 30.0)
    frame = scope.acquire(0.5)
    rows, cols = np.mgrid[0 : frame.shape_px[0], 0 : frame.shape_px[1]]
    xy = pixel_to_stage_um(np.stack([cols, rows], axis=-1), frame.shape_px, scope.true_stage_xy_um(),
                           scope.true_image_to_stage_matrix("atlas"))
    bar = specimen.bar_mask_xy(xy[..., 0], xy[..., 1])
    film = specimen.film_mask_xy(xy[..., 0], xy[..., 1]) & (specimen.crystal_id_xy(xy[..., 0], xy[..., 1], 1.0) < 0)
    on_crystal = specimen.crystal_id_xy(xy[..., 0], xy[..., 1]) >= 0
    image = frame.image.astype(np.float64)
    assert 0.1 < bar.mean() < 0.7
    assert np.median(image[ndimage.binary_erosion(bar, iterations=3)]) < 0.05 * np.median(image[film])
    assert on_crystal.sum() > 20
    assert np.median(image[ndimage.binary_erosion(on_crystal)]) < 0.95 * np.median(image[film])


def test_overview_shows_the_whole_grid(specimen: Specimen) -> None:
    scope = _scope(specimen, camera_shape_px=(256, 256))
    scope.set_preset("overview")
    scope.move_stage(x_um=0.0, y_um=0.0)
    image = scope.acquire(0.5).image.astype(np.float64)
    border = np.concatenate([image[:8].ravel(), image[-8:].ravel(), image[:, :8].ravel(), image[:, -8:].ravel()])
    assert np.median(border) < 200  # the holder around the grid is dark
    assert image[96:160, 96:160].mean() > 10 * np.median(border)  # squares and bars, a few px each


def test_diffraction_crystal_film_and_bar_differ(specimen: Specimen) -> None:
    from skimage.feature import peak_local_max

    scope = _scope(specimen, camera_shape_px=(1024, 1024))
    scope.set_preset("exposure")
    crystal = _lone_crystal(specimen, 4.0, 12.0, clear_um=4.0, diffracting=True)

    def spots_at(x_um: float, y_um: float) -> tuple[int, float]:
        scope.move_stage(x_um=x_um, y_um=y_um)
        image = ndimage.median_filter(scope.acquire_diffraction(1.0).image.astype(np.float64), size=3)  # hot px
        high_pass = image - ndimage.gaussian_filter(image, 4.0)
        peaks = peak_local_max(high_pass, min_distance=3, threshold_abs=400.0)
        # away from the direct beam and the beam stop's edges
        radius = np.hypot(*(peaks - (np.array(image.shape) - 1) / 2.0).T)
        return int((radius > 60).sum()), float(np.median(image))

    n_crystal, _ = spots_at(crystal.x_um, crystal.y_um)
    centre = specimen.square_centres_um()[0]
    film_xy = next((x, y) for x, y in specimen.square_centres_um()
               if specimen.crystal_id_xy(x + np.zeros(1), y + np.zeros(1), 5.0)[0] < 0)
    n_film, film_level = spots_at(*film_xy)
    angle = np.deg2rad(specimen.mesh_angle_deg)
    bar_x = centre[0] + specimen.pitch_um / 2 * np.cos(angle)
    bar_y = centre[1] + specimen.pitch_um / 2 * np.sin(angle)
    n_bar, bar_level = spots_at(bar_x, bar_y)
    assert n_crystal >= 10
    assert n_film <= 2 and n_bar <= 2
    assert film_level > bar_level  # diffuse scatter through film, nothing through a bar
    assert abs(bar_level - 100.0) < 15.0  # camera offset only


def test_faults_fire_as_planned_and_leave_state_valid(specimen: Specimen) -> None:
    plan = FaultPlan(fail_move_numbers=frozenset({2}), timeout_acquire_numbers=frozenset({1}),
                     timeout_diffraction_numbers=frozenset({2}))
    scope = _scope(specimen, faults=plan, camera_shape_px=(64, 64))
    scope.move_stage(x_um=0.0, y_um=0.0)
    t0 = scope.microscope_time_s()
    with pytest.raises(StageMoveError, match="stopped at"):
        scope.move_stage(x_um=500.0, y_um=0.0)
    pos = scope.get_stage()
    assert 0.0 < pos.x_um < 500.0 and not scope.is_stage_moving()
    assert scope.microscope_time_s() > t0
    assert scope.stage_limits().violations(pos) == []
    scope.move_stage(x_um=500.0)  # move 3 succeeds
    assert scope.get_stage().x_um == 500.0
    with pytest.raises(AcquisitionTimeout):
        scope.acquire(0.1)
    assert scope.acquire(0.1).image.shape == (64, 64)
    scope.acquire_diffraction(0.1)
    with pytest.raises(AcquisitionTimeout):
        scope.acquire_diffraction(0.1)
    assert scope.fault_counts == {"move": 3, "acquire": 2, "diffraction": 2}


def test_fault_rates_are_seeded(specimen: Specimen) -> None:
    outcomes = []
    for _ in range(2):
        scope = _scope(specimen, camera_shape_px=(32, 32),
                       faults=FaultPlan(move_failure_rate=0.4, acquire_timeout_rate=0.3, seed=9))
        record = []
        for i in range(20):
            try:
                scope.move_stage(x_um=float(10 * (i % 3)))
                record.append("ok")
            except StageMoveError:
                record.append("move-failed")
            try:
                scope.acquire(0.01)
                record.append("ok")
            except AcquisitionTimeout:
                record.append("timeout")
        outcomes.append(record)
    assert outcomes[0] == outcomes[1]
    assert 2 <= outcomes[0].count("move-failed") <= 16 and 1 <= outcomes[0].count("timeout") <= 14


def test_plain_film_has_grain_that_registers_a_known_stage_shift(specimen: Specimen) -> None:
    """Film texture is fixed to the specimen: two search frames of plain film register to the true shift."""
    from skimage.registration import phase_cross_correlation

    scope = _scope(specimen, camera_shape_px=(256, 256))
    scope.set_preset("search")
    spot = next((x, y) for x, y in specimen.square_centres_um()
                if specimen.crystal_id_xy(np.array([x]), np.array([y]), 10.0)[0] < 0
                and not len(specimen.crystals_near(x, y, 15.0)))
    scope.move_stage(x_um=spot[0], y_um=spot[1])
    first, true_first = scope.acquire(0.5).image.astype(np.float64), np.array(scope.true_stage_xy_um())
    scope.move_stage(x_um=spot[0] + 2.0, y_um=spot[1] + 1.0)
    second, true_second = scope.acquire(0.5).image.astype(np.float64), np.array(scope.true_stage_xy_um())

    def detail(image: np.ndarray) -> np.ndarray:  # band-pass: no hot pixels, shot noise or illumination fall-off
        image = ndimage.median_filter(image, size=3)
        return ndimage.gaussian_filter(image, 2.0) - ndimage.gaussian_filter(image, 10.0)

    shift_rc, _, _ = phase_cross_correlation(detail(first), detail(second), upsample_factor=10, normalization=None)
    expected_cr = np.linalg.solve(scope.true_image_to_stage_matrix("search"), true_second - true_first)
    assert np.hypot(*expected_cr) > 8  # a real shift of many pixels (backlash included)
    # 1.5 px: a plain phase correlation of 256 px frames is pulled ~0.5-1 px towards zero by what is fixed
    # to the camera (the instrument's illumination fall-off and hot pixels survive the band-pass in part)
    np.testing.assert_allclose(shift_rc[::-1], expected_cr, atol=1.5)


def test_camera_model_dose_noise_gain_offset_and_saturation() -> None:
    from simulator.imaging import CameraModel, expose
    from simulator.microscope import make_preset

    preset = make_preset("flat", 0.1, 1, 0.0, 1000.0, 0.0, 2.0)
    camera = CameraModel(shape_px=(128, 128), gain_counts_per_e=2.0, offset_counts=100.0, read_noise_counts=3.0,
                         hot_pixels=0)
    flat = np.full((128, 128), 0.5, dtype=np.float32)
    rng = np.random.default_rng(1)
    for exposure_s in (0.1, 1.0):
        counts = expose(flat, preset, camera, OpticsErrors(), rng, exposure_s=exposure_s).astype(np.float64)
        electrons = 1000.0 * exposure_s * 0.5
        assert counts.mean() == pytest.approx(100.0 + 2.0 * electrons, rel=0.01)
        assert counts.var() == pytest.approx(4.0 * electrons + 9.0, rel=0.1)  # shot noise x gain^2 + read noise
    saturated = expose(flat, preset, camera, OpticsErrors(), rng, exposure_s=200.0)
    assert saturated.dtype == np.uint16 and (saturated == 65535).all()  # clipped, never wrapped
    falloff = expose(np.ones((128, 128), np.float32), preset, CameraModel(shape_px=(128, 128), noise=False),
                     OpticsErrors(illumination_falloff=0.3), rng, exposure_s=1.0).astype(np.float64)
    assert falloff[64, 64] > falloff[0, 0] * 1.3 > falloff[0, 0]  # uneven illumination: darker corners


def test_rendering_works_in_a_forked_child(specimen: Specimen) -> None:
    """The render thread pool is re-created after fork (a copied pool has no threads and would hang)."""
    import os
    import select
    import signal

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    scope = _scope(specimen, camera_shape_px=(256, 256))
    parent_mean = float(scope.acquire(0.1).image.mean())  # the pool exists in the parent now
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: render, report the mean as text, exit without running pytest's teardown
        try:
            os.close(read_fd)
            mean = float(_scope(specimen, camera_shape_px=(256, 256)).acquire(0.1).image.mean())
            os.write(write_fd, f"{mean:.3f}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 60.0)
        answer = os.read(read_fd, 64).decode() if ready else ""
    finally:
        os.close(read_fd)
        if not answer:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert answer, "the forked child did not render within 60 s"
    assert float(answer) == pytest.approx(parent_mean, rel=0.2)


@pytest.mark.parametrize(("specimen_type", "low", "high"), [("polymer-faint", 0.0, 0.07), ("protein-plates", 0.1, 0.6)])
def test_crystal_contrast_at_atlas_per_specimen_type(specimen_type: str, low: float, high: float) -> None:
    """Protein plates stand out at the atlas preset; polymer crystals are barely darker than the film."""
    spec = generate_specimen(specimen_type, 2)
    scope = SimulatedMicroscope(spec, seed=2, camera_shape_px=(512, 512), camera_noise=False)
    darkening = []
    rows, cols = np.mgrid[0:512, 0:512]
    for centre in spec.square_centres_um()[:60:20]:
        scope.move_stage(x_um=float(centre[0]), y_um=float(centre[1]))
        image = scope.acquire(0.5).image.astype(np.float64)
        xy = pixel_to_stage_um(np.stack([cols, rows], -1), (512, 512), scope.true_stage_xy_um(),
                               scope.true_image_to_stage_matrix("atlas"))
        ids = spec.crystal_id_xy(xy[..., 0], xy[..., 1])
        film = spec.film_mask_xy(xy[..., 0], xy[..., 1]) & ~ndimage.binary_dilation(ids >= 0, iterations=8)
        film_level = float(np.median(image[film]))
        for cid in np.unique(ids[ids >= 0]):
            inside = ndimage.binary_erosion(ids == cid)
            if inside.sum() >= 4:
                darkening.append(1.0 - np.median(image[inside]) / film_level)
    assert len(darkening) >= 8
    assert low <= float(np.median(darkening)) <= high


def test_stage_height_defocuses_the_image(specimen: Specimen) -> None:
    crystal = _lone_crystal(specimen, 3.0, 8.0, clear_um=16.0)
    scope = _scope(specimen, camera_shape_px=(256, 256), camera_noise=False,
                   stage_model=StageModel(backlash_um=0.0, repeat_error_um=0.0))
    scope.set_preset("search")
    sharpness = {}
    for z_um in (0.0, 250.0):
        scope.move_stage(x_um=crystal.x_um, y_um=crystal.y_um, z_um=z_um)
        image = scope.acquire(0.5).image.astype(np.float64)
        sharpness[z_um] = float(np.abs(np.diff(image, axis=1)).max())
    assert sharpness[250.0] < 0.5 * sharpness[0.0]  # the crystal's edges are soft 250 um off eucentric
