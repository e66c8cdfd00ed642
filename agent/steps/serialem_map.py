"""A SerialEM grid map as the session's atlas: a montage (`FILE.mrc.mdoc` + `FILE.mrc`) and its navigator map item.

`load_serialem_map(mdoc, nav, map_id)` returns a `SerialemMap` whose `atlas` is the montage at the map's pixels with
the pixel -> stage transform of the navigator's map item, or raises `SerialemMapError` with the reason (nothing is
written either way). What the navigator's keys mean (SerialEM's `CMapDrawItem`, MapDrawItem.h in mastcu/SerialEM):

- `StageXYZ`: the stage position (um) at the map's centre; `MapWidthHeight`: "size of image at which scale matrix
  was defined" (map pixels, the centre pixel at W/2, H/2 as in pyserialem's `MapItem.stage_to_pixelcoords`);
- `MapScaleMat = a b c d`: "scale matrix for drawing", stage um -> map pixels (`drivers.formats.nav`);
- `MapBinning`: "binning at which map was taken or of initial map image"; `MontBinning`: "actual binning of
  montage used to make the map". Rather than trust either, the map's binning relative to the montage as stored is
  read from the sizes: montage width / `MapWidthHeight` W (the same factor for the height, an integer);
- `Regis`: "registration at which item exists" (one per grid load); `MapID`: unique id; a point drawn on a map
  carries `DrawnID` = that map's `MapID`; `Acquire`: "flag to acquire area".

**Orientation.** SerialEM's map pixels are its display pixels, Y inverted relative to the rows stored in the MRC
file (pyserialem flips `py = height - py` to draw on the stored array), while the navigators this project writes
(`drivers.formats.nav.map_item_from_transform`) use the stored rows. Both readings are tried; the pieces' own
`StagePosition`s decide.

**The check.** Each piece's centre, mapped to the stage through the map item's transform, must lie within
`tolerance_um` of the piece's recorded `StagePosition`. The session passes `confirm.radius_um` (5 um by default):
a target drawn on a piece that is off by more would be searched for outside the radius the confirming step looks
in. A map of another area, another binning or a flipped axis misses by tens to hundreds of um and is refused.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np

from agent.steps.atlas import Atlas
from drivers.formats.mdoc import MdocFormatError, MdocReaderMissingError, read_mdoc
from drivers.formats.montage import MontageFormatError, TileMontage, open_montage, serialem_stack_path
from drivers.formats.nav import MAP, NavFormatError, NavItem, parse_nav
from drivers.geometry import image_centre_px

logger = logging.getLogger(__name__)

#: Largest misfit (um) between a piece's recorded stage position and where the map item's transform puts its
#: centre, when no other tolerance is given (the default `confirm.radius_um`; see the module docstring).
DEFAULT_TOLERANCE_UM = 5.0
#: Navigator header key naming the stage's current registration. SerialEM's own files carry only `AdocVersion`
#: and `LastSavedAs` in the header; a navigator that says which registration is current (a lab's script) has the
#: map checked against it.
CURRENT_REGISTRATION_KEY = "CurrentRegistration"
#: Map pixel orientations tried (see the module docstring): rows as stored, or SerialEM's display (Y inverted).
ORIENTATIONS = ("stored", "display")


class SerialemMapError(ValueError):
    """A SerialEM map cannot serve as the atlas; the message says which file and why."""


@dataclass(frozen=True)
class SerialemMap:
    """A loaded SerialEM map: the `atlas` (uint16 map pixels, pixel -> stage from the map item), the navigator's
    `items` (as read) and its `map_item`, the montage pixels per map pixel (`binning`), which orientation the pieces
    confirmed and how well: the largest and RMS distance (um) between a piece's recorded stage position and its
    centre mapped through the transform, over `n_pieces`."""

    atlas: Atlas
    items: tuple[NavItem, ...]
    map_item: NavItem
    binning: int
    orientation: str
    misfit_max_um: float
    misfit_rms_um: float
    n_pieces: int

    @property
    def map_id(self) -> int:
        """The map item's `MapID`."""
        assert self.map_item.map_id is not None
        return self.map_item.map_id

    @property
    def box_um(self) -> tuple[float, float, float, float]:
        """The stage box (x_min, x_max, y_min, y_max um) the map's pixels cover."""
        rows, cols = self.atlas.image.shape
        corners = np.array([(-0.5, -0.5), (cols - 0.5, -0.5), (-0.5, rows - 0.5), (cols - 0.5, rows - 0.5)])
        xy = self.atlas.pixel_to_stage_um(corners)
        return (float(xy[:, 0].min()), float(xy[:, 0].max()), float(xy[:, 1].min()), float(xy[:, 1].max()))

    def describe(self) -> str:
        """One line for people: which map, its size and pixel, and how well the pieces agree."""
        rows, cols = self.atlas.image.shape
        return (
            f"SerialEM map {self.map_id} ({self.map_item.label}): {cols} x {rows} px at "
            f"{self.atlas.pixel_size_um:.4g} um/px (montage binned {self.binning}), {self.orientation} rows; "
            f"{self.n_pieces} pieces within {self.misfit_max_um:.2f} um of their stage positions "
            f"(RMS {self.misfit_rms_um:.2f} um)"
        )


def load_serialem_map(
    mdoc_path: str | os.PathLike[str],
    nav_path: str | os.PathLike[str],
    map_id: int | None = None,
    *,
    tolerance_um: float = DEFAULT_TOLERANCE_UM,
    preset: str = "atlas",
) -> SerialemMap:
    """The SerialEM map of montage `mdoc_path` described by map item `map_id` of navigator `nav_path` (default:
    the navigator's only montage map item of that montage). `preset` names the atlas' optics (the label memory's
    key). `mdoc_path` may also name the `.mrc` stack (its `.mdoc` beside it). Reads files only. Raises
    `SerialemMapError` (see the module docstring for the checks)."""
    mdoc, nav = Path(mdoc_path), Path(nav_path)
    if mdoc.suffix.lower() != ".mdoc":
        mdoc = mdoc.with_name(mdoc.name + ".mdoc")
    text = _read_text(nav)
    try:
        items = parse_nav(text, where=str(nav))
    except NavFormatError as exc:
        raise SerialemMapError(str(exc)) from exc
    stack = _checked_stack(mdoc)
    item = choose_map_item(items, stack, map_id, nav)
    header, keys = raw_keys(text)
    check_registration(item, keys.get(item.label, set()), header, nav)
    try:
        with open_montage(mdoc, section=item.map_section or 0) as montage:
            binning = map_binning(montage.shape_px, item, mdoc)
            image = map_pixels(montage, binning, item.map_width_height)  # type: ignore[arg-type]
            pieces = [
                (p.centre_px[1], p.centre_px[0], p.stage_xy_um) for p in montage.pieces if p.stage_xy_um is not None
            ]
    except (MontageFormatError, MdocFormatError) as exc:
        raise SerialemMapError(str(exc)) from exc
    if not pieces:
        raise SerialemMapError(
            f"{mdoc}: no piece has a StagePosition, so the map's registration cannot be checked; refused"
        )
    centre = image_centre_px(image.shape)
    scale = np.asarray(item.map_scale_mat, dtype=np.float64).reshape(2, 2)
    fits = [_fit(scale, centre, item, binning, pieces, orientation) for orientation in ORIENTATIONS]
    best = min(fits, key=lambda fit: fit[1])
    if abs(fits[0][1] - fits[1][1]) < 1e-6:  # one row of pieces on the centre line: both readings fit
        best = fits[ORIENTATIONS.index("display")]
        logger.warning("%s: the pieces cannot tell the map's Y orientation; taking SerialEM's display rows", mdoc)
    matrix, worst_um, rms_um, orientation = best
    if not worst_um <= tolerance_um:  # also a NaN (a piece's StagePosition not a number)
        raise SerialemMapError(
            f"{nav}: map {item.map_id} ({item.label}) does not match the pieces of {mdoc.name}: a piece's recorded "
            f"stage position is {worst_um:.1f} um from where the map's MapScaleMat puts it (tolerance "
            f"{tolerance_um:g} um); the navigator's map is of another montage or registration"
        )
    atlas = Atlas(
        image=image,
        preset=preset,
        matrix_um_per_px=matrix,
        reference_xy_um=(float(item.stage_xyz_um[0]), float(item.stage_xyz_um[1])),
        reference_px=(float(centre[0]), float(centre[1])),
        tile_stage_xy_um=tuple((float(s[0]), float(s[1])) for _, _, s in pieces),
    )
    return SerialemMap(atlas, tuple(items), item, binning, orientation, worst_um, rms_um, len(pieces))


def _read_text(nav: Path) -> str:
    if not nav.is_file():
        raise SerialemMapError(f"{nav}: no such navigator file")
    raw = nav.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # SerialEM on Windows writes notes in the system code page


def _checked_stack(mdoc: Path) -> Path:
    """The montage's MRC stack, after checking that the `.mdoc` describes it: one `[ZValue]` section per image
    of the stack, pieces of the stack's size."""
    import mrcfile

    try:
        meta = read_mdoc(mdoc)
        stack = serialem_stack_path(mdoc, meta.image_file)
    except (MdocFormatError, MdocReaderMissingError, MontageFormatError) as exc:
        raise SerialemMapError(str(exc)) from exc
    try:
        with mrcfile.open(stack, mode="r", header_only=True, permissive=False) as mrc:
            nx, ny, nz = (int(mrc.header.nx), int(mrc.header.ny), int(mrc.header.nz))
    except Exception as exc:
        raise SerialemMapError(f"{stack}: cannot read the MRC header ({type(exc).__name__}: {exc})") from exc
    if len(meta.pieces) != nz:
        raise SerialemMapError(
            f"{mdoc}: describes {len(meta.pieces)} images but {stack.name} holds {nz}; the .mdoc is not this stack's"
        )
    if meta.piece_shape_px is not None and meta.piece_shape_px != (ny, nx):
        raise SerialemMapError(
            f"{mdoc}: ImageSize {meta.piece_shape_px[1]} x {meta.piece_shape_px[0]} but {stack.name} holds "
            f"{nx} x {ny} images; the .mdoc is not this stack's"
        )
    return stack


def _file_name(path_text: str) -> str:
    """The file name of a path written on Windows or elsewhere (SerialEM writes `X:\\data\\grid.mrc`)."""
    return PureWindowsPath(path_text).name if "\\" in path_text else Path(path_text).name


def choose_map_item(items: list[NavItem], stack: Path, map_id: int | None, nav: Path) -> NavItem:
    """The map item `map_id` (it must show `stack`), or the only montage map item of `stack` when `map_id` is None;
    `SerialemMapError` naming the candidates otherwise."""
    maps = [item for item in items if item.item_type == MAP]
    listing = ", ".join(f"{m.map_id} ({m.label}: {_file_name(m.map_file or '?')})" for m in maps) or "none"
    if map_id is None:
        own = [m for m in maps if m.map_montage and _file_name(m.map_file or "") == stack.name]
        if len(own) == 1:
            return own[0]
        if not own:
            raise SerialemMapError(f"{nav}: no montage map item of {stack.name}; its maps (MapID): {listing}")
        choices = ", ".join(f"{m.map_id} ({m.label})" for m in own)
        raise SerialemMapError(
            f"{nav}: {len(own)} montage map items of {stack.name}: {choices}; pick one with --map-id"
        )
    chosen = next((m for m in maps if m.map_id == map_id), None)
    if chosen is None:
        raise SerialemMapError(f"{nav}: no map item with MapID {map_id}; its maps (MapID): {listing}")
    shown = _file_name(chosen.map_file or "")
    where = f"{nav}: map {map_id} ({chosen.label})"
    if shown != stack.name:
        raise SerialemMapError(f"{where} shows {shown or '?'}, not this montage {stack.name}")
    if chosen.map_montage is False:
        raise SerialemMapError(f"{where} is a single image (MapMontage = 0), not a montage")
    return chosen


def raw_keys(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The navigator's header lines (key -> value) and the keys each item's section really holds (the typed
    reader fills defaults, e.g. `Regis` = 1 when the line is missing)."""
    header: dict[str, str] = {}
    keys: dict[str, set[str]] = {}
    current: set[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]") and "=" in line:
            current = keys.setdefault(line[1:-1].partition("=")[2].strip(), set())
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if current is None:
                header[key.strip()] = value.strip()
            else:
                current.add(key.strip())
    return header, keys


def check_registration(item: NavItem, keys: set[str], header: dict[str, str], nav: Path) -> None:
    """`SerialEMMapError` unless the map item has a stage registration (`Regis` >= 1), a `MapScaleMat` that can be
    inverted and a `MapWidthHeight`, and is at the current registration when the navigator names one."""
    where = f"{nav}: map {item.map_id} ({item.label})"
    if "Regis" not in keys or item.regis < 1:
        raise SerialemMapError(f"{where} has no stage registration (Regis); its pixels cannot be placed on the stage")
    if "MapScaleMat" not in keys or item.map_scale_mat is None:
        raise SerialemMapError(f"{where} has no MapScaleMat (stage -> map pixel matrix); re-save it in SerialEM")
    if abs(np.linalg.det(np.asarray(item.map_scale_mat).reshape(2, 2))) < 1e-12:
        raise SerialemMapError(f"{where}: MapScaleMat {item.map_scale_mat} cannot be inverted")
    if item.map_width_height is None:
        raise SerialemMapError(f"{where} has no MapWidthHeight (the size its scale matrix belongs to)")
    current = header.get(CURRENT_REGISTRATION_KEY)
    if current is not None and current.strip() != str(item.regis):
        raise SerialemMapError(
            f"{where} is at registration {item.regis} but the navigator's current registration is {current.strip()}; "
            "transform the map to the current registration in SerialEM first"
        )


def map_binning(montage_shape_px: tuple[int, int], item: NavItem, mdoc: Path) -> int:
    """Montage pixels per map pixel: montage width / `MapWidthHeight` W, an integer the height agrees with
    (within one map pixel); `SerialemMapError` otherwise (the map is not of this montage)."""
    width, height = item.map_width_height  # type: ignore[misc]
    rows, cols = montage_shape_px
    binning = round(cols / width) if width > 0 else 0
    fits = binning >= 1 and abs(cols // binning - width) <= 1 and abs(rows // binning - height) <= 1
    if not fits:
        raise SerialemMapError(
            f"map {item.map_id} ({item.label}) is {width} x {height} px but the montage {mdoc.name} is {cols} x {rows} "
            "px, not a whole binning of it: the map is not of this montage"
        )
    return int(binning)


def map_pixels(montage: TileMontage, binning: int, width_height: tuple[int, int]) -> np.ndarray:
    """The montage binned `binning` x `binning` (block means), cut or edge-padded to the map's (H, W), as uint16."""
    rows, cols = montage.shape_px
    out_rows, out_cols = rows // binning, cols // binning
    if binning == 1:
        binned = np.asarray(montage.to_array(), dtype=np.float64)
    else:
        binned = np.zeros((out_rows, out_cols), dtype=np.float64)
        for row0, col0, block in montage.iter_blocks(block_px=512 * binning):
            r, c = block.shape[0] // binning, block.shape[1] // binning
            if r and c:
                means = block[: r * binning, : c * binning].reshape(r, binning, c, binning).mean(axis=(1, 3))
                binned[row0 // binning : row0 // binning + r, col0 // binning : col0 // binning + c] = means
    width, height = width_height
    binned = binned[:height, :width]
    pad = ((0, height - binned.shape[0]), (0, width - binned.shape[1]))
    if pad[0][1] or pad[1][1]:
        binned = np.pad(binned, pad, mode="edge")
    return as_uint16(binned)


def as_uint16(image: np.ndarray) -> np.ndarray:
    """Map pixels as uint16 (the locator's input): values already in [0, 65535] rounded as they are, others
    (signed MRC data, float maps) shifted or stretched linearly onto that range; NaN -> 0."""
    data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(data.min()), float(data.max())
    if low < 0 or high > 65535:
        span = high - low
        data = (data - low) * (65535.0 / span if span > 65535 else 1.0)
    return np.clip(np.rint(data), 0, 65535).astype(np.uint16)


def _fit(
    scale: np.ndarray,
    centre_px: np.ndarray,
    item: NavItem,
    binning: int,
    pieces: list[tuple[float, float, tuple[float, float]]],
    orientation: str,
) -> tuple[np.ndarray, float, float, str]:
    """The pixel -> stage matrix (um/px) of map pixels in `orientation` and the largest and RMS distance (um)
    between the pieces' recorded stage positions and their centres (montage col, row) mapped through it."""
    flip = np.diag([1.0, -1.0 if orientation == "display" else 1.0])
    matrix = np.linalg.inv(scale) @ flip
    montage_px = np.array([(col, row) for col, row, _ in pieces], dtype=np.float64)
    map_px = (montage_px + 0.5) / binning - 0.5  # pixel centres of the binned image
    predicted = np.asarray(item.stage_xyz_um[:2]) + (map_px - centre_px) @ matrix.T
    recorded = np.array([stage for _, _, stage in pieces], dtype=np.float64)
    distances = np.hypot(*(predicted - recorded).T)
    return matrix, float(distances.max()), float(math.sqrt(float(np.mean(distances**2)))), orientation
