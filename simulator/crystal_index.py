"""A spatial index of crystals for fast point queries (`Specimen.crystal_id_xy` with thousands of crystals).

The stage square [-extent_um, extent_um]^2 is cut into `CELL_UM` cells; every cell lists the crystals whose
padded bounding circle touches it, in one flat array (CSR layout: per cell a start offset and a count).
A point then needs checking only against the crystals of its own cell.
"""

from __future__ import annotations

import math

import numpy as np

#: Side of one index cell, um.
CELL_UM = 16.0


class CrystalCellIndex:
    """For every `CELL_UM` cell, the ids of the crystals whose bounding circle of `radius_um` (padded by
    the caller to the largest query tolerance) around (x_um, y_um) touches it. Arrays are per crystal."""

    def __init__(self, x_um: np.ndarray, y_um: np.ndarray, radius_um: np.ndarray, extent_um: float) -> None:
        self.origin_um = -extent_um
        self.cells_per_side = math.ceil(2 * extent_um / CELL_UM)
        n_side = self.cells_per_side
        c0 = np.floor((x_um - radius_um - self.origin_um) / CELL_UM).astype(np.int64)
        c1 = np.floor((x_um + radius_um - self.origin_um) / CELL_UM).astype(np.int64)
        r0 = np.floor((y_um - radius_um - self.origin_um) / CELL_UM).astype(np.int64)
        r1 = np.floor((y_um + radius_um - self.origin_um) / CELL_UM).astype(np.int64)
        cells: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        for idx in range(x_um.shape[0]):
            rr, cc = np.meshgrid(
                np.arange(max(r0[idx], 0), min(r1[idx], n_side - 1) + 1),
                np.arange(max(c0[idx], 0), min(c1[idx], n_side - 1) + 1),
                indexing="ij",
            )
            flat = (rr * n_side + cc).ravel()
            cells.append(flat)
            ids.append(np.full(flat.shape, idx, dtype=np.int64))
        all_cells = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)
        all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        order = np.lexsort((all_ids, all_cells))
        #: crystal ids, cell after cell
        self.ids = all_ids[order]
        counts = np.bincount(all_cells, minlength=n_side * n_side)
        self.cell_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.cell_count = counts.astype(np.int64)

    def cells_of(self, flat_x_um: np.ndarray, flat_y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the points (1-D x, y um) that lie inside the index: their indices into the inputs, and their
        cells' start offsets into `ids` and crystal counts."""
        n_side = self.cells_per_side
        col = np.floor((flat_x_um - self.origin_um) / CELL_UM).astype(np.int64)
        row = np.floor((flat_y_um - self.origin_um) / CELL_UM).astype(np.int64)
        valid = (
            (col >= 0) & (col < n_side) & (row >= 0) & (row < n_side) & np.isfinite(flat_x_um) & np.isfinite(flat_y_um)
        )
        points = np.nonzero(valid)[0]
        cell = row[points] * n_side + col[points]
        return points, self.cell_start[cell], self.cell_count[cell]
