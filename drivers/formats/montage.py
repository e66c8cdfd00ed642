"""Montages (mosaics of overlapping image pieces), read lazily from SerialEM stacks or tile folders.

`open_montage(path)` understands:

- a folder of tiles named like `Tile_001-002.tif` (first number = row, second = column; 0- or
  1-based, normalised so the smallest index is 0). Tiles may be `.tif/.tiff`, `.png`, `.npy` or
  `.mrc`; any size (edge tiles may be smaller). Tile `(r, c)` is placed at the sum of the steps
  of the rows/columns before it, where a step is the row's/column's tile size times
  `1 - overlap_fraction` (default 0: tiles abut);
- a folder with `layout.json` or `layout.toml` (see `LAYOUT_EXAMPLE`): per tile its `file` and
  either its corner `row_px`/`col_px` in the mosaic or its grid `row`/`col` (placed as above with
  the layout's `overlap_fraction`), optionally `stage_x_um`/`stage_y_um`; plus `pixel_size_um`;
- a SerialEM montage: `FILE.mrc.mdoc` next to its `FILE.mrc` stack (or the `.mrc` itself with the
  `.mdoc` beside it). `PieceCoordinates = X Y Z` give each piece's corner (X = column, Y = row of
  the stack's stored pixel order; the mosaic keeps that order, it is not flipped for display),
  `PixelSpacing` (Angstrom) the pixel size, `StagePosition` (um) each piece's stage position.

Pixels are never resampled or converted: the mosaic has the pieces' dtype (mixed dtypes are an
error). Where pieces overlap, the pixel comes from the piece whose centre is nearest (ties: the
lower piece index), so any region read equals the same slice of the whole mosaic. Pixels no piece
covers get `fill`.

Memory: `read_region` reads only the pieces that overlap the region; MRC stacks are memory-mapped
(`mrcfile.mmap`), uncompressed TIFFs are memory-mapped (`tifffile.memmap`), other tiles are decoded
whole and kept in a small LRU cache (`cache_bytes`, default 256 MiB).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

#: Tile file suffixes a tile folder may hold.
TILE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".npy", ".mrc")
#: Layout file names looked for in a tile folder, in this order.
LAYOUT_FILES: tuple[str, ...] = ("layout.json", "layout.toml")
#: Side of the blocks `read_region` resolves overlaps in (pixels).
_BLOCK_PX = 512
#: The default byte budget of decoded (non memory-mapped) pieces kept in memory.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024

#: An example `layout.json` (TOML: the same keys, `[[tiles]]` tables).
LAYOUT_EXAMPLE = """{
  "pixel_size_um": 0.25,
  "overlap_fraction": 0.1,
  "tiles": [
    {"file": "a.tif", "row_px": 0, "col_px": 0, "stage_x_um": -40.0, "stage_y_um": 10.0},
    {"file": "b.tif", "row": 0, "col": 1}
  ]
}"""

_TILE_NAME = re.compile(r"^(?P<prefix>.*\D)?(?P<row>\d+)[-_xX](?P<col>\d+)(?P<suffix>\.[A-Za-z]+)$")
#: Row and column as the first two numbers, whatever follows (e.g. `Tile_001-002-000000_0-000.tif`, the
#: 2018 study's naming: row, column, then an acquisition index).
_TILE_NAME_LEADING = re.compile(
    r"^(?P<prefix>\D*)(?P<row>\d+)[-_xX](?P<col>\d+)(?:\D[^/]*?)?(?P<suffix>\.[A-Za-z]+)$"
)


class MontageFormatError(ValueError):
    """A montage could not be opened or read: missing pieces, bad layout, mixed dtypes, corrupt files."""


@dataclass(frozen=True)
class MontagePiece:
    """One piece of a montage.

    `row_px`, `col_px`: the piece's top-left corner in the whole mosaic (pixels, from 0).
    `shape_px`: (rows, cols) of the piece. `stage_xy_um`: the stage position (um) at which the piece
    was recorded, when the source says (SerialEM `StagePosition`, layout `stage_x_um/stage_y_um`, or
    a TIFF written by `write_frame_tiff`), else None. `source`: where the pixels come from, for
    messages (a file path, or `stack.mrc[section N]`).
    """

    index: int
    row_px: int
    col_px: int
    shape_px: tuple[int, int]
    stage_xy_um: tuple[float, float] | None
    source: str

    @property
    def centre_px(self) -> tuple[float, float]:
        """(row, col) of the piece's centre in the mosaic, pixels."""
        return (self.row_px + (self.shape_px[0] - 1) / 2.0, self.col_px + (self.shape_px[1] - 1) / 2.0)


class TileMontage:
    """A lazily read mosaic of pieces (see the module docstring for the overlap rule).

    Build one with `open_montage` or `montage_from_arrays`. `loader(i)` must return piece `i` as a
    2-D array of `shape_px` and `dtype` (it may be a memory map). Use as a context manager or call
    `close()` to release memory-mapped files.
    """

    def __init__(
        self,
        pieces: Sequence[MontagePiece],
        loader: Callable[[int], np.ndarray],
        dtype: np.dtype[Any] | type,
        pixel_size_um: float | None = None,
        description: str = "",
        closer: Callable[[], None] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if not pieces:
            raise MontageFormatError(f"{description or 'montage'}: has no pieces")
        if pixel_size_um is not None and not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise MontageFormatError(f"{description}: pixel size must be a positive number of um, got {pixel_size_um}")
        min_row = min(p.row_px for p in pieces)
        min_col = min(p.col_px for p in pieces)
        if min_row != 0 or min_col != 0:  # normalise: the mosaic starts at the smallest corner
            pieces = [
                MontagePiece(p.index, p.row_px - min_row, p.col_px - min_col, p.shape_px, p.stage_xy_um, p.source)
                for p in pieces
            ]
        for position, piece in enumerate(pieces):
            if piece.index != position:
                raise MontageFormatError(f"{description}: piece indices must be 0..n-1 in order")
            if piece.shape_px[0] < 1 or piece.shape_px[1] < 1:
                raise MontageFormatError(f"{description}: piece {piece.source} is empty ({piece.shape_px})")
        self.pieces: tuple[MontagePiece, ...] = tuple(pieces)
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        self.pixel_size_um: float | None = float(pixel_size_um) if pixel_size_um is not None else None
        self.description = description
        self.shape_px: tuple[int, int] = (
            max(p.row_px + p.shape_px[0] for p in self.pieces),
            max(p.col_px + p.shape_px[1] for p in self.pieces),
        )
        self._loader = loader
        self._closer = closer
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_bytes = int(cache_bytes)
        self._corners = np.array([(p.row_px, p.col_px) for p in self.pieces], dtype=np.int64)
        self._ends = self._corners + np.array([p.shape_px for p in self.pieces], dtype=np.int64)
        largest = max(max(p.shape_px) for p in self.pieces)
        # squared doubled distances fit uint32 for pieces below ~23k px a side
        self._dist_dtype = np.uint32 if largest < 23000 else np.int64

    # ---- context management ------------------------------------------------------------------

    def close(self) -> None:
        """Release memory maps and open files; the montage cannot be read afterwards."""
        self._cache.clear()
        if self._closer is not None:
            self._closer()
            self._closer = None
        self._loader = _closed_loader

    def __enter__(self) -> TileMontage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TileMontage({self.description!r}, pieces={len(self.pieces)}, shape_px={self.shape_px}, "
            f"dtype={self.dtype}, pixel_size_um={self.pixel_size_um})"
        )

    # ---- reading -----------------------------------------------------------------------------

    @property
    def piece_shape_px(self) -> tuple[int, int]:
        """The most common piece shape (rows, cols)."""
        shapes = [p.shape_px for p in self.pieces]
        return max(set(shapes), key=shapes.count)

    def piece_image(self, index: int) -> np.ndarray:
        """Piece `index` as stored (a copy, `dtype`, its own `shape_px`)."""
        if not 0 <= index < len(self.pieces):
            raise IndexError(f"piece index {index} out of range: this montage has {len(self.pieces)} pieces")
        return np.array(self._piece(index), copy=True)

    def pieces_in_region(self, row0: int, col0: int, rows: int, cols: int) -> list[int]:
        """Indices of the pieces that overlap the region (mosaic pixels)."""
        hit = (
            (self._corners[:, 0] < row0 + rows)
            & (self._ends[:, 0] > row0)
            & (self._corners[:, 1] < col0 + cols)
            & (self._ends[:, 1] > col0)
        )
        return [int(i) for i in np.flatnonzero(hit)]

    def read_region(self, row0: int, col0: int, rows: int, cols: int, fill: float = 0) -> np.ndarray:
        """The mosaic pixels `[row0:row0+rows, col0:col0+cols]` as a new `(rows, cols)` array of `dtype`.

        The region may extend past the mosaic (or lie wholly outside it): those pixels are `fill`.
        Reads only the overlapping pieces. Raises `ValueError` for negative sizes or a `fill` the
        dtype cannot hold, `MontageFormatError` when a piece file cannot be read.
        """
        row0, col0 = _as_int(row0, "row0"), _as_int(col0, "col0")
        rows, cols = _as_int(rows, "rows"), _as_int(cols, "cols")
        if rows < 0 or cols < 0:
            raise ValueError(f"region size must not be negative, got rows={rows}, cols={cols}")
        out = np.full((rows, cols), _checked_fill(fill, self.dtype), dtype=self.dtype)
        # blocks keep the ownership scratch small, and most blocks lie inside one piece (plain copy)
        for b_row in range(0, rows, _BLOCK_PX):
            for b_col in range(0, cols, _BLOCK_PX):
                block = out[b_row : b_row + _BLOCK_PX, b_col : b_col + _BLOCK_PX]
                self._fill_block(block, row0 + b_row, col0 + b_col)
        return out

    def _fill_block(self, out: np.ndarray, row0: int, col0: int) -> None:
        """Write the mosaic pixels of the block at (row0, col0) into `out` (left as is where no piece is)."""
        rows, cols = out.shape
        hits = self.pieces_in_region(row0, col0, rows, cols)
        if not hits:
            return
        if len(hits) == 1:
            index = hits[0]
            (r_a, r_b), (c_a, c_b) = self._intersection(index, row0, col0, rows, cols)
            piece = self.pieces[index]
            out[r_a - row0 : r_b - row0, c_a - col0 : c_b - col0] = self._piece(index)[
                r_a - piece.row_px : r_b - piece.row_px, c_a - piece.col_px : c_b - piece.col_px
            ]
            return
        best = np.full((rows, cols), np.iinfo(self._dist_dtype).max, dtype=self._dist_dtype)
        for index in hits:
            piece = self.pieces[index]
            (r_a, r_b), (c_a, c_b) = self._intersection(index, row0, col0, rows, cols)
            # doubled distance to the centre is an exact integer: 2*r - (2*row_px + h - 1)
            dr = np.arange(2 * r_a, 2 * r_b, 2, dtype=np.int64) - (2 * piece.row_px + piece.shape_px[0] - 1)
            dc = np.arange(2 * c_a, 2 * c_b, 2, dtype=np.int64) - (2 * piece.col_px + piece.shape_px[1] - 1)
            dist = (dr * dr).astype(self._dist_dtype)[:, None] + (dc * dc).astype(self._dist_dtype)[None, :]
            best_view = best[r_a - row0 : r_b - row0, c_a - col0 : c_b - col0]
            wins = dist < best_view
            out_view = out[r_a - row0 : r_b - row0, c_a - col0 : c_b - col0]
            source = self._piece(index)[
                r_a - piece.row_px : r_b - piece.row_px, c_a - piece.col_px : c_b - piece.col_px
            ]
            np.copyto(out_view, source, where=wins)
            np.copyto(best_view, dist, where=wins)

    def to_array(self, fill: float = 0) -> np.ndarray:
        """The whole mosaic in memory, `(rows, cols)` of `dtype` (beware: this is the full size)."""
        return self.read_region(0, 0, self.shape_px[0], self.shape_px[1], fill=fill)

    def iter_blocks(self, block_px: int = 2048) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield `(row0, col0, block)` covering the mosaic in row-major blocks of at most `block_px`."""
        if block_px < 1:
            raise ValueError(f"block_px must be >= 1, got {block_px}")
        for row0 in range(0, self.shape_px[0], block_px):
            for col0 in range(0, self.shape_px[1], block_px):
                rows = min(block_px, self.shape_px[0] - row0)
                cols = min(block_px, self.shape_px[1] - col0)
                yield row0, col0, self.read_region(row0, col0, rows, cols)

    # ---- internals ---------------------------------------------------------------------------

    def _intersection(
        self, index: int, row0: int, col0: int, rows: int, cols: int
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        piece = self.pieces[index]
        r_a = max(row0, piece.row_px)
        r_b = min(row0 + rows, piece.row_px + piece.shape_px[0])
        c_a = max(col0, piece.col_px)
        c_b = min(col0 + cols, piece.col_px + piece.shape_px[1])
        return (r_a, r_b), (c_a, c_b)

    def _piece(self, index: int) -> np.ndarray:
        with self._lock:  # dask's threaded scheduler reads regions from several threads
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
        piece = self.pieces[index]
        try:
            array = self._loader(index)
        except MontageFormatError:
            raise
        except Exception as exc:
            raise MontageFormatError(f"{piece.source}: cannot read piece ({type(exc).__name__}: {exc})") from exc
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if tuple(array.shape) != piece.shape_px:
            raise MontageFormatError(
                f"{piece.source}: piece has shape {tuple(array.shape)}, expected {piece.shape_px}; "
                "the file changed since the montage was opened or the layout is wrong"
            )
        if array.dtype != self.dtype:
            raise MontageFormatError(f"{piece.source}: piece has dtype {array.dtype}, the montage has {self.dtype}")
        if _held_bytes(array) <= self._cache_bytes:
            with self._lock:
                self._cache[index] = array
                while sum(_held_bytes(a) for a in self._cache.values()) > self._cache_bytes:
                    self._cache.popitem(last=False)
        return array


def _held_bytes(array: np.ndarray) -> int:
    """Memory an array holds (0 for memory maps: their pages are file cache)."""
    base: Any = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return 0
        base = getattr(base, "base", None)
    return int(array.nbytes)


def _closed_loader(index: int) -> np.ndarray:
    raise MontageFormatError("this montage was closed; open it again to read pieces")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of pixels, got {value!r}")
    return int(value)


def _checked_fill(fill: float, dtype: np.dtype[Any]) -> Any:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if not (float(fill).is_integer() and info.min <= fill <= info.max):
            raise ValueError(f"fill={fill!r} does not fit the montage dtype {dtype} [{info.min}, {info.max}]")
    return fill


# --------------------------------------------------------------------------------------------------
# Building montages
# --------------------------------------------------------------------------------------------------


def montage_from_arrays(
    arrays: Sequence[np.ndarray],
    corners_px: Sequence[tuple[int, int]],
    pixel_size_um: float | None = None,
    stage_xy_um: Sequence[tuple[float, float]] | None = None,
) -> TileMontage:
    """An in-memory montage: piece `i` is `arrays[i]` with its top-left corner at `corners_px[i]` (row, col)."""
    if len(arrays) != len(corners_px):
        raise MontageFormatError(f"{len(arrays)} arrays but {len(corners_px)} corners")
    if stage_xy_um is not None and len(stage_xy_um) != len(arrays):
        raise MontageFormatError(f"{len(arrays)} arrays but {len(stage_xy_um)} stage positions")
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if len(dtypes) > 1:
        raise MontageFormatError(f"pieces have mixed dtypes {sorted(str(d) for d in dtypes)}; convert them to one")
    for i, array in enumerate(arrays):
        if array.ndim != 2:
            raise MontageFormatError(f"piece {i} must be 2-D, got shape {array.shape}")
    pieces = [
        MontagePiece(
            index=i,
            row_px=int(corner[0]),
            col_px=int(corner[1]),
            shape_px=(int(arrays[i].shape[0]), int(arrays[i].shape[1])),
            stage_xy_um=(float(stage_xy_um[i][0]), float(stage_xy_um[i][1])) if stage_xy_um is not None else None,
            source=f"array[{i}]",
        )
        for i, corner in enumerate(corners_px)
    ]
    stored = list(arrays)
    return TileMontage(pieces, lambda i: stored[i], dtypes.pop(), pixel_size_um, description="in-memory montage")


def open_montage(
    path: str | os.PathLike[str],
    pixel_size_um: float | None = None,
    overlap_fraction: float | None = None,
    *,
    section: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> TileMontage:
    """Open a montage from a tile folder, a folder with a layout file, or a SerialEM `.mdoc`/`.mrc`.

    `pixel_size_um` overrides the size the files give (um per mosaic pixel). `overlap_fraction`
    (0 <= f < 1) is the overlap between neighbouring tiles placed by grid index (tile folders,
    layout tiles given by `row`/`col`); it overrides the layout's value and is ignored where pieces
    have explicit pixel corners. `section` picks the montage in a SerialEM stack holding several
    (`PieceCoordinates` Z); default: the lowest. Raises `MontageFormatError` with the file and the
    problem for anything malformed.
    """
    target = Path(path)
    if overlap_fraction is not None and not 0.0 <= overlap_fraction < 1.0:
        raise MontageFormatError(f"overlap_fraction must be in [0, 1), got {overlap_fraction}")
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise MontageFormatError(f"pixel_size_um must be positive, got {pixel_size_um}")
    if target.is_dir():
        for name in LAYOUT_FILES:
            if (target / name).is_file():
                return _open_layout(target / name, pixel_size_um, overlap_fraction, cache_bytes)
        return _open_named_tiles(target, pixel_size_um, overlap_fraction, cache_bytes)
    if not target.exists():
        raise MontageFormatError(f"{target}: no such file or folder")
    suffix = target.suffix.lower()
    if suffix == ".mdoc":
        return _open_serialem(target, pixel_size_um, section, cache_bytes)
    if suffix in (".mrc", ".st", ".map", ".mrcs"):
        mdoc = target.with_name(target.name + ".mdoc")
        if not mdoc.is_file():
            raise MontageFormatError(
                f"{target}: no {mdoc.name} beside it; a SerialEM montage needs its .mdoc for the piece layout"
            )
        return _open_serialem(mdoc, pixel_size_um, section, cache_bytes)
    if target.name in LAYOUT_FILES:
        return _open_layout(target, pixel_size_um, overlap_fraction, cache_bytes)
    raise MontageFormatError(
        f"{target}: not a montage; give a folder of tiles (Tile_RRR-CCC.tif or a layout.json/.toml), "
        "a SerialEM .mdoc, or its .mrc stack"
    )


# ---- stage mapping and export -----------------------------------------------------------------


@dataclass(frozen=True)
class StageTransform:
    """Mosaic pixel -> stage mapping fitted to the pieces' recorded stage positions.

    In the `drivers.geometry` convention: `stage_um = stage_xy_um + matrix_um_per_px @ (pixel -
    image_centre_px(shape_px))` for a pixel vector (col, row), so `drivers.geometry.pixel_to_stage_um(
    col_row, shape_px, stage_xy_um, matrix_um_per_px)` maps mosaic pixels to stage um.
    `rms_residual_um` is the root-mean-square misfit of the piece centres (stage backlash, stitching).
    """

    shape_px: tuple[int, int]
    stage_xy_um: tuple[float, float]
    matrix_um_per_px: tuple[tuple[float, float], tuple[float, float]]
    rms_residual_um: float
    n_pieces: int


def fit_stage_transform(montage: TileMontage) -> StageTransform | None:
    """Least-squares affine fit of the pieces' stage positions (um) to their centres (mosaic px).

    Needs at least 3 pieces with stage positions that are not all on one line (e.g. a 2 x 2 or
    larger montage); returns None otherwise. For SerialEM montages taken by stage moves the
    positions are the stage coordinates at each piece's centre.
    """
    from drivers.geometry import image_centre_px

    known = [p for p in montage.pieces if p.stage_xy_um is not None]
    if len(known) < 3:
        return None
    centre = image_centre_px(montage.shape_px)
    pixels = np.array([(p.centre_px[1], p.centre_px[0]) for p in known], dtype=np.float64) - centre
    stage = np.array([p.stage_xy_um for p in known], dtype=np.float64)
    design = np.hstack([np.ones((len(known), 1)), pixels])
    if np.linalg.matrix_rank(design) < 3:
        return None
    solution, *_ = np.linalg.lstsq(design, stage, rcond=None)
    residual = stage - design @ solution
    matrix = solution[1:].T  # rows: x_um, y_um; columns: per col px, per row px
    return StageTransform(
        shape_px=montage.shape_px,
        stage_xy_um=(float(solution[0, 0]), float(solution[0, 1])),
        matrix_um_per_px=((float(matrix[0, 0]), float(matrix[0, 1])), (float(matrix[1, 0]), float(matrix[1, 1]))),
        rms_residual_um=float(np.sqrt(np.mean(np.sum(residual**2, axis=1)))),
        n_pieces=len(known),
    )


def write_serialem_montage(montage: TileMontage, stack_path: str | os.PathLike[str]) -> Path:
    """Write `montage` as a SerialEM montage: `stack_path` (`.mrc`, one section per piece, written
    through a memory map piece by piece) and `stack_path + ".mdoc"` (PieceCoordinates, PixelSpacing,
    StagePosition where known). Pieces must share one shape. Returns the `.mdoc` path.

    The stack is written to a temporary name and renamed, so a reader never sees half a stack.
    """
    import mrcfile

    from drivers.formats.mdoc import montage_metadata, write_mdoc

    target = Path(stack_path)
    shapes = {p.shape_px for p in montage.pieces}
    if len(shapes) != 1:
        raise MontageFormatError(f"a SerialEM stack needs pieces of one shape, this montage has {sorted(shapes)}")
    rows, cols = shapes.pop()
    modes = {np.dtype(np.int8): 0, np.dtype(np.int16): 1, np.dtype(np.float32): 2, np.dtype(np.uint16): 6}
    dtype = montage.dtype if montage.dtype in modes else None
    if dtype is None and montage.dtype == np.uint8:
        dtype = np.dtype(np.uint16)  # MRC has no unsigned 8-bit mode that every reader agrees on
    if dtype is None:
        raise MontageFormatError(f"cannot store {montage.dtype} in an MRC stack; convert to uint16 or float32")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial")
    shape = (len(montage.pieces), rows, cols)
    try:
        with mrcfile.new_mmap(temporary, shape=shape, mrc_mode=modes[dtype], overwrite=True) as mrc:
            for piece in montage.pieces:
                mrc.data[piece.index] = montage.piece_image(piece.index).astype(dtype, copy=False)
            if montage.pixel_size_um:
                mrc.voxel_size = montage.pixel_size_um * 1e4
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    stages = [p.stage_xy_um for p in montage.pieces]
    metadata = montage_metadata(
        [(p.row_px, p.col_px) for p in montage.pieces],
        (rows, cols),
        montage.pixel_size_um,
        stage_xy_um=stages if all(s is not None for s in stages) else None,  # type: ignore[arg-type]
        image_file=target.name,
        data_mode=modes[dtype],
    )
    return write_mdoc(target.with_name(target.name + ".mdoc"), metadata)


# ---- SerialEM ---------------------------------------------------------------------------------


def _open_serialem(mdoc_path: Path, pixel_size_um: float | None, section: int | None, cache_bytes: int) -> TileMontage:
    import mrcfile

    from drivers.formats.mdoc import MdocFormatError, read_mdoc

    try:
        meta = read_mdoc(mdoc_path)
    except MdocFormatError as exc:
        raise MontageFormatError(str(exc)) from exc
    pieces_meta = [p for p in meta.pieces if p.piece_xyz_px is not None]
    if not pieces_meta:
        raise MontageFormatError(f"{mdoc_path}: no PieceCoordinates in any [ZValue] section; this is not a montage")
    sections = sorted({p.piece_xyz_px[2] for p in pieces_meta if p.piece_xyz_px is not None})
    chosen = sections[0] if section is None else section
    if chosen not in sections:
        raise MontageFormatError(f"{mdoc_path}: no montage section {chosen}; it holds sections {sections}")
    if len(sections) > 1 and section is None:
        logger.warning(
            "%s holds %d montages (sections %s); opening section %d", mdoc_path, len(sections), sections, chosen
        )
    pieces_meta = [p for p in pieces_meta if p.piece_xyz_px is not None and p.piece_xyz_px[2] == chosen]

    stack_path = serialem_stack_path(mdoc_path, meta.image_file)
    try:
        mrc = mrcfile.mmap(stack_path, mode="r", permissive=False)
    except Exception as exc:
        raise MontageFormatError(
            f"{stack_path}: cannot open the montage's MRC stack ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        data = mrc.data
        if data is None or data.ndim not in (2, 3):
            raise MontageFormatError(f"{stack_path}: MRC holds no image stack (shape {getattr(data, 'shape', None)})")
        stack = data if data.ndim == 3 else data[np.newaxis]
        n_sections, rows, cols = (int(v) for v in stack.shape)
        if meta.piece_shape_px is not None and meta.piece_shape_px != (rows, cols):
            raise MontageFormatError(
                f"{mdoc_path}: ImageSize says pieces are {meta.piece_shape_px[1]} x {meta.piece_shape_px[0]} "
                f"(W x H) but {stack_path.name} holds {cols} x {rows}"
            )
        missing = [p.z_value for p in pieces_meta if p.z_value >= n_sections]
        if missing:
            raise MontageFormatError(
                f"{mdoc_path}: pieces {missing[:5]} are beyond the {n_sections} sections of {stack_path.name}; "
                "the stack is truncated or belongs to another .mdoc"
            )
        size = pixel_size_um or meta.pixel_size_um
        if size is None and float(mrc.voxel_size.x) > 0:
            size = float(mrc.voxel_size.x) * 1e-4
        z_values = [p.z_value for p in pieces_meta]
        pieces = [
            MontagePiece(
                index=i,
                row_px=p.piece_xyz_px[1],  # type: ignore[index]
                col_px=p.piece_xyz_px[0],  # type: ignore[index]
                shape_px=(rows, cols),
                stage_xy_um=p.stage_xy_um,
                source=f"{stack_path}[section {p.z_value}]",
            )
            for i, p in enumerate(pieces_meta)
        ]
        dtype = stack.dtype
    except BaseException:
        mrc.close()
        raise

    def load(index: int) -> np.ndarray:
        return stack[z_values[index]]

    return TileMontage(
        pieces, load, dtype, size, description=str(mdoc_path), closer=mrc.close, cache_bytes=cache_bytes
    )


def serialem_stack_path(mdoc_path: Path, image_file: str | None) -> Path:
    beside = mdoc_path.with_suffix("")  # FILE.mrc.mdoc -> FILE.mrc
    if beside.is_file():
        return beside
    if image_file:
        named = mdoc_path.parent / Path(image_file.replace("\\", "/")).name
        if named.is_file():
            return named
    raise MontageFormatError(
        f"{mdoc_path}: its image stack {beside.name} is missing"
        + (f" (ImageFile = {image_file})" if image_file else "")
        + "; put the .mrc next to the .mdoc"
    )


# ---- tile folders -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _TileInfo:
    path: Path
    shape_px: tuple[int, int]
    dtype: np.dtype[Any]
    pixel_size_um: float | None
    stage_xy_um: tuple[float, float] | None


def _probe_tile(path: Path) -> _TileInfo:
    """Shape, dtype and metadata of a tile file without decoding its pixels (where the format allows)."""
    suffix = path.suffix.lower()
    pixel_size_um: float | None = None
    stage: tuple[float, float] | None = None
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            from drivers.formats.images import _tiff_pixel_size_um, tiff_warnings

            with tiff_warnings(MontageFormatError), tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise MontageFormatError(f"{path}: TIFF has no pages")
                page = tif.pages[0]
                shape = tuple(int(v) for v in page.shape)
                dtype = np.dtype(page.dtype)
                pixel_size_um = _tiff_pixel_size_um(page)
                meta = _json_description(page.description or "")
            if "pixel_size_um" in meta:
                pixel_size_um = float(meta["pixel_size_um"])
            stage_meta = meta.get("stage")
            if isinstance(stage_meta, dict) and "x_um" in stage_meta and "y_um" in stage_meta:
                stage = (float(stage_meta["x_um"]), float(stage_meta["y_um"]))
        elif suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, dtype = tuple(int(v) for v in array.shape), array.dtype
        elif suffix == ".mrc":
            import mrcfile

            with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
                shape, dtype = tuple(int(v) for v in mrc.data.shape), mrc.data.dtype
                if float(mrc.voxel_size.x) > 0:
                    pixel_size_um = float(mrc.voxel_size.x) * 1e-4
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                width, height = img.size
                mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                dtype = np.dtype(np.uint16)
            elif mode == "L":
                dtype = np.dtype(np.uint8)
            elif mode == "I":
                dtype = np.dtype(np.int32)
            elif mode == "F":
                dtype = np.dtype(np.float32)
            else:
                raise MontageFormatError(f"{path}: PNG mode {mode!r} is not grayscale; convert the tiles to grayscale")
            shape = (height, width)
        else:
            raise MontageFormatError(f"{path}: unsupported tile format {suffix!r}; use one of {TILE_SUFFIXES}")
    except MontageFormatError:
        raise
    except Exception as exc:
        raise MontageFormatError(f"{path}: cannot read tile ({type(exc).__name__}: {exc})") from exc
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise MontageFormatError(f"{path}: tile must be a 2-D grayscale image, got shape {shape}")
    if dtype.kind not in "uif":
        raise MontageFormatError(f"{path}: unsupported pixel type {dtype}")
    return _TileInfo(path, (shape[0], shape[1]), np.dtype(dtype), pixel_size_um, stage)


def _json_description(description: str) -> dict[str, Any]:
    if not description.lstrip().startswith("{"):
        return {}
    try:
        parsed = json.loads(description)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _load_tile(path: Path) -> np.ndarray:
    """A tile's pixels: memory-mapped where the file allows, else decoded."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            return tifffile.memmap(path, mode="r")
        except (ValueError, OSError):
            return tifffile.imread(path, key=0)
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    from drivers.formats.images import read_image

    return read_image(path).array


def _tiles_montage(
    infos: Sequence[_TileInfo],
    corners: Sequence[tuple[int, int]],
    stages: Sequence[tuple[float, float] | None],
    pixel_size_um: float | None,
    description: str,
    cache_bytes: int,
) -> TileMontage:
    dtypes = sorted({str(info.dtype) for info in infos})
    if len(dtypes) > 1:
        examples = {str(info.dtype): info.path.name for info in infos}
        raise MontageFormatError(
            f"{description}: tiles have mixed pixel types ({', '.join(f'{d} e.g. {examples[d]}' for d in dtypes)}); "
            "convert them to one type (all 8-bit or all 16-bit)"
        )
    if pixel_size_um is None:
        sizes = {round(info.pixel_size_um, 9) for info in infos if info.pixel_size_um}
        if len(sizes) == 1:
            pixel_size_um = sizes.pop()
        elif len(sizes) > 1:
            logger.warning("%s: tiles disagree on pixel size %s; pass pixel_size_um", description, sorted(sizes))
    pieces = [
        MontagePiece(
            index=i,
            row_px=int(corner[0]),
            col_px=int(corner[1]),
            shape_px=info.shape_px,
            stage_xy_um=stages[i] if stages[i] is not None else info.stage_xy_um,
            source=str(info.path),
        )
        for i, (info, corner) in enumerate(zip(infos, corners, strict=True))
    ]
    paths = [info.path for info in infos]
    return TileMontage(
        pieces,
        lambda i: _load_tile(paths[i]),
        infos[0].dtype,
        pixel_size_um,
        description=description,
        cache_bytes=cache_bytes,
    )


def _grid_corners(
    grid: Sequence[tuple[int, int]], shapes: Sequence[tuple[int, int]], overlap_fraction: float
) -> list[tuple[int, int]]:
    """Corners (row_px, col_px) of tiles at grid positions (row, col), normalised to start at 0.

    A row's height is its tallest tile, a column's width its widest; a row/column with no tile gets
    the median size. Step = size * (1 - overlap), rounded to whole pixels.
    """
    rows0 = min(r for r, _ in grid)
    cols0 = min(c for _, c in grid)
    n_rows = max(r for r, _ in grid) - rows0 + 1
    n_cols = max(c for _, c in grid) - cols0 + 1
    heights: dict[int, int] = {}
    widths: dict[int, int] = {}
    for (r, c), (h, w) in zip(grid, shapes, strict=True):
        heights[r - rows0] = max(heights.get(r - rows0, 0), h)
        widths[c - cols0] = max(widths.get(c - cols0, 0), w)
    median_h = int(np.median([h for h, _ in shapes]))
    median_w = int(np.median([w for _, w in shapes]))
    row_starts = np.concatenate(
        [[0], np.cumsum([round(heights.get(r, median_h) * (1 - overlap_fraction)) for r in range(n_rows - 1)])]
    )
    col_starts = np.concatenate(
        [[0], np.cumsum([round(widths.get(c, median_w) * (1 - overlap_fraction)) for c in range(n_cols - 1)])]
    )
    return [(int(row_starts[r - rows0]), int(col_starts[c - cols0])) for r, c in grid]


def _group_tile_names(files: Sequence[Path], pattern: re.Pattern[str]) -> dict[str, list[tuple[int, int, Path]]]:
    """Tile files by name prefix: prefix -> [(row, col, path)], the row and column read with `pattern`."""
    by_prefix: dict[str, list[tuple[int, int, Path]]] = {}
    for entry in files:
        match = pattern.match(entry.name)
        if match is None or match["suffix"].lower() not in TILE_SUFFIXES:
            continue
        by_prefix.setdefault(match["prefix"] or "", []).append((int(match["row"]), int(match["col"]), entry))
    return by_prefix


def _has_duplicate_positions(by_prefix: dict[str, list[tuple[int, int, Path]]]) -> bool:
    return any(len({(row, col) for row, col, _ in v}) < len(v) for v in by_prefix.values())


def _open_named_tiles(
    folder: Path, pixel_size_um: float | None, overlap_fraction: float | None, cache_bytes: int
) -> TileMontage:
    files = [entry for entry in sorted(folder.iterdir()) if entry.is_file() and not entry.name.startswith(".")]
    by_prefix = _group_tile_names(files, _TILE_NAME)
    if len(by_prefix) > 1 or _has_duplicate_positions(by_prefix):
        # not one montage when the numbers are read at the end of the name: read them at the start
        leading = _group_tile_names(files, _TILE_NAME_LEADING)
        if len(leading) == 1:
            by_prefix = leading  # one montage; two tiles at one position are refused below
    if not by_prefix:
        raise MontageFormatError(
            f"{folder}: no tiles found; name them like Tile_001-002.tif (row-col) or add a layout.json "
            f"(e.g. {LAYOUT_EXAMPLE!r})"
        )
    if len(by_prefix) > 1:
        counts = ", ".join(f"{prefix!r}: {len(v)}" for prefix, v in sorted(by_prefix.items()))
        raise MontageFormatError(
            f"{folder}: tiles with different name prefixes ({counts}); keep one montage per folder or add a layout.json"
        )
    entries = sorted(next(iter(by_prefix.values())))
    seen: dict[tuple[int, int], Path] = {}
    for row, col, entry in entries:
        if (row, col) in seen:
            raise MontageFormatError(
                f"{folder}: tiles {seen[(row, col)].name} and {entry.name} both claim row {row}, col {col}"
            )
        seen[(row, col)] = entry
    infos = [_probe_tile(entry) for _, _, entry in entries]
    grid = [(row, col) for row, col, _ in entries]
    corners = _grid_corners(grid, [info.shape_px for info in infos], overlap_fraction or 0.0)
    return _tiles_montage(infos, corners, [None] * len(infos), pixel_size_um, str(folder), cache_bytes)


# ---- layout files -----------------------------------------------------------------------------


class _LayoutTile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1)
    row_px: int | None = None
    col_px: int | None = None
    row: int | None = None
    col: int | None = None
    stage_x_um: float | None = None
    stage_y_um: float | None = None

    @model_validator(mode="after")
    def _placed(self) -> _LayoutTile:
        explicit = self.row_px is not None and self.col_px is not None
        gridded = self.row is not None and self.col is not None
        if explicit == gridded:
            raise ValueError(f"tile {self.file!r}: give either row_px and col_px, or row and col")
        if (self.stage_x_um is None) != (self.stage_y_um is None):
            raise ValueError(f"tile {self.file!r}: give both stage_x_um and stage_y_um, or neither")
        return self


class _Layout(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pixel_size_um: float | None = Field(default=None, gt=0)
    overlap_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    description: str = ""
    tiles: list[_LayoutTile] = Field(min_length=1)


def _read_layout(layout_path: Path) -> _Layout:
    try:
        raw = layout_path.read_bytes()
        if layout_path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MontageFormatError(f"{layout_path}: cannot parse ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise MontageFormatError(f"{layout_path}: expected an object with 'tiles', e.g. {LAYOUT_EXAMPLE}")
    try:
        return _Layout.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise MontageFormatError(f"{layout_path}: invalid layout ({problems}); example: {LAYOUT_EXAMPLE}") from exc


def _open_layout(
    layout_path: Path, pixel_size_um: float | None, overlap_fraction: float | None, cache_bytes: int
) -> TileMontage:
    layout = _read_layout(layout_path)
    folder = layout_path.parent
    infos: list[_TileInfo] = []
    for tile in layout.tiles:
        tile_path = (folder / tile.file).resolve()
        if not tile_path.is_file():
            raise MontageFormatError(f"{layout_path}: tile file {tile.file!r} does not exist in {folder}")
        infos.append(_probe_tile(tile_path))
    overlap = layout.overlap_fraction if overlap_fraction is None else overlap_fraction
    gridded = [i for i, t in enumerate(layout.tiles) if t.row is not None]
    corners: list[tuple[int, int]] = [(t.row_px or 0, t.col_px or 0) for t in layout.tiles]
    if gridded:
        grid_corners = _grid_corners(
            [(layout.tiles[i].row or 0, layout.tiles[i].col or 0) for i in gridded],
            [infos[i].shape_px for i in gridded],
            overlap,
        )
        for i, corner in zip(gridded, grid_corners, strict=True):
            corners[i] = corner
    stages = [
        (t.stage_x_um, t.stage_y_um) if t.stage_x_um is not None and t.stage_y_um is not None else None
        for t in layout.tiles
    ]
    size = pixel_size_um or layout.pixel_size_um
    return _tiles_montage(infos, corners, stages, size, str(layout_path), cache_bytes)
