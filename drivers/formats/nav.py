"""SerialEM navigator files (`.nav`, autodoc version 2.00) and target exports (CSV, JSON).

A navigator file is plain autodoc text: `AdocVersion = 2.00`, then one `[Item = LABEL]` section per
item with `key = value` lines. `NavItem` types the keys this project uses (stage position in um,
points, registration, acquire flag, note, map fields); every other key is kept as text in
`NavItem.extra` and written back unchanged, so a file read and written again loses nothing.

Item types: 0 point (marker), 1 polygon, 2 map. Colours: 0 red, 1 green, 2 blue, 3 yellow,
4 magenta, 5 black. A point drawn on a map carries `DrawnID = <MapID of the map>`; its `PtsX`/`PtsY`
are stage coordinates (um), like `StageXYZ`.

`MapScaleMat = a b c d` maps a stage offset from the map's centre stage position to a map-pixel
offset from the map's centre: `px = a*dx + b*dy`, `py = c*dx + d*dy` (this is how SerialEM and
`pyserialem` use it). For an image whose pixel -> stage matrix is `A` (drivers.geometry convention,
um per pixel) that is `inv(A)`, see `scale_mat_from_matrix_um_per_px`.

Writes are atomic (temporary file + rename): a reader never sees half a file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drivers.formats.images import write_atomic

logger = logging.getLogger(__name__)

#: The autodoc version written and understood.
ADOC_VERSION = "2.00"
#: SerialEM navigator colours by index.
NAV_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "black")
#: Item types.
POINT, POLYGON, MAP = 0, 1, 2
_TYPE_NAMES = {POINT: "point", POLYGON: "polygon", MAP: "map"}

#: Keys typed by `NavItem` (all others go to `extra`).
_KNOWN_KEYS = (
    "Color",
    "StageXYZ",
    "NumPts",
    "Regis",
    "Type",
    "Acquire",
    "Note",
    "DrawnID",
    "MapFile",
    "MapID",
    "MapMontage",
    "MapSection",
    "MapBinning",
    "MapMagInd",
    "MapCamera",
    "MapScaleMat",
    "MapWidthHeight",
    "PtsX",
    "PtsY",
)


class NavFormatError(ValueError):
    """A navigator file is missing, not autodoc text, or has malformed or inconsistent items."""


@dataclass(frozen=True)
class NavItem:
    """One navigator item (see the module docstring for types, colours and coordinates).

    `stage_xyz_um`: the item's stage position (um). `pts_x`/`pts_y`: its points, stage um (a point
    has one; a polygon repeats its first vertex at the end; a map has its outline). `regis`:
    registration number. `acquire`: marked for the acquire step. `drawn_id`: MapID of the map the
    item was drawn on, else None. Map fields are None for non-map items. `extra`: other keys, text.
    """

    label: str
    item_type: int = POINT
    stage_xyz_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pts_x: tuple[float, ...] = ()
    pts_y: tuple[float, ...] = ()
    color: int = 0
    regis: int = 1
    acquire: bool = False
    note: str = ""
    drawn_id: int | None = None
    map_file: str | None = None
    map_id: int | None = None
    map_section: int | None = None
    map_binning: int | None = None
    map_mag_ind: int | None = None
    map_camera: int | None = None
    map_scale_mat: tuple[float, float, float, float] | None = None
    map_width_height: tuple[int, int] | None = None
    map_montage: bool | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        label = str(self.label).strip()
        if not label or any(ch in label for ch in "[]=\n\r"):
            raise ValueError(f"navigator label {self.label!r} must be non-empty text without [ ] = or line breaks")
        object.__setattr__(self, "label", label)
        if self.item_type not in _TYPE_NAMES:
            raise ValueError(f"item {label}: Type must be 0 (point), 1 (polygon) or 2 (map), got {self.item_type}")
        if not 0 <= self.color < len(NAV_COLORS):
            raise ValueError(f"item {label}: Color must be 0..{len(NAV_COLORS) - 1}, got {self.color}")
        if len(self.stage_xyz_um) != 3 or not all(math.isfinite(v) for v in self.stage_xyz_um):
            raise ValueError(f"item {label}: stage_xyz_um must be three finite numbers (um), got {self.stage_xyz_um}")
        if len(self.pts_x) != len(self.pts_y):
            raise ValueError(f"item {label}: {len(self.pts_x)} PtsX but {len(self.pts_y)} PtsY values")
        if not all(math.isfinite(v) for v in (*self.pts_x, *self.pts_y)):
            raise ValueError(f"item {label}: PtsX/PtsY must be finite numbers (um)")
        if "\n" in self.note or "\r" in self.note:
            raise ValueError(f"item {label}: the note must be one line")
        object.__setattr__(self, "note", self.note.strip())  # autodoc values carry no outer spaces
        for key, value in self.extra.items():
            if not key or any(ch in key for ch in "[]= \n") or "\n" in str(value):
                raise ValueError(f"item {label}: extra key {key!r} = {value!r} is not a valid autodoc line")

    @property
    def kind(self) -> str:
        """'point', 'polygon' or 'map'."""
        return _TYPE_NAMES[self.item_type]

    @property
    def color_name(self) -> str:
        """The colour's name (red, green, ...)."""
        return NAV_COLORS[self.color]


# --------------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------------


def point_item(
    label: str,
    x_um: float,
    y_um: float,
    z_um: float = 0.0,
    note: str = "",
    color: int = 0,
    acquire: bool = True,
    drawn_id: int | None = None,
    regis: int = 1,
) -> NavItem:
    """A point (marker) at stage (x_um, y_um, z_um); `drawn_id` = MapID of the map it belongs to."""
    return NavItem(
        label=label,
        item_type=POINT,
        stage_xyz_um=(float(x_um), float(y_um), float(z_um)),
        pts_x=(float(x_um),),
        pts_y=(float(y_um),),
        color=color,
        regis=regis,
        acquire=acquire,
        note=note,
        drawn_id=drawn_id,
    )


def scale_mat_from_matrix_um_per_px(matrix_um_per_px: np.ndarray | Sequence[Sequence[float]]) -> tuple[float, ...]:
    """`MapScaleMat` (stage um -> map px, a b c d) from a pixel -> stage matrix A (um per px): inv(A)."""
    matrix = np.asarray(matrix_um_per_px, dtype=np.float64)
    if matrix.shape != (2, 2) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-300:
        raise ValueError(f"matrix_um_per_px must be an invertible 2x2 matrix, got {matrix.tolist()}")
    inverse = np.linalg.inv(matrix)
    return tuple(float(v) for v in inverse.ravel())


def map_item(
    label: str,
    map_file: str,
    map_id: int,
    stage_xyz_um: tuple[float, float, float],
    map_width_height: tuple[int, int],
    map_scale_mat: Sequence[float],
    map_section: int = 0,
    map_binning: int = 1,
    map_mag_ind: int = 0,
    map_camera: int = 0,
    map_montage: bool = False,
    color: int = 2,
    regis: int = 1,
    note: str = "",
    acquire: bool = False,
) -> NavItem:
    """A map item: the image `map_file` (section `map_section`) centred at `stage_xyz_um`.

    `map_width_height` is (W, H) in map pixels; `map_scale_mat` the stage -> map pixel matrix
    (a b c d, see the module docstring). The outline points (`PtsX`/`PtsY`, stage um) are the map's
    four corners, closed, as SerialEM draws them.
    """
    scale = tuple(float(v) for v in map_scale_mat)
    if len(scale) != 4:
        raise ValueError(f"map_scale_mat needs 4 numbers (a b c d), got {len(scale)}")
    matrix = np.array(scale).reshape(2, 2)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-300:
        raise ValueError(f"map_scale_mat {scale} is not invertible")
    width, height = int(map_width_height[0]), int(map_width_height[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"map_width_height must be positive, got {map_width_height}")
    corners_px = np.array([(0, 0), (width, 0), (width, height), (0, height), (0, 0)], dtype=np.float64)
    offsets_px = corners_px - np.array([width / 2.0, height / 2.0])
    corners_um = np.asarray(stage_xyz_um[:2], dtype=np.float64) + offsets_px @ np.linalg.inv(matrix).T
    return NavItem(
        label=label,
        item_type=MAP,
        stage_xyz_um=(float(stage_xyz_um[0]), float(stage_xyz_um[1]), float(stage_xyz_um[2])),
        pts_x=tuple(float(v) for v in corners_um[:, 0]),
        pts_y=tuple(float(v) for v in corners_um[:, 1]),
        color=color,
        regis=regis,
        acquire=acquire,
        note=note,
        map_file=map_file,
        map_id=int(map_id),
        map_section=int(map_section),
        map_binning=int(map_binning),
        map_mag_ind=int(map_mag_ind),
        map_camera=int(map_camera),
        map_scale_mat=scale,  # type: ignore[arg-type]
        map_width_height=(width, height),
        map_montage=bool(map_montage),
    )


def map_item_from_transform(
    label: str,
    map_file: str,
    map_id: int,
    shape_px: tuple[int, int],
    stage_xy_um: tuple[float, float],
    matrix_um_per_px: np.ndarray | Sequence[Sequence[float]],
    z_um: float = 0.0,
    map_montage: bool = True,
    **kwargs: Any,
) -> NavItem:
    """A map item for an image (or mosaic) of `shape_px` (rows, cols) whose pixel -> stage mapping is
    `stage_um = stage_xy_um + A @ (pixel - centre)` (drivers.geometry convention, A = `matrix_um_per_px`).

    E.g. with `drivers.formats.montage.fit_stage_transform(montage)`: `map_item_from_transform(
    "atlas", "atlas.mrc", 1, fit.shape_px, fit.stage_xy_um, fit.matrix_um_per_px)`. Points drawn on it
    get `drawn_id=map_id`. Other keyword arguments go to `map_item`.
    """
    return map_item(
        label,
        map_file,
        map_id,
        (float(stage_xy_um[0]), float(stage_xy_um[1]), float(z_um)),
        (int(shape_px[1]), int(shape_px[0])),
        scale_mat_from_matrix_um_per_px(matrix_um_per_px),
        map_montage=map_montage,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _num(value: float) -> str:
    """A float as short text that reads back to the same value to ~1e-10 relative."""
    text = f"{value:.10g}"
    return "0" if text == "-0" else text


def _item_lines(item: NavItem) -> list[str]:
    lines = [
        f"Color = {item.color}",
        "StageXYZ = " + " ".join(_num(v) for v in item.stage_xyz_um),
        f"NumPts = {len(item.pts_x)}",
        f"Regis = {item.regis}",
        f"Type = {item.item_type}",
    ]
    if item.note:
        lines.append(f"Note = {item.note}")
    if item.acquire or item.item_type == POINT:
        lines.append(f"Acquire = {int(item.acquire)}")
    if item.drawn_id is not None:
        lines.append(f"DrawnID = {item.drawn_id}")
    if item.item_type == MAP:
        missing = [
            name
            for name in ("map_file", "map_id", "map_scale_mat", "map_width_height")
            if getattr(item, name) is None
        ]
        if missing:
            raise NavFormatError(f"map item {item.label} lacks {', '.join(missing)}; build maps with map_item()")
    optional: list[tuple[str, Any]] = [
        ("MapFile", item.map_file),
        ("MapID", item.map_id),
        ("MapMontage", None if item.map_montage is None else int(item.map_montage)),
        ("MapSection", item.map_section),
        ("MapBinning", item.map_binning),
        ("MapMagInd", item.map_mag_ind),
        ("MapCamera", item.map_camera),
        ("MapScaleMat", None if item.map_scale_mat is None else " ".join(_num(v) for v in item.map_scale_mat)),
        ("MapWidthHeight", None if item.map_width_height is None else "{} {}".format(*item.map_width_height)),
    ]
    lines.extend(f"{key} = {value}" for key, value in optional if value is not None)
    lines.extend(f"{key} = {value}" for key, value in item.extra.items())
    lines.append("PtsX = " + " ".join(_num(v) for v in item.pts_x))
    lines.append("PtsY = " + " ".join(_num(v) for v in item.pts_y))
    return lines


def format_nav(items: Sequence[NavItem], saved_as: str | None = None) -> str:
    """The `.nav` text for `items`; raises `NavFormatError` for duplicate labels or MapIDs."""
    labels = [item.label for item in items]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise NavFormatError(f"navigator labels must be unique; repeated: {', '.join(duplicates[:10])}")
    map_ids = [item.map_id for item in items if item.map_id is not None]
    if len(set(map_ids)) != len(map_ids):
        raise NavFormatError("MapID values must be unique among map items")
    out = [f"AdocVersion = {ADOC_VERSION}"]
    if saved_as:
        out.append(f"LastSavedAs = {saved_as}")
    out.append("")
    for item in items:
        out.append(f"[Item = {item.label}]")
        out.extend(_item_lines(item))
        out.append("")
    return "\n".join(out)


def write_nav(path: str | os.PathLike[str], items: Sequence[NavItem]) -> Path:
    """Write `items` as a SerialEM navigator file (autodoc 2.00), atomically; returns the path."""
    target = Path(path)
    return write_atomic(target, format_nav(list(items), saved_as=str(target)).encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_nav(path: str | os.PathLike[str]) -> list[NavItem]:
    """Read a SerialEM navigator file (autodoc version 2.00).

    Raises `NavFormatError` naming the file, item and key for a missing or binary file, an old
    (non-autodoc) navigator, a malformed line or value, duplicate labels, or `NumPts` disagreeing
    with `PtsX`/`PtsY`. Unknown keys are kept in `NavItem.extra`.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise NavFormatError(f"{file_path}: no such navigator file")
    try:
        text = file_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        try:
            text = file_path.read_bytes().decode("latin-1")
        except OSError as exc:  # pragma: no cover
            raise NavFormatError(f"{file_path}: cannot read ({exc})") from exc
        if "\x00" in text:
            raise NavFormatError(f"{file_path}: binary data; this is not a navigator text file") from None
    except OSError as exc:
        raise NavFormatError(f"{file_path}: cannot read ({exc})") from exc
    return parse_nav(text, where=str(file_path))


def parse_nav(text: str, where: str = "<nav text>") -> list[NavItem]:
    """Parse navigator text (see `read_nav`); `where` labels error messages."""
    if "\x00" in text:
        raise NavFormatError(f"{where}: binary data; this is not a navigator text file")
    header: dict[str, str] = {}
    sections: list[tuple[str, int, dict[str, str]]] = []
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not line.endswith("]") or "=" not in line:
                raise NavFormatError(f"{where}: line {number}: malformed section header {line[:60]!r}")
            kind, _, label = line[1:-1].partition("=")
            if kind.strip() != "Item":
                raise NavFormatError(
                    f"{where}: line {number}: unexpected section [{kind.strip()}]; expected [Item = ...]"
                )
            current = {}
            sections.append((label.strip(), number, current))
            continue
        if "=" not in line:
            raise NavFormatError(f"{where}: line {number}: expected 'key = value', got {line[:60]!r}")
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        target = header if current is None else current
        if key in target:
            raise NavFormatError(f"{where}: line {number}: key {key} appears twice in the same section")
        target[key] = value
    if "AdocVersion" not in header:
        raise NavFormatError(
            f"{where}: no 'AdocVersion' line at the top; this is not a SerialEM navigator in autodoc format "
            "(an old-format .nav must be re-saved by SerialEM first)"
        )
    items: list[NavItem] = []
    seen: set[str] = set()
    for label, number, values in sections:
        if label in seen:
            raise NavFormatError(f"{where}: line {number}: item label {label!r} is used twice")
        seen.add(label)
        items.append(_item_from_values(label, values, f"{where}: item {label!r} (line {number})"))
    return items


def _floats(values: Mapping[str, str], key: str, where: str, count: int | None = None) -> tuple[float, ...] | None:
    text = values.get(key)
    if text is None:
        return None
    try:
        numbers = tuple(float(v) for v in text.split())
    except ValueError:
        raise NavFormatError(f"{where}: {key} = {text[:60]!r} is not a list of numbers") from None
    if count is not None and len(numbers) != count:
        raise NavFormatError(f"{where}: {key} needs {count} numbers, got {len(numbers)}")
    if not all(math.isfinite(v) for v in numbers):
        raise NavFormatError(f"{where}: {key} holds a non-finite number")
    return numbers


def _int(values: Mapping[str, str], key: str, where: str) -> int | None:
    text = values.get(key)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise NavFormatError(f"{where}: {key} = {text[:60]!r} is not an integer") from None
        if not as_float.is_integer():
            raise NavFormatError(f"{where}: {key} = {text[:60]!r} is not an integer") from None
        return int(as_float)


def _item_from_values(label: str, values: Mapping[str, str], where: str) -> NavItem:
    item_type = _int(values, "Type", where)
    if item_type is None:
        raise NavFormatError(f"{where}: has no Type line (0 point, 1 polygon, 2 map)")
    stage = _floats(values, "StageXYZ", where)
    if stage is None:
        raise NavFormatError(f"{where}: has no StageXYZ line")
    if len(stage) == 2:
        stage = (*stage, 0.0)
    if len(stage) != 3:
        raise NavFormatError(f"{where}: StageXYZ needs 3 numbers (um), got {len(stage)}")
    pts_x = _floats(values, "PtsX", where) or ()
    pts_y = _floats(values, "PtsY", where) or ()
    num_pts = _int(values, "NumPts", where)
    if num_pts is not None and (len(pts_x) != num_pts or len(pts_y) != num_pts):
        raise NavFormatError(f"{where}: NumPts = {num_pts} but {len(pts_x)} PtsX and {len(pts_y)} PtsY values")
    if len(pts_x) != len(pts_y):
        raise NavFormatError(f"{where}: {len(pts_x)} PtsX but {len(pts_y)} PtsY values")
    width_height = _floats(values, "MapWidthHeight", where, 2)
    scale = _floats(values, "MapScaleMat", where, 4)
    montage = _int(values, "MapMontage", where)
    acquire = _int(values, "Acquire", where)
    try:
        return NavItem(
            label=label,
            item_type=item_type,
            stage_xyz_um=(stage[0], stage[1], stage[2]),
            pts_x=pts_x,
            pts_y=pts_y,
            color=_int(values, "Color", where) or 0,
            regis=_int(values, "Regis", where) if "Regis" in values else 1,  # type: ignore[arg-type]
            acquire=bool(acquire),
            note=values.get("Note", ""),
            drawn_id=_int(values, "DrawnID", where),
            map_file=values.get("MapFile"),
            map_id=_int(values, "MapID", where),
            map_section=_int(values, "MapSection", where),
            map_binning=_int(values, "MapBinning", where),
            map_mag_ind=_int(values, "MapMagInd", where),
            map_camera=_int(values, "MapCamera", where),
            map_scale_mat=scale,  # type: ignore[arg-type]
            map_width_height=(int(width_height[0]), int(width_height[1])) if width_height else None,
            map_montage=None if montage is None else bool(montage),
            extra={k: v for k, v in values.items() if k not in _KNOWN_KEYS},
        )
    except ValueError as exc:
        raise NavFormatError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Target exports
# --------------------------------------------------------------------------------------------------


def _row_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    if hasattr(row, "model_dump"):
        return dict(row.model_dump())
    raise TypeError(f"a target row must be a mapping, a dataclass or a pydantic model, got {type(row).__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_targets_csv(path: str | os.PathLike[str], rows: Iterable[Any]) -> Path:
    """Write target rows (mappings, dataclasses or pydantic models) as CSV, atomically.

    Columns are the union of the rows' keys in first-seen order (put `x_um`, `y_um` in the rows for
    stage coordinates); missing values are empty cells.
    """
    dicts = [_row_dict(row) for row in rows]
    columns: list[str] = []
    for row in dicts:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in dicts:
        writer.writerow({key: _jsonable(value) for key, value in row.items()})
    return write_atomic(path, buffer.getvalue().encode("utf-8"))


def write_targets_json(path: str | os.PathLike[str], rows: Iterable[Any], **metadata: Any) -> Path:
    """Write `{"metadata": {...}, "targets": [...]}` as JSON, atomically (non-finite numbers -> null)."""
    payload = {
        "metadata": {key: _jsonable(value) for key, value in metadata.items()},
        "targets": [{key: _jsonable(value) for key, value in _row_dict(row).items()} for row in rows],
    }
    return write_atomic(path, json.dumps(payload, indent=2, allow_nan=False).encode("utf-8"))


def targets_to_nav_items(
    rows: Iterable[Any],
    label_prefix: str = "",
    start: int = 1,
    drawn_id: int | None = None,
    regis: int = 1,
    color: int = 0,
    acquire: bool = True,
) -> list[NavItem]:
    """Point items for target rows with `x_um`, `y_um` (optional `z_um`, `score`, `label`, `note`).

    Labels are `row["label"]` when given, else `label_prefix + number` counting from `start`. The
    note says the score when there is one. Rows without stage coordinates raise `ValueError`.
    """
    items: list[NavItem] = []
    for number, row in enumerate((_row_dict(r) for r in rows), start=start):
        x_um, y_um = row.get("x_um"), row.get("y_um")
        if x_um is None or y_um is None:
            raise ValueError(f"target {number} has no stage coordinates (x_um, y_um); calibrate the map first")
        note = str(row.get("note", ""))
        if not note and row.get("score") is not None:
            note = f"crystal-locator score {float(row['score']):.3f}"
        items.append(
            point_item(
                label=str(row.get("label", f"{label_prefix}{number}")),
                x_um=float(x_um),
                y_um=float(y_um),
                z_um=float(row.get("z_um") or 0.0),
                note=note,
                color=color,
                acquire=acquire,
                drawn_id=drawn_id,
                regis=regis,
            )
        )
    return items
