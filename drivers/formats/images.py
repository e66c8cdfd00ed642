"""Reading and writing single images: TIFF (with JSON metadata), MRC, PNG and NumPy `.npy`.

`read_image(path)` returns a 2-D array in its stored dtype (uint8, uint16, int16, float32, ...) plus
whatever metadata the file carries; it never converts or rescales. `write_frame_tiff` stores a
`drivers.base.Frame` with its metadata as JSON in the ImageDescription tag and the pixel size in the
resolution tags, so that `read_frame_tiff` gives the same frame back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where a frame is read: reading a plain image needs no pydantic models
    from collections.abc import Iterator

    from drivers.base import Frame

#: File name suffixes `read_image` understands.
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".mrc", ".mrcs", ".st", ".map", ".npy", ".png")


class ImageFormatError(ValueError):
    """A file could not be read as an image: missing, corrupt, not 2-D, or an unsupported format."""


@dataclass(frozen=True)
class ImageData:
    """A 2-D image as stored in a file, with the metadata found there.

    `pixel_size_um` is None when the file does not say; `metadata` holds the frame metadata written
    by `write_frame_tiff` (or other JSON found in a TIFF description), else an empty dict.
    """

    array: np.ndarray
    pixel_size_um: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def read_image(path: str | os.PathLike[str], section: int = 0) -> ImageData:
    """Read a 2-D grayscale image from a TIFF, MRC, PNG or `.npy` file.

    For stacks (MRC or multi-page TIFF) `section` picks the 2-D section. Raises `ImageFormatError`
    with the file name and the reason when the file is missing, corrupt or not a grayscale image.
    """
    file_path = Path(path)
    if not file_path.is_file():
        raise ImageFormatError(f"{file_path}: no such file")
    suffix = file_path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            data = _read_tiff(file_path, section)
        elif suffix in (".mrc", ".mrcs", ".st", ".map"):
            data = _read_mrc(file_path, section)
        elif suffix == ".npy":
            data = ImageData(np.load(file_path, allow_pickle=False), path=file_path)
        elif suffix == ".png":
            data = _read_png(file_path)
        else:
            raise ImageFormatError(
                f"{file_path}: unsupported image format {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}"
            )
    except ImageFormatError:
        raise
    except Exception as exc:  # the readers raise many types for corrupt files
        raise ImageFormatError(f"{file_path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return _checked_2d(data, file_path)


def _checked_2d(data: ImageData, file_path: Path) -> ImageData:
    array = data.array
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ImageFormatError(f"{file_path}: expected a 2-D grayscale image, got shape {array.shape}")
    if array.dtype.kind not in "uif" or array.dtype == np.float16:
        raise ImageFormatError(f"{file_path}: unsupported pixel type {array.dtype}")
    if min(array.shape) < 1:
        raise ImageFormatError(f"{file_path}: image is empty ({array.shape})")
    return ImageData(array=array, pixel_size_um=data.pixel_size_um, metadata=data.metadata, path=file_path)


class _HeldRecords(logging.Handler):
    """Keeps the log records of one logger while a file is opened (see `tiff_warnings`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def tiff_warnings(error_type: type[ValueError] = ImageFormatError) -> Iterator[None]:
    """While a TIFF is opened, tifffile's warnings are held, not printed. When the block raises `error_type`
    (whose constructor takes the message), they are folded into that one error ("... (tifffile: ...)"), instead
    of a log line above it. Otherwise (the file read, or another error) they are passed on as they were."""
    tiff_logger = logging.getLogger("tifffile")
    held = _HeldRecords()
    propagate = tiff_logger.propagate
    tiff_logger.addHandler(held)
    tiff_logger.propagate = False
    folded = False
    try:
        yield
    except error_type as error:
        reasons = "; ".join(record.getMessage() for record in held.records)
        if not reasons:
            raise
        folded = True
        raise error_type(f"{error} (tifffile: {reasons})") from error
    finally:
        tiff_logger.removeHandler(held)
        tiff_logger.propagate = propagate
        if not folded:
            for record in held.records:
                tiff_logger.handle(record)


def _read_tiff(file_path: Path, section: int) -> ImageData:
    with tiff_warnings():
        return _read_tiff_pages(file_path, section)


def _read_tiff_pages(file_path: Path, section: int) -> ImageData:
    import tifffile

    with tifffile.TiffFile(file_path) as tif:
        if not tif.pages:
            raise ImageFormatError(f"{file_path}: TIFF has no pages")
        if section >= len(tif.pages):
            raise ImageFormatError(f"{file_path}: section {section} requested, TIFF has {len(tif.pages)} pages")
        page = tif.pages[section]
        array = page.asarray()
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            raise ImageFormatError(f"{file_path}: colour TIFF ({array.shape}); convert it to grayscale first")
        metadata: dict[str, Any] = {}
        description = page.description or ""
        if description.lstrip().startswith("{"):
            try:
                parsed = json.loads(description)
                if isinstance(parsed, dict):
                    metadata = parsed
            except json.JSONDecodeError:
                metadata = {}
        pixel_size_um = _tiff_pixel_size_um(page)
    if "pixel_size_um" in metadata:
        pixel_size_um = float(metadata["pixel_size_um"])
    return ImageData(array=array, pixel_size_um=pixel_size_um, metadata=metadata, path=file_path)


def _tiff_pixel_size_um(page: Any) -> float | None:
    """Pixel size from the TIFF resolution tags (pixels per centimetre/inch), or None."""
    try:
        unit = page.tags["ResolutionUnit"].value
        numerator, denominator = page.tags["XResolution"].value
    except KeyError:
        return None
    if not numerator or not denominator:
        return None
    pixels_per_unit = numerator / denominator
    unit_um = {3: 1e4, 2: 25400.0}.get(int(unit))
    if unit_um is None:
        return None
    return unit_um / pixels_per_unit


def _read_mrc(file_path: Path, section: int) -> ImageData:
    import mrcfile

    with mrcfile.mmap(file_path, mode="r", permissive=False) as mrc:
        data = mrc.data
        if data is None:
            raise ImageFormatError(f"{file_path}: MRC file holds no data")
        if data.ndim == 3:
            if section >= data.shape[0]:
                raise ImageFormatError(f"{file_path}: section {section} requested, MRC has {data.shape[0]}")
            array = np.array(data[section])
        else:
            array = np.array(data)
        voxel_x_angstrom = float(mrc.voxel_size.x)
    pixel_size_um = voxel_x_angstrom * 1e-4 if voxel_x_angstrom > 0 else None
    return ImageData(array=array, pixel_size_um=pixel_size_um, path=file_path)


def _read_png(file_path: Path) -> ImageData:
    from PIL import Image

    with Image.open(file_path) as img:
        if img.mode not in ("L", "I;16", "I;16B", "I", "F"):
            img = img.convert("L")
        array = np.array(img)
    return ImageData(array=array, path=file_path)


def write_atomic(path: str | os.PathLike[str], payload: bytes, *, private: bool = False) -> Path:
    """Write `payload` to `path` atomically (temporary file in the same folder, fsync, rename).

    The file gets the mode any new file gets (0666 less the process umask, e.g. 0644 under umask 022), so
    that colleagues, and SerialEM on a shared drive, can read session outputs; `private=True` makes it
    readable by its owner only (0600), for secrets.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    else:
        fd, tmp_name = _create_following_umask(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def _create_following_umask(target: Path) -> tuple[int, str]:
    """A new, exclusive temporary file next to `target`, created with mode 0666 so the kernel applies the
    umask (reading the umask with `os.umask` would briefly change it for every thread)."""
    for _ in range(100):
        tmp_name = str(target.parent / f".{target.name}.{os.urandom(6).hex()}")
        try:
            return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {target}")


def write_frame_tiff(path: str | os.PathLike[str], frame: Frame) -> Path:
    """Write a frame as a TIFF: the uint16 image, metadata as JSON, pixel size in the resolution tags.

    The write is atomic: a reader never sees a half-written file.
    """
    import io

    import tifffile

    description = json.dumps(frame.metadata.model_dump(mode="json"), sort_keys=True)
    pixels_per_cm = 1e4 / frame.metadata.pixel_size_um
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        np.ascontiguousarray(frame.image),
        description=description,
        resolution=(pixels_per_cm, pixels_per_cm),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return write_atomic(path, buffer.getvalue())


def read_frame_tiff(path: str | os.PathLike[str]) -> Frame:
    """Read a TIFF written by `write_frame_tiff` back into a `Frame`.

    Raises `ImageFormatError` if the file has no frame metadata or is not uint16.
    """
    from drivers.base import Frame, FrameMetadata

    data = read_image(path)
    if not data.metadata:
        raise ImageFormatError(f"{path}: TIFF has no crystal-locator frame metadata")
    if data.array.dtype != np.uint16:
        raise ImageFormatError(f"{path}: frame TIFF must be uint16, got {data.array.dtype}")
    try:
        metadata = FrameMetadata.model_validate(data.metadata)
    except ValueError as exc:
        raise ImageFormatError(f"{path}: frame metadata is invalid: {exc}") from exc
    return Frame(image=np.asarray(data.array), metadata=metadata)


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write an 8-bit grayscale `(rows, cols)` or RGB `(rows, cols, 3)` uint8 array as PNG, atomically."""
    return write_atomic(path, encode_png(image))


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 grayscale or RGB(A) array. Level 1: fast, still much smaller than raw."""
    import io

    from PIL import Image

    if image.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {image.dtype}; scale the image first")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
