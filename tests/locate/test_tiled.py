"""Tiled (out-of-core) features equal the whole-image features, with bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from agent.locate.errors import ImageInputError, SettingsError
from agent.locate.features import FEATURE_NAMES, grid_features, window_features
from agent.locate.tiled import (
    global_reference_level,
    iter_window_tiles,
    tiled_grid_features,
    tiled_window_features,
)
from drivers.formats.mdoc import montage_metadata, write_mdoc
from drivers.formats.montage import montage_from_arrays, open_montage

#: Features that are sums of low powers: equal to float64 rounding whatever the centring reference.
_STABLE = ("mean", "std", "rel_std", "range", "grad_energy")


def _close(tiled: np.ndarray, whole: np.ndarray, names: tuple[str, ...] = FEATURE_NAMES) -> None:
    """Tiled == whole image, up to the rounding of the centred moments.

    `agent.locate.features` centres each computation on a reference grey level (the image median)
    and takes window sums of d**3 and d**4 as differences of running sums along whole rows; a tile
    has its own reference and shorter rows, so its third and fourth moments carry different
    rounding (for windows next to saturated pixels the whole-image value is the less exact one).
    Low-order features must agree to 1e-9 of their range everywhere; skewness, kurtosis, mode (from
    skewness) and lag1_corr to 1e-5 of their range wherever the whole-image value is well
    conditioned (|mean - median| < 20 std, or flat windows, which are exactly 0 both ways).
    """
    assert tiled.shape == whole.shape
    flat_a = whole.reshape(-1, whole.shape[-1])
    flat_b = tiled.reshape(-1, tiled.shape[-1])
    scale = np.maximum(np.abs(flat_a).max(axis=0), 1.0)
    ref = float(np.median(flat_a[:, names.index("mean")]))
    std = flat_a[:, names.index("std")]
    conditioned = np.abs(flat_a[:, names.index("mean")] - ref) < 20 * std
    conditioned |= std == 0
    assert conditioned.mean() > 0.8  # the test images are mostly well-conditioned film
    for k, name in enumerate(names):
        tolerance = 1e-9 if name in _STABLE else 1e-5
        rows = slice(None) if name in _STABLE else conditioned
        np.testing.assert_allclose(
            flat_a[rows, k] / scale[k], flat_b[rows, k] / scale[k], rtol=0, atol=tolerance, err_msg=name
        )


def _realistic(rows: int, cols: int, seed: int, dtype: type = np.uint16, dark_field: bool = False) -> np.ndarray:
    """Uneven illumination, crystals (bright or dark), a grid bar, hot pixels, a burned-in data bar."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    level = 12000 + 6000 * np.exp(-((yy - rows * 0.4) ** 2 + (xx - cols * 0.6) ** 2) / (0.5 * rows * cols))
    image = rng.poisson(level).astype(np.float64)
    for _ in range(12):
        r, c = rng.integers(0, rows), rng.integers(0, cols)
        size = rng.integers(3, 12)
        image[max(0, r - size) : r + size, max(0, c - size // 2) : c + size // 2] *= 0.4 if not dark_field else 2.5
    image[:, cols // 3 : cols // 3 + 9] = rng.poisson(30, (rows, 9))  # grid bar, nearly black
    image[rng.integers(0, rows, 20), rng.integers(0, cols, 20)] = 65535  # hot pixels
    image[rows - 12 :, : cols // 2] = 0  # data bar
    image[rows - 9 : rows - 4, 5 : cols // 4] = 65535  # its burned-in text
    if dtype == np.uint8:
        image = image / 65535 * 255
    return np.clip(image, 0, np.iinfo(dtype).max).astype(dtype)


@pytest.mark.parametrize(
    ("window_px", "stride_px", "tile_px"),
    [(15, 1, 64), (31, 4, 100), (9, 3, 50), (31, 8, 8), (7, 2, 21)],
)
def test_window_tiles_equal_whole_image(window_px: int, stride_px: int, tile_px: int) -> None:
    image = _realistic(203, 177, seed=window_px)
    whole, names = window_features(image, window_px, stride_px)
    tiled, tiled_names = tiled_window_features(image, window_px, stride_px, tile_px=tile_px)
    assert tiled_names == names
    _close(tiled, whole)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_window_tiles_on_other_dtypes_and_dark_field(dtype: type) -> None:
    image = _realistic(150, 190, seed=3, dtype=np.uint8 if dtype == np.uint8 else np.uint16, dark_field=True)
    image = image.astype(dtype)
    whole, _ = window_features(image, 11, 2)
    tiled, _ = tiled_window_features(image, 11, 2, tile_px=40)
    _close(tiled, whole)


def test_window_tiles_from_an_overlapping_tiff_montage(tmp_path: Path) -> None:
    image = _realistic(320, 384, seed=5)
    step_r, step_c, tile_r, tile_c = 100, 120, 120, 144  # overlaps of 1/6
    for r in range(3):
        for c in range(3):
            piece = image[r * step_r : r * step_r + tile_r, c * step_c : c * step_c + tile_c]
            tifffile.imwrite(tmp_path / f"Tile_{r + 1:03d}-{c + 1:03d}.tif", piece)
    montage = open_montage(tmp_path, overlap_fraction=1 / 6)
    assert montage.shape_px == image.shape
    whole, _ = window_features(image, 21, 3)
    tiled, _ = tiled_window_features(montage, 21, 3, tile_px=64)
    _close(tiled, whole)
    tiles = list(iter_window_tiles(montage, 21, 3, tile_px=64))
    covered = np.zeros(whole.shape[:2], dtype=int)
    for tile in tiles:
        n_r, n_c = tile.features.shape[:2]
        covered[tile.out_row0 : tile.out_row0 + n_r, tile.out_col0 : tile.out_col0 + n_c] += 1
    assert (covered == 1).all()  # every output element exactly once


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 5), (20, 20), (3, 40)])
def test_grid_bands_equal_whole_image(rows: int, cols: int) -> None:
    image = _realistic(211, 187, seed=rows)
    whole, names = grid_features(image, rows, cols)
    tiled, tiled_names = tiled_grid_features(image, rows, cols)
    assert tiled_names == names
    _close(tiled, whole)


def test_grid_bands_from_a_montage_with_a_gap() -> None:
    image = _realistic(120, 150, seed=9, dtype=np.uint8)
    pieces = [image[:70, :80].copy(), image[:70, 70:].copy(), image[60:, :80].copy()]
    montage = montage_from_arrays(pieces, [(0, 0), (0, 70), (60, 0)])  # bottom-right is missing
    mosaic = montage.to_array()
    assert (mosaic[70:, 80:] == 0).all()
    whole, _ = grid_features(mosaic, 6, 6)
    tiled, _ = tiled_grid_features(montage, 6, 6)
    _close(tiled, whole)


def test_dask_path_equals_whole_image() -> None:
    pytest.importorskip("dask.array")
    from agent.locate.tiled import dask_window_features

    image = _realistic(170, 230, seed=11)
    whole, _ = window_features(image, 15, 2)
    lazy = dask_window_features(image, 15, 2, chunk_px=50)
    assert lazy.shape == whole.shape
    _close(lazy.compute(scheduler="synchronous"), whole)
    montage = montage_from_arrays([image[:, :120].copy(), image[:, 100:].copy()], [(0, 0), (0, 100)])
    _close(dask_window_features(montage, 15, 2, chunk_px=64).compute(scheduler="synchronous"), whole)


def test_bad_inputs_are_clear_errors() -> None:
    image = np.zeros((40, 40), np.uint16)
    with pytest.raises(SettingsError, match="odd"):
        tiled_window_features(image, 10, 1)
    with pytest.raises(SettingsError, match="larger than the image"):
        tiled_window_features(image, 41, 1)
    with pytest.raises(SettingsError, match="tile_px"):
        list(iter_window_tiles(image, 5, 1, tile_px=0))
    with pytest.raises(SettingsError, match="too fine"):
        tiled_grid_features(image, 30, 2)
    with pytest.raises(ImageInputError, match="2-D"):
        tiled_window_features(np.zeros((4, 4, 3)), 3, 1)
    with pytest.raises(ImageInputError, match="montage"):
        tiled_grid_features([[1, 2], [3, 4]], 1, 1)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="out must be"):
        tiled_window_features(image, 5, 2, out=np.empty((3, 3, 9)))


def test_global_reference_matches_whole_image_sampling() -> None:
    from agent.locate.features import reference_level

    image = _realistic(600, 530, seed=2)
    montage = montage_from_arrays([image[:300].copy(), image[300:].copy()], [(0, 0), (300, 0)])
    assert global_reference_level(montage) == reference_level(image)


@pytest.mark.slow
def test_memory_stays_bounded_on_a_large_memory_mapped_montage(tmp_path: Path) -> None:
    """A 4096 x 4096 uint16 SerialEM montage (32 MiB on disk): the tiled paths allocate a few MiB."""
    piece_px, step_px, grid = 1100, 1000, 4  # 10 % overlap -> 3000 + 1100 = 4100 px a side
    rng = np.random.default_rng(0)
    corners = [(r * step_px, c * step_px) for r in range(grid) for c in range(grid)]
    with mrcfile.new_mmap(tmp_path / "big.mrc", shape=(grid * grid, piece_px, piece_px), mrc_mode=6) as mrc:
        for z in range(grid * grid):
            mrc.data[z] = rng.integers(1000, 3000, (piece_px, piece_px), dtype=np.uint16)
    write_mdoc(tmp_path / "big.mrc.mdoc", montage_metadata(corners, (piece_px, piece_px), 0.2, image_file="big.mrc"))
    with open_montage(tmp_path / "big.mrc.mdoc") as montage:
        rows, cols = montage.shape_px
        mosaic_bytes = rows * cols * 2
        tracemalloc.start()
        try:
            features, _ = tiled_window_features(montage, 31, 16, tile_px=1024)
            _, window_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            grid, _ = tiled_grid_features(montage, 32, 32)
            _, grid_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert features.shape == (257, 257, 9) and np.isfinite(features).all()
    assert grid.shape == (1024, 9)
    output_bytes = features.nbytes
    # the mosaic is 32 MiB as uint16 and 128 MiB as float64; the tiled paths need a fraction of that
    assert window_peak - output_bytes < mosaic_bytes / 2, (window_peak, mosaic_bytes)
    assert grid_peak < mosaic_bytes / 2, (grid_peak, mosaic_bytes)
