"""SerialEM `.mdoc` metadata (montages and image stacks): a typed reader and a small writer.

Reading goes through the maintained `mdocfile` package (extra `crystal-locator[serialem]`), which
parses the autodoc text into pydantic models; this module turns them into a typed, unit-labelled
`MontageMetadata`. Unknown keys are kept in `extra` dictionaries (as text), never an error.

Units: SerialEM stores `PixelSpacing` in Angstrom per pixel of the stored pieces; here it becomes
`pixel_size_um` (1 A = 1e-4 um). `StagePosition`/`StageZ` are micrometres, `ExposureTime` seconds,
`RotationAngle`/`TiltAngle` degrees. `PieceCoordinates = X Y Z` is the pixel position of the piece's
corner in the whole montage (X = column, Y = row of the stack's stored pixel order) and the section.

`format_mdoc` / `write_mdoc` produce the same text layout SerialEM writes (header lines, one
`[ZValue = N]` section per piece, an optional `[MontSection = 0]`), for test fixtures and exports.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.formats.images import write_atomic

logger = logging.getLogger(__name__)

#: Angstrom -> micrometre.
UM_PER_ANGSTROM = 1e-4


class MdocFormatError(ValueError):
    """An `.mdoc` file is missing, unreadable or malformed (the message names the file and the problem)."""


class MdocReaderMissingError(ImportError):
    """The optional `mdocfile` reader is not installed."""


@dataclass(frozen=True)
class MdocPiece:
    """One `[ZValue = N]` section: a piece (image) of the stack and where it sits.

    `z_value` is the index of the image in the `.mrc` stack (from 0). `piece_xyz_px` is
    `PieceCoordinates` (corner column, corner row, section) or None for non-montage files.
    `aligned_piece_xyz_px` is SerialEM's own stitched position (`AlignedPieceCoordsVS`, else
    `AlignedPieceCoords`) when present. `extra` holds every other key as text.
    """

    z_value: int
    piece_xyz_px: tuple[int, int, int] | None = None
    stage_xy_um: tuple[float, float] | None = None
    stage_z_um: float | None = None
    magnification: float | None = None
    mag_index: int | None = None
    binning: float | None = None
    exposure_s: float | None = None
    rotation_deg: float | None = None
    tilt_deg: float | None = None
    pixel_size_um: float | None = None
    min_max_mean: tuple[float, float, float] | None = None
    date_time: str | None = None
    aligned_piece_xyz_px: tuple[int, int, int] | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MontageMetadata:
    """The content of an `.mdoc` file, typed.

    `piece_shape_px` is `ImageSize` as (rows, cols) (SerialEM writes `ImageSize = W H`).
    `pixel_size_um` is the header `PixelSpacing` (Angstrom) converted to micrometres, or, when the
    header has none, the first piece's own `PixelSpacing`; None if the file never says.
    `mont_section` holds the `[MontSection = 0]` keys as text (empty when absent). `extra` holds
    unknown header keys as text.
    """

    path: Path | None
    pixel_size_um: float | None
    piece_shape_px: tuple[int, int] | None
    image_file: str | None
    montage: bool
    data_mode: int | None
    pieces: tuple[MdocPiece, ...]
    titles: tuple[str, ...] = ()
    mont_section: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def montage_shape_px(self) -> tuple[int, int] | None:
        """(rows, cols) of the whole montage: max(PieceCoordinates) + ImageSize; None if unknown."""
        if self.piece_shape_px is None:
            return None
        coords = [p.piece_xyz_px for p in self.pieces if p.piece_xyz_px is not None]
        if not coords:
            return None
        rows = max(c[1] for c in coords) + self.piece_shape_px[0]
        cols = max(c[0] for c in coords) + self.piece_shape_px[1]
        return (int(rows), int(cols))

    @property
    def stage_extent_um(self) -> tuple[float, float, float, float] | None:
        """(x_min, x_max, y_min, y_max) of the pieces' stage positions in um; None if none have one."""
        xy = [p.stage_xy_um for p in self.pieces if p.stage_xy_um is not None]
        if not xy:
            return None
        xs = [v[0] for v in xy]
        ys = [v[1] for v in xy]
        return (min(xs), max(xs), min(ys), max(ys))


def _import_mdocfile() -> Any:
    try:
        import mdocfile.data_models as data_models
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MdocReaderMissingError(
            "reading SerialEM .mdoc files needs the optional 'mdocfile' package; "
            "install it with: pip install 'crystal-locator[serialem]'"
        ) from exc
    return data_models


def read_mdoc(path: str | os.PathLike[str]) -> MontageMetadata:
    """Read a SerialEM `.mdoc` file into `MontageMetadata`.

    Raises `MdocFormatError` when the file is missing, not text, or has malformed values (e.g.
    `PieceCoordinates = a b`), and `MdocReaderMissingError` when `mdocfile` is not installed.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise MdocFormatError(f"{file_path}: no such .mdoc file")
    try:
        raw = file_path.read_bytes()
    except OSError as exc:
        raise MdocFormatError(f"{file_path}: cannot read ({exc})") from exc
    if b"\x00" in raw:
        raise MdocFormatError(f"{file_path}: not a text file (it holds NUL bytes); is this really an .mdoc?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older Windows tools write titles and notes in a code page
    return parse_mdoc(text, path=file_path)


def parse_mdoc(text: str, path: Path | None = None) -> MontageMetadata:
    """Parse `.mdoc` text (see `read_mdoc`); `path` only labels error messages and the result."""
    data_models = _import_mdocfile()
    where = str(path) if path is not None else "<mdoc text>"
    if "\x00" in text:
        raise MdocFormatError(f"{where}: contains NUL bytes; this is not an .mdoc text file")
    lines = _normalised_lines(text, where)
    if not any(line.startswith(("[ZValue", "[MontSection", "[FrameSet")) for line in lines) and not any(
        line.split("=", 1)[0].strip() in ("PixelSpacing", "ImageSize", "ImageFile") for line in lines
    ):
        raise MdocFormatError(f"{where}: no .mdoc header keys and no [ZValue = N] sections; not an .mdoc file")
    mdoc_logger = logging.getLogger("mdocfile")
    previous_level = mdoc_logger.level
    mdoc_logger.setLevel(logging.ERROR)  # it warns about every unknown key, which we keep anyway
    try:
        mdoc = data_models.Mdoc.from_lines(lines)
    except Exception as exc:  # pydantic ValidationError, ValueError from malformed lines
        raise MdocFormatError(f"{where}: malformed .mdoc ({_short_error(exc)})") from exc
    finally:
        mdoc_logger.setLevel(previous_level)
    return _to_metadata(mdoc, path, where)


def _normalised_lines(text: str, where: str) -> list[str]:
    """Strip lines and drop the ones `mdocfile` cannot split (no `=`), after checking the shape."""
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            lines.append("")
            continue
        if line.startswith("["):
            if not line.endswith("]") or "=" not in line:
                raise MdocFormatError(f"{where}: line {number}: malformed section header {line[:60]!r}")
            lines.append(line)
            continue
        if "=" not in line:
            raise MdocFormatError(f"{where}: line {number}: expected 'key = value', got {line[:60]!r}")
        key, value = line.split("=", 1)
        # mdocfile splits header lines on every '=' and fails on a second one: such free-text values
        # (rare) keep their text with ':' in place of the extra '='.
        lines.append(f"{key.strip()} = {value.strip().replace('=', ':')}" if "=" in value else line)
    return lines


def _short_error(exc: Exception) -> str:
    message = str(exc).strip().splitlines()
    return " ".join(message[:4])[:400]


def _as_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _opt_int_triplet(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    numbers = [round(float(v)) for v in value]
    if len(numbers) == 2:
        numbers.append(0)
    return (int(numbers[0]), int(numbers[1]), int(numbers[2]))


_PIECE_KEYS = {
    "ZValue",
    "PieceCoordinates",
    "StagePosition",
    "StageZ",
    "Magnification",
    "MagIndex",
    "Binning",
    "ExposureTime",
    "RotationAngle",
    "TiltAngle",
    "PixelSpacing",
    "MinMaxMean",
    "DateTime",
    "AlignedPieceCoordsVS",
    "AlignedPieceCoords",
}
_HEADER_KEYS = {"PixelSpacing", "ImageSize", "ImageFile", "Montage", "DataMode"}


def _to_metadata(mdoc: Any, path: Path | None, where: str) -> MontageMetadata:
    header = mdoc.global_data
    pieces: list[MdocPiece] = []
    mont_section: dict[str, str] = {}
    for section in mdoc.section_data:
        values = section.model_dump()
        values.update(section.model_extra or {})
        present = {k: v for k, v in values.items() if v is not None}
        if section.MontSection is not None and section.ZValue is None:
            mont_section = {k: _as_text(v) for k, v in present.items() if k != "MontSection"}
            continue
        if section.ZValue is None:
            continue  # FrameSet sections and the like: not pieces
        if section.ZValue < 0:
            raise MdocFormatError(f"{where}: [ZValue = {section.ZValue}] is negative")
        aligned = section.AlignedPieceCoordsVS
        if aligned is None:
            aligned = section.AlignedPieceCoords
        spacing = _opt_float(section.PixelSpacing)
        stage = section.StagePosition
        try:
            piece = MdocPiece(
                z_value=int(section.ZValue),
                piece_xyz_px=_opt_int_triplet(section.PieceCoordinates),
                stage_xy_um=(float(stage[0]), float(stage[1])) if stage is not None else None,
                stage_z_um=_opt_float(section.StageZ),
                magnification=_opt_float(section.Magnification),
                mag_index=section.MagIndex,
                binning=_opt_float(section.Binning),
                exposure_s=_opt_float(section.ExposureTime),
                rotation_deg=_opt_float(section.RotationAngle),
                tilt_deg=_opt_float(section.TiltAngle),
                pixel_size_um=spacing * UM_PER_ANGSTROM if spacing and spacing > 0 else None,
                min_max_mean=tuple(float(v) for v in section.MinMaxMean)  # type: ignore[arg-type]
                if section.MinMaxMean is not None
                else None,
                date_time=section.DateTime,
                aligned_piece_xyz_px=_opt_int_triplet(aligned),
                extra={k: _as_text(v) for k, v in present.items() if k not in _PIECE_KEYS},
            )
        except (TypeError, ValueError) as exc:
            raise MdocFormatError(f"{where}: [ZValue = {section.ZValue}]: malformed value ({exc})") from exc
        pieces.append(piece)
    z_values = [p.z_value for p in pieces]
    if len(set(z_values)) != len(z_values):
        raise MdocFormatError(f"{where}: a [ZValue = N] section appears twice; each piece needs its own N")

    spacing_angstrom = _opt_float(header.PixelSpacing)
    pixel_size_um = spacing_angstrom * UM_PER_ANGSTROM if spacing_angstrom and spacing_angstrom > 0 else None
    if pixel_size_um is None:
        pixel_size_um = next((p.pixel_size_um for p in pieces if p.pixel_size_um), None)
    shape: tuple[int, int] | None = None
    if header.ImageSize is not None:
        width, height = (int(v) for v in header.ImageSize)
        if width <= 0 or height <= 0:
            raise MdocFormatError(f"{where}: ImageSize = {width} {height} must be positive")
        shape = (height, width)
    header_values = header.model_dump()
    header_values.update(header.model_extra or {})
    extra = {k: _as_text(v) for k, v in header_values.items() if v is not None and k not in _HEADER_KEYS}
    montage_flag = bool(header.Montage) if header.Montage is not None else any(p.piece_xyz_px for p in pieces)
    return MontageMetadata(
        path=path,
        pixel_size_um=pixel_size_um,
        piece_shape_px=shape,
        image_file=str(header.ImageFile) if header.ImageFile is not None else None,
        montage=montage_flag,
        data_mode=header.DataMode,
        pieces=tuple(sorted(pieces, key=lambda p: p.z_value)),
        titles=tuple(t.strip()[1:-1].split("=", 1)[-1].strip() for t in mdoc.titles),
        mont_section=mont_section,
        extra=extra,
    )


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.6g}"


def format_mdoc(metadata: MontageMetadata) -> str:
    """The `.mdoc` text of `metadata`, in SerialEM's layout (header, titles, sections)."""
    lines: list[str] = []
    if metadata.pixel_size_um is not None:
        lines.append(f"PixelSpacing = {_fmt(metadata.pixel_size_um / UM_PER_ANGSTROM)}")
    if metadata.image_file is not None:
        lines.append(f"ImageFile = {metadata.image_file}")
    if metadata.piece_shape_px is not None:
        lines.append(f"ImageSize = {metadata.piece_shape_px[1]} {metadata.piece_shape_px[0]}")
    lines.append(f"Montage = {1 if metadata.montage else 0}")
    if metadata.data_mode is not None:
        lines.append(f"DataMode = {metadata.data_mode}")
    lines.extend(f"{key} = {value}" for key, value in metadata.extra.items())
    lines.append("")
    for title in metadata.titles:
        lines.extend([f"[T = {title}]", ""])
    for piece in metadata.pieces:
        lines.append(f"[ZValue = {piece.z_value}]")
        lines.extend(_piece_lines(piece))
        lines.append("")
    if metadata.mont_section:
        lines.append("[MontSection = 0]")
        lines.extend(f"{key} = {value}" for key, value in metadata.mont_section.items())
        lines.append("")
    return "\n".join(lines)


def _piece_lines(piece: MdocPiece) -> list[str]:
    out: list[str] = []
    if piece.piece_xyz_px is not None:
        out.append("PieceCoordinates = {} {} {}".format(*piece.piece_xyz_px))
    if piece.min_max_mean is not None:
        out.append("MinMaxMean = {} {} {}".format(*(_fmt(v) for v in piece.min_max_mean)))
    if piece.tilt_deg is not None:
        out.append(f"TiltAngle = {_fmt(piece.tilt_deg)}")
    if piece.stage_xy_um is not None:
        out.append(f"StagePosition = {_fmt(piece.stage_xy_um[0])} {_fmt(piece.stage_xy_um[1])}")
    if piece.stage_z_um is not None:
        out.append(f"StageZ = {_fmt(piece.stage_z_um)}")
    if piece.magnification is not None:
        out.append(f"Magnification = {_fmt(piece.magnification)}")
    if piece.mag_index is not None:
        out.append(f"MagIndex = {piece.mag_index}")
    if piece.binning is not None:
        out.append(f"Binning = {_fmt(piece.binning)}")
    if piece.exposure_s is not None:
        out.append(f"ExposureTime = {_fmt(piece.exposure_s)}")
    if piece.rotation_deg is not None:
        out.append(f"RotationAngle = {_fmt(piece.rotation_deg)}")
    if piece.pixel_size_um is not None:
        out.append(f"PixelSpacing = {_fmt(piece.pixel_size_um / UM_PER_ANGSTROM)}")
    if piece.date_time is not None:
        out.append(f"DateTime = {piece.date_time}")
    if piece.aligned_piece_xyz_px is not None:
        out.append("AlignedPieceCoordsVS = {} {} {}".format(*piece.aligned_piece_xyz_px))
    out.extend(f"{key} = {value}" for key, value in piece.extra.items())
    return out


def write_mdoc(path: str | os.PathLike[str], metadata: MontageMetadata) -> Path:
    """Write `metadata` as an `.mdoc` file, atomically; returns the path."""
    return write_atomic(path, format_mdoc(metadata).encode("utf-8"))


def montage_metadata(
    piece_corners_px: Sequence[tuple[int, int]],
    piece_shape_px: tuple[int, int],
    pixel_size_um: float | None,
    stage_xy_um: Sequence[tuple[float, float]] | None = None,
    image_file: str | None = None,
    data_mode: int = 6,
    mag_index: int | None = None,
    magnification: float | None = None,
    binning: float = 1.0,
    exposure_s: float | None = None,
) -> MontageMetadata:
    """A `MontageMetadata` for a montage whose piece `i` has its corner at `piece_corners_px[i]`.

    Corners are (row_px, col_px) in the whole montage; they become `PieceCoordinates = col row 0`.
    `stage_xy_um[i]`, when given, is piece i's stage position in um. Convenient for exports and
    test fixtures: `write_mdoc(path, montage_metadata(...))`.
    """
    if stage_xy_um is not None and len(stage_xy_um) != len(piece_corners_px):
        raise ValueError(f"{len(stage_xy_um)} stage positions given for {len(piece_corners_px)} pieces")
    pieces = tuple(
        MdocPiece(
            z_value=i,
            piece_xyz_px=(int(col), int(row), 0),
            stage_xy_um=(float(stage_xy_um[i][0]), float(stage_xy_um[i][1])) if stage_xy_um is not None else None,
            stage_z_um=0.0,
            magnification=magnification,
            mag_index=mag_index,
            binning=binning,
            exposure_s=exposure_s,
            rotation_deg=0.0,
            tilt_deg=0.0,
        )
        for i, (row, col) in enumerate(piece_corners_px)
    )
    return MontageMetadata(
        path=None,
        pixel_size_um=pixel_size_um,
        piece_shape_px=(int(piece_shape_px[0]), int(piece_shape_px[1])),
        image_file=image_file,
        montage=True,
        data_mode=data_mode,
        pieces=pieces,
    )
