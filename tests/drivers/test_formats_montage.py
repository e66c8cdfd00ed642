"""Montages: tile folders, layout files and SerialEM .mrc + .mdoc stacks, read lazily."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.formats.montage import (
    MontageFormatError,
    TileMontage,
    montage_from_arrays,
    open_montage,
)


def _mosaic(rows: int, cols: int, dtype: type = np.uint16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    high = 250 if dtype == np.uint8 else 60000
    return rng.integers(0, high, (rows, cols)).astype(dtype)


def _cut(
    mosaic: np.ndarray, tile_shape: tuple[int, int], step: tuple[int, int], grid: tuple[int, int]
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    tiles, corners = [], []
    for r in range(grid[0]):
        for c in range(grid[1]):
            r0, c0 = r * step[0], c * step[1]
            tiles.append(mosaic[r0 : r0 + tile_shape[0], c0 : c0 + tile_shape[1]].copy())
            corners.append((r0, c0))
    return tiles, corners


def _write_mdoc_text(path: Path, corners: list[tuple[int, int]], tile_shape: tuple[int, int], spacing_a: float) -> None:
    """An .mdoc in SerialEM's own layout, written by hand from the format description."""
    lines = [
        f"PixelSpacing = {spacing_a}",
        f"ImageFile = {path.name[:-5]}",
        f"ImageSize = {tile_shape[1]} {tile_shape[0]}",
        "Montage = 1",
        "DataMode = 6",
        "",
        "[T = SerialEM: Digitized on a test rig   25-Nov-26  10:11:58]",
        "",
    ]
    for z, (r0, c0) in enumerate(corners):
        lines += [
            f"[ZValue = {z}]",
            f"PieceCoordinates = {c0} {r0} 0",
            "MinMaxMean = 12 60000 30000.5",
            "TiltAngle = 0.02",
            f"StagePosition = {100.5 + c0 * 0.1} {-50.25 + r0 * 0.1}",
            "StageZ = 3.1",
            "Magnification = 135",
            "Intensity = 0.4",
            "ExposureDose = 0",
            "PixelSpacing = 2312",
            "SpotSize = 7",
            "Defocus = -1.2",
            "ImageShift = 0 0",
            "RotationAngle = 175.1",
            "ExposureTime = 1",
            "Binning = 2",
            "CameraIndex = 1",
            "DividedBy2 = 0",
            "MagIndex = 3",
            "CountsPerElectron = 32",
            "SomeFutureKey = kept as text",
            "DateTime = 25-Nov-26  10:12:01",
            f"AlignedPieceCoordsVS = {c0 + 1} {r0 - 1} 0",
            "XedgeDxyVS = 1.5 -0.4 0.9",
            "",
        ]
    lines += ["[MontSection = 0]", "TileSize = 5", "MontBacklash = 5 5", "MoveStage = 1", ""]
    path.write_text("\n".join(lines))


@pytest.fixture
def serialem_montage(tmp_path: Path) -> tuple[Path, np.ndarray, list[tuple[int, int]]]:
    mosaic = _mosaic(130, 170)
    tiles, corners = _cut(mosaic, (50, 70), (40, 50), (3, 3))
    with mrcfile.new(tmp_path / "grid1.mrc") as mrc:
        mrc.set_data(np.stack(tiles))
        mrc.voxel_size = 2312.0
    _write_mdoc_text(tmp_path / "grid1.mrc.mdoc", corners, (50, 70), 2312.0)
    return tmp_path / "grid1.mrc.mdoc", mosaic, corners


def test_serialem_mdoc_montage_layout_and_pixels(serialem_montage: tuple[Path, np.ndarray, list]) -> None:
    mdoc_path, mosaic, corners = serialem_montage
    with open_montage(mdoc_path) as montage:
        assert montage.shape_px == (130, 170)
        assert montage.dtype == np.uint16
        assert montage.pixel_size_um == pytest.approx(0.2312)
        assert len(montage.pieces) == 9
        assert [(p.row_px, p.col_px) for p in montage.pieces] == corners
        assert montage.pieces[4].stage_xy_um == pytest.approx((100.5 + 50 * 0.1, -50.25 + 40 * 0.1))
        assert montage.pieces[4].shape_px == (50, 70)
        assert "section 4" in montage.pieces[4].source
        np.testing.assert_array_equal(montage.to_array(), mosaic)
        np.testing.assert_array_equal(montage.piece_image(8), mosaic[80:130, 100:170])


def test_open_by_mrc_path_and_missing_mdoc(serialem_montage: tuple[Path, np.ndarray, list], tmp_path: Path) -> None:
    mdoc_path, mosaic, _ = serialem_montage
    with open_montage(mdoc_path.with_suffix("")) as montage:
        np.testing.assert_array_equal(montage.read_region(10, 20, 30, 40), mosaic[10:40, 20:60])
    lone = tmp_path / "lone.mrc"
    with mrcfile.new(lone) as mrc:
        mrc.set_data(np.zeros((2, 4, 4), np.uint16))
    with pytest.raises(MontageFormatError, match=r"lone\.mrc\.mdoc"):
        open_montage(lone)


def test_mdoc_with_truncated_stack_is_a_clear_error(tmp_path: Path) -> None:
    tiles, corners = _cut(_mosaic(90, 120), (50, 70), (40, 50), (2, 2))
    with mrcfile.new(tmp_path / "short.mrc") as mrc:
        mrc.set_data(np.stack(tiles[:3]))
    _write_mdoc_text(tmp_path / "short.mrc.mdoc", corners, (50, 70), 1000.0)
    with pytest.raises(MontageFormatError, match="beyond the 3 sections"):
        open_montage(tmp_path / "short.mrc.mdoc")


def test_mdoc_image_size_mismatch_and_missing_stack(tmp_path: Path) -> None:
    tiles, corners = _cut(_mosaic(90, 120), (50, 70), (40, 50), (2, 2))
    with mrcfile.new(tmp_path / "a.mrc") as mrc:
        mrc.set_data(np.stack(tiles))
    _write_mdoc_text(tmp_path / "a.mrc.mdoc", corners, (70, 50), 1000.0)
    with pytest.raises(MontageFormatError, match="ImageSize"):
        open_montage(tmp_path / "a.mrc.mdoc")
    _write_mdoc_text(tmp_path / "b.mrc.mdoc", corners, (50, 70), 1000.0)
    with pytest.raises(MontageFormatError, match="missing"):
        open_montage(tmp_path / "b.mrc.mdoc")


def test_overlaps_use_the_nearest_piece_centre() -> None:
    # two 10x10 pieces overlapping by 4 columns, constant values: the seam lies mid-overlap
    left = np.full((10, 10), 1, np.uint8)
    right = np.full((10, 10), 2, np.uint8)
    montage = montage_from_arrays([left, right], [(0, 0), (0, 6)])
    mosaic = montage.to_array()
    assert mosaic.shape == (10, 16)
    # columns 6..9 are covered by both; centre of left is col 4.5, of right 10.5 -> cols 6, 7 are left's
    np.testing.assert_array_equal(mosaic[0], [1] * 8 + [2] * 8)
    # any region equals the same slice of the whole mosaic
    for row0, col0, rows, cols in [(0, 5, 3, 4), (2, 7, 8, 9), (-3, -2, 4, 30)]:
        region = montage.read_region(row0, col0, rows, cols, fill=9)
        expected = np.full((rows, cols), 9, np.uint8)
        r_a, c_a = max(row0, 0), max(col0, 0)
        r_b, c_b = min(row0 + rows, 10), min(col0 + cols, 16)
        expected[r_a - row0 : r_b - row0, c_a - col0 : c_b - col0] = mosaic[r_a:r_b, c_a:c_b]
        np.testing.assert_array_equal(region, expected)


def test_region_wholly_outside_is_fill_and_bad_arguments() -> None:
    montage = montage_from_arrays([np.ones((4, 4), np.uint16)], [(0, 0)])
    np.testing.assert_array_equal(montage.read_region(100, 100, 3, 2, fill=7), np.full((3, 2), 7, np.uint16))
    assert montage.read_region(0, 0, 0, 5).shape == (0, 5)
    with pytest.raises(ValueError, match="negative"):
        montage.read_region(0, 0, -1, 5)
    with pytest.raises(ValueError, match="does not fit"):
        montage.read_region(0, 0, 2, 2, fill=-1)
    with pytest.raises(TypeError, match="integer"):
        montage.read_region(0.5, 0, 2, 2)  # type: ignore[arg-type]
    with pytest.raises(IndexError, match="1 pieces"):
        montage.piece_image(1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("one_based", [True, False])
def test_named_tile_folder(tmp_path: Path, dtype: type, one_based: bool) -> None:
    mosaic = _mosaic(2 * 45 + 50, 2 * 63 + 70, dtype)  # tiles 50x70, 10 % overlap -> steps 45, 63
    tiles, _ = _cut(mosaic, (50, 70), (45, 63), (3, 3))
    base = 1 if one_based else 0
    for i, tile in enumerate(tiles):
        tifffile.imwrite(tmp_path / f"Tile_{i // 3 + base:03d}-{i % 3 + base:03d}.tif", tile)
    (tmp_path / "notes.txt").write_text("not a tile")
    montage = open_montage(tmp_path, overlap_fraction=0.1)
    assert montage.dtype == dtype
    assert montage.shape_px == mosaic.shape
    np.testing.assert_array_equal(montage.to_array(), mosaic)
    np.testing.assert_array_equal(montage.read_region(40, 60, 20, 20), mosaic[40:60, 60:80])


@pytest.mark.parametrize(
    "name", ["Tile_{r:03d}-{c:03d}-{i:06d}_0-000.tif", "Tile_{r:03d}-{c:03d}-{i:03d}_0-000.tif"]
)
def test_tile_folder_named_with_an_index_suffix_and_a_late_first_row(tmp_path: Path, name: str) -> None:
    """The 2018 study's naming (row, column, then an index) read by the first two numbers; rows start at 3."""
    mosaic = _mosaic(2 * 30, 3 * 40, np.uint16)
    tiles, _ = _cut(mosaic, (30, 40), (30, 40), (2, 3))
    for i, tile in enumerate(tiles):
        tifffile.imwrite(tmp_path / name.format(r=i // 3 + 3, c=i % 3 + 2, i=i), tile)
    montage = open_montage(tmp_path)
    assert montage.shape_px == mosaic.shape
    assert (montage.pieces[0].row_px, montage.pieces[0].col_px) == (0, 0)
    np.testing.assert_array_equal(montage.to_array(), mosaic)
    # two tiles claiming one row and column are still refused
    tifffile.imwrite(tmp_path / name.format(r=3, c=2, i=99), tiles[0])
    with pytest.raises(MontageFormatError, match="both claim row 3, col 2"):
        open_montage(tmp_path)


def test_tile_folder_with_smaller_edge_tiles_and_gap(tmp_path: Path) -> None:
    mosaic = _mosaic(70, 90, np.uint16)
    # 2x2 grid of 40x50 steps, the last row/col cut short; tile (1, 1) missing
    tifffile.imwrite(tmp_path / "t_0-0.tif", mosaic[0:40, 0:50])
    tifffile.imwrite(tmp_path / "t_0-1.tif", mosaic[0:40, 50:90])
    tifffile.imwrite(tmp_path / "t_1-0.tif", mosaic[40:70, 0:50])
    montage = open_montage(tmp_path)
    assert montage.shape_px == (70, 90)
    expected = mosaic.copy()
    expected[40:, 50:] = 0
    np.testing.assert_array_equal(montage.to_array(), expected)


def test_tile_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(MontageFormatError, match="no tiles found"):
        open_montage(tmp_path)
    tifffile.imwrite(tmp_path / "Tile_001-001.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "Tile_001-002.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(MontageFormatError, match="mixed pixel types"):
        open_montage(tmp_path)
    (tmp_path / "Tile_001-002.tif").unlink()
    (tmp_path / "Tile_001-002.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(MontageFormatError, match="Tile_001-002"):
        open_montage(tmp_path)
    (tmp_path / "Tile_001-002.tif").unlink()
    tifffile.imwrite(tmp_path / "Other_001-002.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(MontageFormatError, match="prefixes"):
        open_montage(tmp_path)
    with pytest.raises(MontageFormatError, match="overlap_fraction"):
        open_montage(tmp_path, overlap_fraction=1.0)
    with pytest.raises(MontageFormatError, match="no such"):
        open_montage(tmp_path / "nothing.mdoc")
    with pytest.raises(MontageFormatError, match="not a montage"):
        open_montage(tmp_path / "Other_001-002.tif")


def test_layout_json_explicit_and_grid_positions(tmp_path: Path) -> None:
    mosaic = _mosaic(60, 100, np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", mosaic[0:60, 0:55])
    tifffile.imwrite(tmp_path / "b.tif", mosaic[0:60, 45:100], compression="zlib")  # decoded, not mmapped
    layout = {
        "pixel_size_um": 0.5,
        "tiles": [
            {"file": "a.tif", "row_px": 0, "col_px": 0, "stage_x_um": -10.0, "stage_y_um": 4.0},
            {"file": "b.tif", "row_px": 0, "col_px": 45},
        ],
    }
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    montage = open_montage(tmp_path)
    assert montage.pixel_size_um == 0.5
    assert montage.pieces[0].stage_xy_um == (-10.0, 4.0)
    assert montage.pieces[1].stage_xy_um is None
    np.testing.assert_array_equal(montage.to_array(), mosaic)
    assert open_montage(tmp_path, pixel_size_um=0.25).pixel_size_um == 0.25


def test_layout_toml_grid_with_overlap(tmp_path: Path) -> None:
    mosaic = _mosaic(40 + 36, 50 + 45, np.uint8)  # 2x2 tiles 40x50, overlap 10 %
    tiles, _ = _cut(mosaic, (40, 50), (36, 45), (2, 2))
    entries = []
    for i, tile in enumerate(tiles):
        np.save(tmp_path / f"p{i}.npy", tile)
        entries.append(f'[[tiles]]\nfile = "p{i}.npy"\nrow = {i // 2}\ncol = {i % 2}\n')
    (tmp_path / "layout.toml").write_text("overlap_fraction = 0.1\n\n" + "\n".join(entries))
    montage = open_montage(tmp_path)
    np.testing.assert_array_equal(montage.to_array(), mosaic)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot parse"),
        ("[1, 2]", "expected an object"),
        ('{"tiles": []}', "tiles"),
        ('{"tiles": [{"file": "a.tif"}]}', "row_px and col_px"),
        ('{"tiles": [{"file": "a.tif", "row": 0, "col": 0, "colour": 3}]}', "colour"),
        ('{"tiles": [{"file": "missing.tif", "row": 0, "col": 0}]}', "does not exist"),
    ],
)
def test_layout_errors(tmp_path: Path, content: str, match: str) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    (tmp_path / "layout.json").write_text(content)
    with pytest.raises(MontageFormatError, match=match):
        open_montage(tmp_path)


def test_tiff_metadata_gives_pixel_size_and_stage(tmp_path: Path) -> None:
    from drivers.base import Frame, FrameMetadata, StagePosition
    from drivers.formats.images import write_frame_tiff

    for col in range(2):
        meta = FrameMetadata(
            preset="atlas",
            magnification=135.0,
            pixel_size_um=0.8,
            stage=StagePosition(x_um=10.0 * col, y_um=-3.0),
            exposure_s=1.0,
            time_s=0.0,
        )
        write_frame_tiff(tmp_path / f"Tile_0-{col}.tif", Frame(np.full((6, 8), col, np.uint16), meta))
    montage = open_montage(tmp_path)
    assert montage.pixel_size_um == pytest.approx(0.8)
    assert montage.pieces[1].stage_xy_um == (10.0, -3.0)
    assert montage.shape_px == (6, 16)


def test_closed_montage_refuses_reads(serialem_montage: tuple[Path, np.ndarray, list]) -> None:
    montage = open_montage(serialem_montage[0])
    assert isinstance(montage, TileMontage)
    montage.close()
    with pytest.raises(MontageFormatError, match="closed"):
        montage.read_region(0, 0, 5, 5)


def test_multi_section_stack_picks_a_section(tmp_path: Path) -> None:
    first = np.full((6, 8), 1, np.uint16)
    second = np.full((6, 8), 2, np.uint16)
    with mrcfile.new(tmp_path / "m.mrc") as mrc:
        mrc.set_data(np.stack([first, first, second]))
    text = "PixelSpacing = 100\nImageSize = 8 6\nMontage = 1\n\n"
    text += "[ZValue = 0]\nPieceCoordinates = 0 0 0\n\n[ZValue = 1]\nPieceCoordinates = 8 0 0\n\n"
    text += "[ZValue = 2]\nPieceCoordinates = 0 0 1\n"
    (tmp_path / "m.mrc.mdoc").write_text(text)
    assert open_montage(tmp_path / "m.mrc.mdoc").shape_px == (6, 16)
    chosen = open_montage(tmp_path / "m.mrc.mdoc", section=1)
    assert chosen.shape_px == (6, 8)
    assert int(chosen.to_array().max()) == 2
    with pytest.raises(MontageFormatError, match="no montage section 5"):
        open_montage(tmp_path / "m.mrc.mdoc", section=5)


def test_stage_transform_fits_piece_positions(serialem_montage: tuple[Path, np.ndarray, list]) -> None:
    from drivers.formats.montage import fit_stage_transform
    from drivers.geometry import pixel_to_stage_um

    with open_montage(serialem_montage[0]) as montage:
        fit = fit_stage_transform(montage)
        assert fit is not None and fit.n_pieces == 9
        # the fixture's stage = (100.5 + 0.1 * corner col, -50.25 + 0.1 * corner row): 0.1 um/px, no rotation
        np.testing.assert_allclose(fit.matrix_um_per_px, [[0.1, 0.0], [0.0, 0.1]], atol=1e-12)
        assert fit.rms_residual_um < 1e-9
        piece = montage.pieces[4]
        centre = np.array([piece.centre_px[1], piece.centre_px[0]])
        stage = pixel_to_stage_um(centre, montage.shape_px, fit.stage_xy_um, np.array(fit.matrix_um_per_px))
        np.testing.assert_allclose(stage, piece.stage_xy_um, atol=1e-9)  # a piece's position is at its centre
        matrix = np.array(fit.matrix_um_per_px)
        moved = pixel_to_stage_um(centre + np.array([10, -20]), montage.shape_px, fit.stage_xy_um, matrix)
        np.testing.assert_allclose(moved - stage, [1.0, -2.0], atol=1e-9)
    one_row = montage_from_arrays([np.zeros((4, 4), np.uint8)] * 3, [(0, 0), (0, 4), (0, 8)],
                                  stage_xy_um=[(0.0, 0.0), (1.0, 0.0), (2.0, 0.0)])
    assert fit_stage_transform(one_row) is None  # collinear: the row direction is unknown


def test_write_serialem_montage_round_trip(tmp_path: Path) -> None:
    from drivers.formats.montage import write_serialem_montage

    mosaic = _mosaic(90, 130, np.uint8)
    tiles, corners = _cut(mosaic, (50, 70), (40, 60), (2, 2))
    source = montage_from_arrays(tiles, corners, pixel_size_um=0.3, stage_xy_um=[(1.0, 2.0)] * 4)
    mdoc = write_serialem_montage(source, tmp_path / "out" / "export.mrc")
    assert mdoc.name == "export.mrc.mdoc"
    with open_montage(mdoc) as again:
        assert again.dtype == np.uint16  # 8-bit is stored as 16-bit MRC
        assert again.pixel_size_um == pytest.approx(0.3)
        assert again.pieces[3].stage_xy_um == (1.0, 2.0)
        np.testing.assert_array_equal(again.to_array(), source.to_array().astype(np.uint16))
    assert not list((tmp_path / "out").glob(".*partial"))


def _brute_force_mosaic(montage: TileMontage, fill: int) -> np.ndarray:
    """Per-pixel reference: the covering piece with the nearest centre (lowest index on ties)."""
    rows, cols = montage.shape_px
    out = np.full((rows, cols), fill, dtype=montage.dtype)
    for r in range(rows):
        for c in range(cols):
            best, best_d = None, None
            for p in montage.pieces:
                if p.row_px <= r < p.row_px + p.shape_px[0] and p.col_px <= c < p.col_px + p.shape_px[1]:
                    cr, cc = p.centre_px
                    d = (r - cr) ** 2 + (c - cc) ** 2
                    if best_d is None or d < best_d:
                        best, best_d = p, d
            if best is not None:
                out[r, c] = montage.piece_image(best.index)[r - best.row_px, c - best.col_px]
    return out


@settings(max_examples=40, deadline=None)
@given(
    layout=st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 14), st.integers(1, 14)),
        min_size=1,
        max_size=5,
    ),
    region=st.tuples(st.integers(-10, 40), st.integers(-10, 40), st.integers(0, 30), st.integers(0, 30)),
)
def test_read_region_matches_a_per_pixel_reference(
    layout: list[tuple[int, int, int, int]], region: tuple[int, int, int, int]
) -> None:
    rng = np.random.default_rng(len(layout))
    arrays = [rng.integers(1, 255, (h, w), dtype=np.uint8) for _, _, h, w in layout]
    montage = montage_from_arrays(arrays, [(r, c) for r, c, _, _ in layout])
    expected = _brute_force_mosaic(montage, fill=0)
    np.testing.assert_array_equal(montage.to_array(), expected)
    row0, col0, rows, cols = region
    padded = np.zeros((rows + 80, cols + 80), np.uint8)
    padded[40 : 40 + expected.shape[0], 40 : 40 + expected.shape[1]] = expected[: rows + 40, : cols + 40]
    np.testing.assert_array_equal(
        montage.read_region(row0, col0, rows, cols),
        padded[40 + row0 : 40 + row0 + rows, 40 + col0 : 40 + col0 + cols],
    )


def test_png_tiles_and_colour_tiles(tmp_path: Path) -> None:
    from PIL import Image

    mosaic = _mosaic(30, 80, np.uint8)
    Image.fromarray(mosaic[:, :40]).save(tmp_path / "img_0_0.png")
    Image.fromarray(mosaic[:, 40:]).save(tmp_path / "img_0_1.png")
    montage = open_montage(tmp_path)
    assert montage.dtype == np.uint8
    np.testing.assert_array_equal(montage.to_array(), mosaic)
    colour = tmp_path / "colour"
    colour.mkdir()
    tifffile.imwrite(colour / "Tile_1-1.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(MontageFormatError, match="grayscale"):
        open_montage(colour)


def test_a_corrupt_tile_gets_one_error_that_says_what_tifffile_saw(tmp_path: Path) -> None:
    """tifffile logs a warning before it gives up on a tile; it is folded into the montage's one error."""
    tifffile.imwrite(tmp_path / "Tile_001-001.tif", np.zeros((8, 8), np.uint16))
    (tmp_path / "Tile_001-002.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(MontageFormatError, match=r"Tile_001-002\.tif: TIFF has no pages \(tifffile: .*invalid offset"):
        open_montage(tmp_path)
