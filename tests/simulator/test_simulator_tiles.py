"""Dataset tiles served as the specimen: frames are crops of the mosaic through the camera model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from agent.cli import main
from agent.steps.calibration_store import CalibrationStore
from drivers.base import AcquisitionError
from drivers.formats.images import read_frame_tiff
from drivers.geometry import pixel_to_stage_um
from simulator import create_simulated_microscope
from simulator.imaging import OpticsErrors
from simulator.microscope import make_preset
from simulator.stage import StageModel
from simulator.tiles import TileScene, TileSceneError
from tests.session.test_rounds import true_calibration

PIXEL_UM = 0.3
TILE_ROWS, TILE_COLS = 100, 120


def _mosaic(dtype: type, seed: int = 0) -> np.ndarray:
    """A 200 x 360 test mosaic with smooth structure and sharp features (no two pixels alike by chance)."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(2 * TILE_ROWS, 3 * TILE_COLS)), 6.0)
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    image = 0.3 + 0.6 * smooth
    image[40:60, 200:230] *= 0.3  # a dark "crystal"
    high = 255 if dtype == np.uint8 else 50000
    return (image * high).astype(dtype)


def _write_tiles(folder: Path, mosaic: np.ndarray) -> Path:
    folder.mkdir()
    for r in range(2):
        for c in range(3):
            tile = mosaic[r * TILE_ROWS : (r + 1) * TILE_ROWS, c * TILE_COLS : (c + 1) * TILE_COLS]
            tifffile.imwrite(folder / f"Tile_{r + 1:03d}-{c + 1:03d}.tif", tile)
    return folder


def _exact_scope(folder: Path, **kwargs: object):
    zero = {name: OpticsErrors() for name in ("overview", "atlas", "search", "exposure", "low")}
    return create_simulated_microscope(
        tiles=folder, pixel_size_um=PIXEL_UM, camera_shape_px=(64, 80), optics_errors=zero, camera_noise=False,
        stage_model=StageModel(backlash_um=0.0, repeat_error_um=0.0), **kwargs,
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_served_pixels_match_the_source(tmp_path: Path, dtype: type) -> None:
    mosaic = _mosaic(dtype)
    scope = _exact_scope(_write_tiles(tmp_path / "tiles", mosaic))
    assert scope.ground_truth is None
    assert scope.get_preset() == "atlas" and scope.info().preset("atlas").pixel_size_um == PIXEL_UM
    # frame centre (39.5, 31.5) lands on mosaic (179.5 + 30, 99.5 - 20): the crop [48:112, 170:250]
    scope.move_stage(x_um=30 * PIXEL_UM, y_um=-20 * PIXEL_UM)
    frame = scope.acquire(0.5)
    source = mosaic[48:112, 170:250].astype(np.float64)
    served = frame.image.astype(np.float64)
    slope, intercept = np.polyfit(source.ravel(), served.ravel(), 1)
    assert slope > 0
    assert np.abs(served - (slope * source + intercept)).max() <= 1.0  # identical up to 16-bit rounding
    assert frame.metadata.extra["specimen"] == "tiles"


def test_rotated_frame_matches_the_mosaic_through_a_true(tmp_path: Path) -> None:
    mosaic = _mosaic(np.uint16, seed=1)
    errors = {"atlas": OpticsErrors(rotation_deg=4.0, scale_error=-0.02)}  # no illumination fall-off
    scope = create_simulated_microscope(tiles=_write_tiles(tmp_path / "tiles", mosaic), pixel_size_um=PIXEL_UM,
                                        seed=5, camera_shape_px=(64, 80), camera_noise=False, optics_errors=errors)
    scope.move_stage(x_um=-5.0, y_um=3.0)
    frame = scope.acquire(0.5)
    a_true = scope.true_image_to_stage_matrix("atlas")
    assert not np.allclose(a_true, np.eye(2) * PIXEL_UM)
    rows, cols = np.mgrid[0:64, 0:80]
    xy = pixel_to_stage_um(np.stack([cols, rows], -1), (64, 80), scope.true_stage_xy_um(), a_true)
    mosaic_col = xy[..., 0] / PIXEL_UM + (mosaic.shape[1] - 1) / 2
    mosaic_row = xy[..., 1] / PIXEL_UM + (mosaic.shape[0] - 1) / 2
    expected = ndimage.map_coordinates(mosaic.astype(np.float64), [mosaic_row, mosaic_col], order=1)
    corr = np.corrcoef(expected.ravel(), frame.image.astype(np.float64).ravel())[0, 1]
    assert corr > 0.995


def test_outside_the_mosaic_is_dark_and_lower_mag_averages(tmp_path: Path) -> None:
    mosaic = _mosaic(np.uint16)
    low = make_preset("low", 5 * PIXEL_UM, 1, 0.0, 12000.0, 0.0, 5.0)
    scope = _exact_scope(_write_tiles(tmp_path / "tiles", mosaic),
                         presets=(make_preset("atlas", PIXEL_UM, 1, 0.0, 12000.0, 0.0, 5.0), low))
    limits = scope.stage_limits()
    assert limits.x_max_um == pytest.approx(360 * PIXEL_UM / 2) and limits.y_max_um == pytest.approx(30.0)
    scope.move_stage(x_um=limits.x_max_um, y_um=0.0)  # half the frame beyond the right edge
    image = scope.acquire(0.5).image.astype(np.float64)
    assert np.median(image[:, -20:]) == pytest.approx(100.0, abs=1.0)  # camera offset only
    assert np.median(image[:, :20]) > 1000.0
    # 5 mosaic pixels per camera pixel, block-averaged: the whole mosaic, mean brightness kept
    scope.set_preset("low")
    scope.move_stage(x_um=0.0, y_um=0.0)
    overview = scope.acquire(0.5).image.astype(np.float64)
    assert overview.shape == (64, 80)
    inside = overview[overview > 200]
    assert 60 * 36 <= inside.size <= 74 * 42  # 360 x 200 mosaic px / 5
    expected = 100 + 2.0 * 12000.0 * 0.5 * mosaic.astype(np.float64).mean() / scope.scene.white_level
    assert inside.mean() == pytest.approx(expected, rel=0.03)


def test_tile_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _write_tiles(tmp_path / "tiles", _mosaic(np.uint16))
    with pytest.raises(TileSceneError, match="pixel size"):
        TileScene.open(folder)  # plain TIFF tiles carry no pixel size
    with pytest.raises(TileSceneError, match="cannot serve tiles"):
        TileScene.open(tmp_path / "missing")
    out = tmp_path / "snap.tif"
    assert main(["simulate", "snapshot", "--tiles", str(folder), "--camera-px", "64", "--out", str(out)]) == 2
    assert "--pixel-size-um" in capsys.readouterr().err
    assert main(["simulate", "snapshot", "--tiles", str(folder), "--pixel-size-um", "0.3", "--camera-px", "64",
                 "--out", str(out)]) == 0
    frame = read_frame_tiff(out)
    assert frame.metadata.extra["specimen"] == "tiles" and frame.shape_px == (64, 64)


def test_an_unreadable_piece_gives_an_acquisition_error() -> None:
    from drivers.formats.montage import TileMontage, montage_from_arrays
    from simulator.microscope import SimulatedMicroscope

    mosaic = _mosaic(np.uint16)
    tiles = [mosaic[:, :180], mosaic[:, 180:]]
    good = montage_from_arrays(tiles, [(0, 0), (0, 180)], pixel_size_um=PIXEL_UM)

    def loader(index: int) -> np.ndarray:  # piece 0's file went bad after the montage was opened
        if index == 0:
            raise OSError("tile file truncated")
        return tiles[index]

    broken = TileMontage(good.pieces, loader, np.uint16, pixel_size_um=PIXEL_UM)
    scope = SimulatedMicroscope(TileScene(broken, white_level=50000.0), camera_shape_px=(32, 32),
                                stage_limits=TileScene(good).stage_limits())
    scope.move_stage(x_um=-40.0, y_um=0.0)
    with pytest.raises(AcquisitionError, match="tile"):
        scope.acquire(0.1)
    scope.move_stage(x_um=40.0, y_um=0.0)  # the other piece still serves
    assert scope.acquire(0.1).image.mean() > 1000


def test_simulator_package_lists_the_specimen_types() -> None:
    import simulator
    from simulator import specimen

    assert simulator.SPECIMEN_TYPES == specimen.SPECIMEN_TYPES


def test_overlapping_tiles_are_placed_with_the_overlap(tmp_path: Path) -> None:
    """Tiles cut with a 20 % overlap and served with --overlap 0.2 give the original mosaic back."""
    mosaic = _mosaic(np.uint16, seed=3)  # steps: 80 rows (100 x 0.8), 96 columns (120 x 0.8)
    folder = tmp_path / "overlap"
    folder.mkdir()
    for r in range(2):
        for c in range(3):
            c0 = c * 96
            tile = mosaic[r * 80 : r * 80 + TILE_ROWS, c0 : c0 + TILE_COLS]
            tifffile.imwrite(folder / f"Tile_{r:03d}-{c:03d}.tif", tile)
    scene = TileScene.open(folder, pixel_size_um=PIXEL_UM, overlap_fraction=0.2)
    assert scene.montage.shape_px == (180, 312)  # 80 + 100 rows; 96 + 96 + 120 columns
    np.testing.assert_array_equal(scene.montage.to_array(), mosaic[:180, :312])
    out = tmp_path / "snap.tif"
    assert main(["simulate", "snapshot", "--tiles", str(folder), "--pixel-size-um", "0.3", "--overlap", "0.2",
                 "--camera-px", "32", "--out", str(out)]) == 0


@pytest.mark.parametrize("index_digits", [6, 3])
def test_screen_accepts_the_2018_study_tile_naming(tmp_path: Path, index_digits: int, calibration_store: Path) -> None:
    """`screen --tiles` on `Tile_RRR-CCC-<index>_0-000.tif` tiles whose rows start at 3: one clean session (its
    calibration store holds the tile microscope's true calibration, which the session checks, not measures)."""
    source = create_simulated_microscope(specimen_type="graphite-flakes", seed=5, camera_shape_px=(768, 768))
    source.set_preset("atlas")
    image = np.asarray(source.acquire(0.5).image, dtype=np.float64)
    image8 = (np.clip(image / np.percentile(image, 99.9), 0, 1) * 255).astype(np.uint8)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(4):
        r, c = divmod(i, 2)
        name = f"Tile_{r + 3:03d}-{c + 1:03d}-{i:0{index_digits}d}_0-000.tif"
        tifffile.imwrite(folder / name, image8[r * 384 : (r + 1) * 384, c * 384 : (c + 1) * 384])
    tile_microscope = create_simulated_microscope(tiles=folder, pixel_size_um=0.3, camera_shape_px=(384, 384))
    CalibrationStore(calibration_store).save(true_calibration(tile_microscope))
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "screen", "--tiles", str(folder), "--pixel-size-um", "0.3",
         "--camera-px", "384", "--max-targets", "1", "--no-labels", "--out", str(tmp_path / "session")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "prefixes" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "session" / "summary.json").is_file()
