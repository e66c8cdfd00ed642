"""SerialEM navigator files: round trips, a second reader (pyserialem), malformed files, exports."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.formats.nav import (
    MAP,
    NavFormatError,
    NavItem,
    format_nav,
    map_item,
    parse_nav,
    point_item,
    read_nav,
    scale_mat_from_matrix_um_per_px,
    targets_to_nav_items,
    write_nav,
    write_targets_csv,
    write_targets_json,
)

# Written by hand from the format description in shared/FORMATS.md.
HAND_WRITTEN = """AdocVersion = 2.00
LastSavedAs = C:\\data\\grid1.nav

[Item = 1]
Color = 0
StageXYZ = 120.5 -340.25 0
NumPts = 1
Regis = 1
Type = 0
Acquire = 1
Note = crystal 1 score 0.93
PtsX = 120.5
PtsY = -340.25

[Item = 17-1-A]
Color = 2
StageXYZ = 0 0 -5.5
NumPts = 5
Regis = 1
Type = 2
MapFile = C:\\data\\atlas.mrc
MapID = 4242
MapMontage = 1
MapSection = 0
MapBinning = 4
MapMagInd = 3
MapCamera = 0
MapScaleMat = 0.5 0 0 -0.5
MapWidthHeight = 2048 2048
GroupID = 77
SamePosId = 3
PtsX = -2048 2048 2048 -2048 -2048
PtsY = 2048 2048 -2048 -2048 2048
"""


def _example_items() -> list[NavItem]:
    scale = scale_mat_from_matrix_um_per_px(np.array([[2.0, 0.1], [-0.1, 2.0]]))
    atlas = map_item(
        "atlas", "atlas.mrc", 1234, (10.0, -20.0, 1.5), (1000, 800), scale, map_montage=True, map_binning=2
    )
    points = [
        point_item(f"{i + 1}", 10.0 + i * 3.25, -20.0 - i, z_um=1.5, note=f"crystal {i}", drawn_id=1234)
        for i in range(3)
    ]
    polygon = NavItem(
        label="poly-1",
        item_type=1,
        stage_xyz_um=(1.0, 1.0, 0.0),
        pts_x=(0.0, 2.0, 2.0, 0.0),
        pts_y=(0.0, 0.0, 2.0, 0.0),
        color=3,
        extra={"GroupID": "5"},
    )
    return [atlas, *points, polygon]


def test_write_read_round_trip(tmp_path: Path) -> None:
    items = _example_items()
    path = write_nav(tmp_path / "targets.nav", items)
    text = path.read_text()
    assert text.startswith("AdocVersion = 2.00\n")
    back = read_nav(path)
    assert [item.label for item in back] == [item.label for item in items]
    for original, reread in zip(items, back, strict=True):
        assert reread.item_type == original.item_type
        assert reread.stage_xyz_um == pytest.approx(original.stage_xyz_um, rel=1e-9)
        assert reread.pts_x == pytest.approx(original.pts_x, rel=1e-9)
        assert reread.pts_y == pytest.approx(original.pts_y, rel=1e-9)
        assert (reread.note, reread.acquire, reread.drawn_id, reread.color) == (
            original.note,
            original.acquire,
            original.drawn_id,
            original.color,
        )
        assert dict(reread.extra) == dict(original.extra)
    assert back[0].map_scale_mat == pytest.approx(items[0].map_scale_mat)
    assert back[0].map_width_height == (1000, 800) and back[0].map_montage is True
    assert back[0].map_binning == 2 and back[0].map_id == 1234
    # writing what was read gives the same text
    assert format_nav(back, saved_as=str(path)) == text


def test_hand_written_file_reads_and_keeps_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "hand.nav"
    path.write_text(HAND_WRITTEN)
    first, atlas = read_nav(path)
    assert parse_nav(HAND_WRITTEN) == [first, atlas]
    assert first.kind == "point" and first.acquire and first.note == "crystal 1 score 0.93"
    assert first.stage_xyz_um == (120.5, -340.25, 0.0)
    assert atlas.label == "17-1-A" and atlas.item_type == MAP and atlas.color_name == "blue"
    assert atlas.map_file == "C:\\data\\atlas.mrc" and atlas.map_mag_ind == 3
    assert dict(atlas.extra) == {"GroupID": "77", "SamePosId": "3"}
    again = tmp_path / "again.nav"
    write_nav(again, [first, atlas])
    assert "GroupID = 77" in again.read_text()
    assert read_nav(again) == [first, atlas]


def test_pyserialem_loads_what_we_write(tmp_path: Path) -> None:
    pyserialem_reader = pytest.importorskip("pyserialem.reader")
    items = _example_items()
    path = write_nav(tmp_path / "for_serialem.nav", items)
    with contextlib.redirect_stdout(io.StringIO()):  # pyserialem prints unknown keys
        loaded = pyserialem_reader.read_nav_file(str(path))
    assert [item.tag for item in loaded] == [item.label for item in items]
    atlas = loaded[0]
    assert atlas.kind == "Map"
    assert atlas.MapID == 1234
    assert len(atlas.markers) == 3  # the points drawn on it (DrawnID) were associated
    assert loaded[2].stage_xy == pytest.approx([13.25, -21.0])
    assert loaded[1].Acquire == 1
    # the map outline we wrote is where pyserialem puts the map's corners
    corners = atlas.pixel_to_stagecoords([(0, 0), (1000, 800)])
    assert corners[0] == pytest.approx((items[0].pts_x[0], items[0].pts_y[0]))
    assert corners[1] == pytest.approx((items[0].pts_x[2], items[0].pts_y[2]))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[Item = 1]\nType = 0\nStageXYZ = 0 0 0\n", "AdocVersion"),
        ("AdocVersion = 2.00\n[Item = 1\nType = 0\n", "section header"),
        ("AdocVersion = 2.00\n[Item = 1]\nStageXYZ = 0 0 0\n", "no Type"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 0\n", "no StageXYZ"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 0\nStageXYZ = a b c\n", "not a list of numbers"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 7\nStageXYZ = 0 0 0\n", "Type must be"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 0\nStageXYZ = 0 0 0\nNumPts = 2\nPtsX = 1\nPtsY = 1\n", "NumPts"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 0\nStageXYZ = 0 0 0\n[Item = 1]\nType = 0\nStageXYZ = 0 0\n", "twice"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 0\nType = 0\n", "twice"),
        ("AdocVersion = 2.00\nthis line is junk\n", "key = value"),
        ("AdocVersion = 2.00\n[Map = 1]\n", "unexpected section"),
        ("AdocVersion = 2.00\n[Item = 1]\nType = 0\nStageXYZ = 0 0 0\nColor = 9\n", "Color"),
    ],
)
def test_malformed_nav_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.nav"
    path.write_text(text)
    with pytest.raises(NavFormatError, match=match):
        read_nav(path)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(NavFormatError, match="no such"):
        read_nav(tmp_path / "none.nav")
    binary = tmp_path / "b.nav"
    binary.write_bytes(b"\x00\x01\xff" * 100)
    with pytest.raises(NavFormatError, match="binary"):
        read_nav(binary)


def test_bad_items_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label"):
        point_item("a]b", 0, 0)
    with pytest.raises(ValueError, match="finite"):
        point_item("x", float("nan"), 0)
    with pytest.raises(ValueError, match="one line"):
        point_item("x", 0, 0, note="two\nlines")
    with pytest.raises(NavFormatError, match="unique"):
        write_nav(tmp_path / "dup.nav", [point_item("1", 0, 0), point_item("1", 1, 1)])
    with pytest.raises(NavFormatError, match="lacks"):
        write_nav(tmp_path / "map.nav", [NavItem(label="m", item_type=MAP)])
    assert not (tmp_path / "dup.nav").exists()
    with pytest.raises(ValueError, match="invertible"):
        scale_mat_from_matrix_um_per_px([[1.0, 2.0], [2.0, 4.0]])


@dataclass(frozen=True)
class _Target:
    row_px: int
    col_px: int
    score: float
    x_um: float | None
    y_um: float | None


def test_target_exports(tmp_path: Path) -> None:
    rows = [_Target(10, 20, 0.91, 5.0, -7.5), _Target(30, 40, 0.5, 6.25, -8.0)]
    csv_path = write_targets_csv(tmp_path / "t.csv", rows)
    with csv_path.open() as handle:
        read_back = list(csv.DictReader(handle))
    assert [float(r["x_um"]) for r in read_back] == [5.0, 6.25]
    assert read_back[0]["score"] == "0.91"
    json_rows = [{"x_um": np.float64(1.5), "bad": float("nan")}]
    json_path = write_targets_json(tmp_path / "t.json", json_rows, source="a.tif")
    payload = json.loads(json_path.read_text())
    assert payload == {"metadata": {"source": "a.tif"}, "targets": [{"x_um": 1.5, "bad": None}]}
    items = targets_to_nav_items(rows, label_prefix="c", drawn_id=7)
    assert [i.label for i in items] == ["c1", "c2"]
    assert items[0].note == "crystal-locator score 0.910" and items[0].drawn_id == 7
    with pytest.raises(ValueError, match="stage coordinates"):
        targets_to_nav_items([_Target(0, 0, 0.1, None, None)])


def test_map_from_transform_agrees_with_pyserialem_pixel_mapping(tmp_path: Path) -> None:
    """A target's mosaic pixel -> our stage um -> pyserialem's map pixel gives the same pixel back."""
    pyserialem_reader = pytest.importorskip("pyserialem.reader")
    from drivers.formats.nav import map_item_from_transform
    from drivers.geometry import pixel_to_stage_um

    shape = (3000, 4000)
    angle = np.radians(12.0)
    matrix = 0.25 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1, -1])
    atlas = map_item_from_transform("atlas", "atlas.mrc", 77, shape, (15.0, -40.0), matrix)
    pixel = np.array([1234.0, 567.0])  # (col, row)
    x_um, y_um = pixel_to_stage_um(pixel, shape, (15.0, -40.0), matrix)
    path = write_nav(tmp_path / "m.nav", [atlas, point_item("t1", x_um, y_um, drawn_id=77)])
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = pyserialem_reader.read_nav_file(str(path))
    back = loaded[0].stage_to_pixelcoords(np.array([x_um, y_um]))
    # pyserialem puts the map centre at (W/2, H/2), we at ((W-1)/2, (H-1)/2): half a pixel apart
    np.testing.assert_allclose(back, pixel + 0.5, atol=1e-6)


_finite = st.floats(min_value=-1e5, max_value=1e5, allow_nan=False, allow_infinity=False)
_label = st.text(alphabet=st.characters(categories=["L", "N"], include_characters="-_. "), min_size=1, max_size=12)
_note = st.text(alphabet=st.characters(categories=["L", "N", "P", "Zs"], exclude_characters="\n\r"), max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(st.tuples(_label, _finite, _finite, _finite, _note, st.booleans()), min_size=1, max_size=6)
)
def test_round_trip_of_arbitrary_points(points: list[tuple[str, float, float, float, str, bool]]) -> None:
    items, seen, note_of = [], set(), {}
    for label, x, y, z, note, acquire in points:
        label = label.strip()
        if not label or label in seen:
            continue
        seen.add(label)
        note_of[label] = note
        items.append(point_item(label, x, y, z, note=note, acquire=acquire))
    if not items:
        return
    back = parse_nav(format_nav(items))
    assert [i.label for i in back] == [i.label for i in items]
    for original, reread in zip(items, back, strict=True):
        assert reread.stage_xyz_um == pytest.approx(original.stage_xyz_um, rel=1e-9, abs=1e-9)
        assert (reread.note, reread.acquire) == (note_of[original.label].strip(), original.acquire)
