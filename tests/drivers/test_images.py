"""Image files: TIFF frames with metadata, MRC, PNG, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from drivers.base import Frame, FrameMetadata, StagePosition
from drivers.formats.images import ImageFormatError, read_frame_tiff, read_image, write_frame_tiff, write_png


def _frame() -> Frame:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, size=(30, 40), dtype=np.uint16)
    metadata = FrameMetadata(
        preset="search", magnification=2000, pixel_size_um=0.0315, stage=StagePosition(x_um=-12.5, y_um=40.25),
        exposure_s=0.5, time_s=12.0, extra={"specimen": "protein-plates"},
    )
    return Frame(image=image, metadata=metadata)


def test_frame_tiff_round_trip(tmp_path: Path) -> None:
    frame = _frame()
    path = write_frame_tiff(tmp_path / "f.tif", frame)
    back = read_frame_tiff(path)
    np.testing.assert_array_equal(back.image, frame.image)
    assert back.metadata == frame.metadata
    assert read_image(path).pixel_size_um == pytest.approx(0.0315)


def test_mrc_and_png_read(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    with mrcfile.new(tmp_path / "a.mrc") as mrc:
        mrc.set_data(array)
        mrc.voxel_size = 2312.0
    data = read_image(tmp_path / "a.mrc")
    np.testing.assert_array_equal(data.array, array)
    assert data.pixel_size_um == pytest.approx(0.2312)
    write_png(tmp_path / "a.png", np.full((5, 6), 7, np.uint8))
    assert read_image(tmp_path / "a.png").array.shape == (5, 6)


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(ImageFormatError, match=r"bad\.tif"):
        read_image(bad)
    with pytest.raises(ImageFormatError, match="no such file"):
        read_image(tmp_path / "missing.tif")
    other = tmp_path / "x.jpg2"
    other.write_bytes(b"1")
    with pytest.raises(ImageFormatError, match="unsupported"):
        read_image(other)


def test_tifffile_warnings_are_held_only_while_a_tiff_is_opened(tmp_path: Path) -> None:
    import logging

    import tifffile

    tiff_logger = logging.getLogger("tifffile")
    handlers, propagate = list(tiff_logger.handlers), tiff_logger.propagate
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageFormatError, match=r"no pages \(tifffile: .*invalid offset"):
        read_image(bad)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((4, 5), np.uint16))
    assert read_image(good).array.shape == (4, 5)
    assert tiff_logger.handlers == handlers and tiff_logger.propagate == propagate
