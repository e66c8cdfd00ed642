""" "Find more like this": cosine similarity of every patch to one or more reference patches.

Features are standardised first (each column minus its mean, divided by its standard deviation, over the
cells that are not masked), because raw features differ by orders of magnitude and the raw mean grey
value would decide every cosine. With several references a cell's similarity is its highest cosine to
any of them. Masked cells (bars, black areas) get NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.locate.errors import SettingsError


def standardise(features: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Column-standardised float64 copy of `features` (n, F) using the statistics of the `valid` rows."""
    features = np.asarray(features, dtype=np.float64)
    rows = features if valid is None else features[valid]
    if rows.shape[0] == 0:
        raise SettingsError("no unmasked patches to compare; relax the bar filter")
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (features - mean) / std


def cosine_similarity(vectors: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Highest cosine similarity (in [-1, 1]) of each row of `vectors` (n, F) to the rows of
    `references` (m, F); zero vectors have similarity 0."""
    vectors = np.asarray(vectors, dtype=np.float64)
    references = np.atleast_2d(np.asarray(references, dtype=np.float64))
    if references.shape[1] != vectors.shape[1]:
        raise SettingsError(f"references have {references.shape[1]} features, patches have {vectors.shape[1]}")
    v_norm = np.linalg.norm(vectors, axis=1)
    r_norm = np.linalg.norm(references, axis=1)
    r_unit = references / np.where(r_norm > 0, r_norm, 1.0)[:, None]
    best = np.full(vectors.shape[0], -np.inf)
    chunk = 1 << 20
    for start in range(0, vectors.shape[0], chunk):
        block = vectors[start : start + chunk]
        cos = (block @ r_unit.T) / np.where(v_norm[start : start + chunk] > 0, v_norm[start : start + chunk], 1.0)[
            :, None
        ]
        best[start : start + chunk] = cos.max(axis=1)
    best[v_norm == 0] = 0.0
    return np.clip(best, -1.0, 1.0)


def similarity_map(
    features: np.ndarray,
    grid_shape: tuple[int, int],
    reference_cells: Sequence[tuple[int, int]],
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Similarity map (grid_shape, float64) of every cell to the cells `reference_cells` ((row, col) in
    cell units); NaN where `valid` (flat, per cell) is False.

    Raises `SettingsError` when there is no reference or one lies outside the grid.
    """
    rows, cols = grid_shape
    if not reference_cells:
        raise SettingsError("give at least one reference cell (row, col)")
    indices = []
    for cell in reference_cells:
        r, c = int(cell[0]), int(cell[1])
        if not (0 <= r < rows and 0 <= c < cols):
            raise SettingsError(f"reference cell {cell} is outside the {rows}x{cols} cell grid")
        indices.append(r * cols + c)
    standardised = standardise(features, valid)
    result = cosine_similarity(standardised, standardised[indices])
    if valid is not None:
        result = np.where(valid, result, np.nan)
    return result.reshape(rows, cols)
