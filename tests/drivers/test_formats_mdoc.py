"""SerialEM .mdoc reading (through mdocfile) and writing."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.formats.mdoc import (
    MdocFormatError,
    MdocPiece,
    MontageMetadata,
    format_mdoc,
    montage_metadata,
    parse_mdoc,
    read_mdoc,
    write_mdoc,
)

# Written by hand from the format description in shared/FORMATS.md (not a copied file).
MONTAGE_MDOC = """PixelSpacing = 2312
ImageFile = atlas.mrc
ImageSize = 1024 768
Montage = 1
DataMode = 1
FutureHeaderKey = 7 8

[T = SerialEM: Digitized on a test rig   25-Nov-26  09:00:00]

[T =     Tilt axis angle = 85.3, binning = 4  spot = 9  camera = 0]

[ZValue = 0]
PieceCoordinates = 0 0 0
MinMaxMean = 10 4000 1200.5
TiltAngle = -0.01
StagePosition = -412.5 300.25
StageZ = -12.4
Magnification = 135
MagIndex = 2
Binning = 4
ExposureTime = 0.5
RotationAngle = -95.2
DateTime = 25-Nov-26  09:00:03
AlignedPieceCoordsVS = 2 -1 0
XedgeDxyVS = 0.5 1.5 0.8
UnknownSectionKey = hello world

[ZValue = 1]
PieceCoordinates = 922 0 0
StagePosition = -190.25 300.0
StageZ = -12.4
MagIndex = 2

[MontSection = 0]
TileSize = 5
MontBacklash = 5 5
"""


def test_read_montage_mdoc_typed(tmp_path: Path) -> None:
    path = tmp_path / "atlas.mrc.mdoc"
    path.write_text(MONTAGE_MDOC)
    meta = read_mdoc(path)
    assert meta.path == path
    assert meta.pixel_size_um == pytest.approx(0.2312)
    assert meta.piece_shape_px == (768, 1024)
    assert meta.image_file == "atlas.mrc"
    assert meta.montage is True
    assert meta.data_mode == 1
    assert meta.extra["FutureHeaderKey"] == "7 8"
    assert len(meta.titles) == 2 and meta.titles[0].startswith("SerialEM")
    first, second = meta.pieces
    assert first.z_value == 0 and second.z_value == 1
    assert first.piece_xyz_px == (0, 0, 0) and second.piece_xyz_px == (922, 0, 0)
    assert first.stage_xy_um == (-412.5, 300.25)
    assert first.stage_z_um == pytest.approx(-12.4)
    assert first.mag_index == 2 and first.magnification == 135
    assert first.binning == 4 and first.exposure_s == 0.5
    assert first.rotation_deg == pytest.approx(-95.2)
    assert first.min_max_mean == (10.0, 4000.0, 1200.5)
    assert first.aligned_piece_xyz_px == (2, -1, 0)
    assert first.extra["UnknownSectionKey"] == "hello world"
    assert "XedgeDxyVS" in first.extra
    assert meta.mont_section["TileSize"] == "5"
    assert meta.montage_shape_px == (768, 922 + 1024)
    assert meta.stage_extent_um == (-412.5, -190.25, 300.0, 300.25)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    meta = montage_metadata(
        [(0, 0), (0, 90), (80, 0), (80, 90)],
        (100, 120),
        pixel_size_um=0.05,
        stage_xy_um=[(1.0, 2.0), (5.5, 2.0), (1.0, -2.25), (5.5, -2.25)],
        image_file="x.mrc",
        mag_index=4,
        magnification=2000.0,
        exposure_s=1.5,
    )
    path = write_mdoc(tmp_path / "x.mrc.mdoc", meta)
    back = read_mdoc(path)
    assert back.pixel_size_um == pytest.approx(0.05)
    assert back.piece_shape_px == (100, 120)
    assert [p.piece_xyz_px for p in back.pieces] == [(0, 0, 0), (90, 0, 0), (0, 80, 0), (90, 80, 0)]
    assert [p.stage_xy_um for p in back.pieces] == [p.stage_xy_um for p in meta.pieces]
    assert back.pieces[3].mag_index == 4 and back.pieces[3].exposure_s == 1.5
    assert back.montage_shape_px == (180, 210)
    # extra keys and the MontSection survive a write/read cycle
    richer = MontageMetadata(
        path=None,
        pixel_size_um=1.0,
        piece_shape_px=(4, 4),
        image_file=None,
        montage=True,
        data_mode=6,
        pieces=(MdocPiece(z_value=0, piece_xyz_px=(0, 0, 0), extra={"Foo": "1 2 3"}),),
        titles=("made by a test",),
        mont_section={"MoveStage": "1"},
        extra={"Voltage": "300"},
    )
    again = parse_mdoc(format_mdoc(richer))
    assert again.pieces[0].extra["Foo"] == "1 2 3"
    assert again.mont_section == {"MoveStage": "1"}
    assert again.titles == ("made by a test",)
    assert float(again.extra["Voltage"]) == 300.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not an .mdoc"),
        ("hello world\n", "expected 'key = value'"),
        ("PixelSpacing = 10\n[ZValue = 0\nPieceCoordinates = 0 0 0\n", "section header"),
        ("PixelSpacing = 10\n\n[ZValue = 0]\nPieceCoordinates = a b c\n", "malformed"),
        ("PixelSpacing = abc\n\n[ZValue = 0]\n", "malformed"),
        ("PixelSpacing = 10\n\n[ZValue = 0]\nStagePosition = 1\n", "malformed"),
        ("PixelSpacing = 10\n\n[ZValue = 0]\n\n[ZValue = 0]\n", "twice"),
        ("ImageSize = 0 5\n\n[ZValue = 0]\n", "positive"),
    ],
)
def test_malformed_mdoc_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.mdoc"
    path.write_text(text)
    with pytest.raises(MdocFormatError, match=match):
        read_mdoc(path)


def test_binary_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(MdocFormatError, match="no such"):
        read_mdoc(tmp_path / "none.mdoc")
    binary = tmp_path / "bin.mdoc"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(MdocFormatError, match="not a text file"):
        read_mdoc(binary)


def test_latin1_titles_and_crlf_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "win.mdoc"
    text = "PixelSpacing = 100\r\nImageSize = 8 6\r\n\r\n[T = SerialEM: Grid \xc5 test]\r\n\r\n[ZValue = 0]\r\n"
    path.write_bytes(text.encode("latin-1") + b"PieceCoordinates = 0 0 0\r\n")
    meta = read_mdoc(path)
    assert meta.titles == ("SerialEM: Grid \xc5 test",)
    assert meta.pieces[0].piece_xyz_px == (0, 0, 0) and meta.piece_shape_px == (6, 8)


def test_header_value_with_equals_sign_is_not_an_error() -> None:
    meta = parse_mdoc("PixelSpacing = 10\nNote = a=b\n\n[ZValue = 0]\nPieceCoordinates = 0 0 0\n")
    assert meta.pixel_size_um == pytest.approx(0.001)
    assert "Note" in meta.extra
