"""Dataset tiles as the specimen: the simulator serves crops of a real image montage.

A montage (`drivers.formats.montage.open_montage`: a folder of `Tile_RRR-CCC.tif`, a layout file or a
SerialEM `.mdoc`) is laid on the stage with its centre at the stage origin, mosaic columns along +x
and rows along +y, `pixel_size_um` um per mosaic pixel. For a frame, every camera pixel is mapped
through the same camera model as procedural specimens (`A_true`: rotation, scale error) into the
mosaic and sampled bilinearly; when the preset's pixels are larger than the mosaic's, the mosaic is
first block-averaged (integer factor, read strip by strip so memory stays bounded). Pixels outside the
mosaic are dark. Intensities become transmission by dividing by the mosaic's white level (the 99.5th
percentile of up to 8 sampled pieces), then go through the usual dose, noise and 16-bit model.
8- and 16-bit (or float) tiles of any size work. There is no ground truth for tiles.
`simulator.exports.write_export_montage` writes a folder of simulated 8-bit exports with burned-in data
bars (what users' files look like) that this scene serves, with a labels CSV for `evaluate --images`.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import numpy as np
from scipy import ndimage

from drivers.base import AcquisitionError, InvalidParameterError, StageLimits
from drivers.formats.montage import TileMontage, open_montage

log = logging.getLogger(__name__)

_STRIP_OUT_ROWS = 256
_MAX_MAGNIFIED_PX = 64_000_000


class TileSceneError(InvalidParameterError):
    """Dataset tiles cannot be served (no pixel size, unreadable montage, ...)."""


class TileScene:
    """A `simulator.imaging.Scene` over a `TileMontage` (see the module doc for the geometry)."""

    def __init__(self, montage: TileMontage, pixel_size_um: float | None = None,
                 white_level: float | None = None) -> None:
        size = pixel_size_um if pixel_size_um is not None else montage.pixel_size_um
        if size is None:
            raise TileSceneError(
                f"{montage.description or 'montage'}: the tiles do not give a pixel size; "
                "pass pixel_size_um (CLI: --pixel-size-um)"
            )
        if not (math.isfinite(size) and size > 0):
            raise TileSceneError(f"pixel_size_um must be a positive number of um, got {size}")
        self.montage = montage
        self._lock = threading.Lock()  # the montage's piece cache is not thread-safe
        self.pixel_size_um = float(size)
        self.white_level = float(white_level) if white_level is not None else self._estimate_white_level()
        if not (math.isfinite(self.white_level) and self.white_level > 0):
            raise TileSceneError(f"{montage.description}: the tiles are blank (white level {self.white_level})")

    @classmethod
    def open(cls, path: str | os.PathLike[str], pixel_size_um: float | None = None,
             overlap_fraction: float | None = None) -> TileScene:
        """Open a montage (folder of tiles, layout file or SerialEM .mdoc) as a scene."""
        try:
            montage = open_montage(path, pixel_size_um=pixel_size_um, overlap_fraction=overlap_fraction)
        except (OSError, ValueError) as exc:
            raise TileSceneError(f"cannot serve tiles from {path}: {exc}") from exc
        return cls(montage, pixel_size_um=pixel_size_um)

    def _estimate_white_level(self) -> float:
        pieces = self.montage.pieces
        picks = sorted({int(i) for i in np.linspace(0, len(pieces) - 1, num=min(8, len(pieces)))})
        samples = [self.montage.piece_image(i)[::4, ::4].ravel() for i in picks]
        return float(np.percentile(np.concatenate(samples).astype(np.float64), 99.5))

    def extent_um(self) -> tuple[float, float]:
        """(width, height) of the mosaic in um."""
        rows, cols = self.montage.shape_px
        return cols * self.pixel_size_um, rows * self.pixel_size_um

    def stage_limits(self) -> StageLimits:
        """Stage limits covering the mosaic (centred on the stage origin)."""
        width, height = self.extent_um()
        return StageLimits(x_min_um=-width / 2, x_max_um=width / 2, y_min_um=-height / 2, y_max_um=height / 2)

    def mosaic_to_stage_um(self, col_px: float, row_px: float) -> tuple[float, float]:
        """Stage (x, y) um of a mosaic pixel (col, row)."""
        rows, cols = self.montage.shape_px
        return ((col_px - (cols - 1) / 2.0) * self.pixel_size_um, (row_px - (rows - 1) / 2.0) * self.pixel_size_um)

    def transmission(
        self, stage_xy_um: tuple[float, float], matrix_um_per_px: np.ndarray, shape_px: tuple[int, int], edge_um: float
    ) -> np.ndarray:
        """Bright-field transmission (float32) of a frame: the mosaic resampled through A (see module doc)."""
        rows_m, cols_m = self.montage.shape_px
        ps = self.pixel_size_um
        a = np.asarray(matrix_um_per_px, dtype=np.float64)
        centre_out = np.array([(shape_px[1] - 1) / 2.0, (shape_px[0] - 1) / 2.0])
        centre_m = np.array([(cols_m - 1) / 2.0, (rows_m - 1) / 2.0])
        # mosaic (col, row) = m_mat @ out (col, row) + m_off
        m_mat = a / ps
        m_off = centre_m + (np.asarray(stage_xy_um, dtype=np.float64) - a @ centre_out) / ps
        factor = max(1, math.floor(math.sqrt(abs(np.linalg.det(m_mat))) + 1e-9))
        corners = np.array([[0, 0], [shape_px[1] - 1, 0], [0, shape_px[0] - 1], [shape_px[1] - 1, shape_px[0] - 1]])
        mosaic_corners = corners @ m_mat.T + m_off
        margin = 2 * factor
        col0 = max(math.floor(mosaic_corners[:, 0].min()) - margin, 0)
        col1 = min(math.ceil(mosaic_corners[:, 0].max()) + margin + 1, cols_m)
        row0 = max(math.floor(mosaic_corners[:, 1].min()) - margin, 0)
        row1 = min(math.ceil(mosaic_corners[:, 1].max()) + margin + 1, rows_m)
        out = np.zeros(shape_px, dtype=np.float32)
        if col0 >= col1 or row0 >= row1:
            return out  # the frame lies wholly outside the mosaic: dark
        # align the region to the reduction factor, read and block-average strip by strip
        col0 -= col0 % factor
        row0 -= row0 % factor
        n_rows = (row1 - row0 + factor - 1) // factor
        n_cols = (col1 - col0 + factor - 1) // factor
        if factor == 1 and n_rows * n_cols > _MAX_MAGNIFIED_PX:
            raise TileSceneError("the requested frame needs too large a mosaic region; use a higher magnification")
        source = np.empty((n_rows, n_cols), dtype=np.float32)
        strip = _STRIP_OUT_ROWS
        for out_r in range(0, n_rows, strip):
            r_count = min(strip, n_rows - out_r)
            with self._lock:
                try:
                    block = self.montage.read_region(
                        row0 + out_r * factor, col0, r_count * factor, n_cols * factor, fill=0
                    )
                except (OSError, ValueError) as exc:
                    raise AcquisitionError(
                        f"cannot read the dataset tiles for this frame ({exc}); check the tile files"
                    ) from exc
            block = block.astype(np.float32)
            if factor > 1:
                # pixels beyond the mosaic are read as 0 and average in as dark, like the outside
                block = block.reshape(r_count, factor, n_cols, factor).mean(axis=(1, 3))
            source[out_r : out_r + r_count] = block
        source *= np.float32(1.0 / self.white_level)
        # output (row, col) -> source (row, col) for ndimage: swap axes of the (col, row) affine map
        s_mat = m_mat / factor
        s_off = (m_off - np.array([col0, row0]) - (factor - 1) / 2.0) / factor
        matrix_rc = np.array([[s_mat[1, 1], s_mat[1, 0]], [s_mat[0, 1], s_mat[0, 0]]])
        offset_rc = np.array([s_off[1], s_off[0]])
        ndimage.affine_transform(source, matrix_rc, offset=offset_rc, output_shape=shape_px, output=out,
                                 order=1, mode="constant", cval=0.0, prefilter=False)
        np.clip(out, 0.0, 4.0, out=out)
        return out
