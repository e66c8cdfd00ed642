"""One call from an image to clusters: `analyse(image, LocateSettings) -> ClusterAnalysis`.

Steps:
1. Bars and black areas (`bar_filter`): "auto" = the geometric mesh detector plus wide dark areas plus
   flat annotation bands at the image edges (burned-in data bars); "mesh" = mesh detector only;
   "two-step" = the 2018 study's two-step cell filter; "none". The result is a pixel mask (`bar_mask`).
   Holes in the support film (vacuum, bright field) are added to it (`mask_vacuum`;
   `agent.locate.vacuum`): no crystal lies there, and the flattening must not average a hole into the
   film's background.
2. Clean-up (`agent.locate.preprocess.prepare_image`): hot/dead pixels and readout stripes removed
   (`clean`), illumination flattened (`flatten`) so an uneven beam does not become a cluster, masked
   pixels set to the film level. Features are computed on this float64 copy.
3. Features per cell: grid cells (`grid_features`) or sliding windows (`window_features`).
4. Cells mostly on the bar mask (grid: >= `masked_fraction` of their pixels; window: the centre pixel)
   are labelled -1; the others are clustered (`cluster.fit_clusters`; k = `settings.k` or 3).
5. With `outline_length_px` (high magnification): objects bounded by long straight edges
   (`agent.locate.outlines`: faint crystals that no window statistic tells from the film's mottle). The
   cells whose centre lies inside such an outline form one more cluster, the *outlined* cluster (the
   last id, `outline_cluster`), and every cell gets one more feature, `straight_edge` (the mean
   straight-edge z-score over its window). k-means does not see that feature, so the other clusters are
   the same as without outlines, less the cells that moved (a k-means cluster lying wholly inside
   outlines keeps its cells: `_add_outline_cluster`).
6. Summaries per cluster, with `normalised_centroid` for label memory (below), and the default
   crystal-cluster suggestion.

`analyse_and_prepare` returns the image as step 2 prepared it as well, for the object search
(`targets.find_candidates(prepared=...)`), which would otherwise prepare it again.

Normalised centroids (for comparing clusters ACROSS images, as label memory does): the background is the
largest k-means cluster. For each feature f,
``(cluster mean of f - background median of f) / background robust spread of f`` (1.4826 * MAD over the
background cells, floored at 1e-6 of the feature's scale), i.e. "how many background sigmas away".
Features whose sign flips with the contrast polarity (mean, mode, skewness) enter as absolute values, so a
crystal cluster in bright field and one in dark field get the same vector. Units are background sigmas;
the background cluster itself is ~0.

Default crystal rule (`SUGGESTION_RULE`): among clusters other than the background that cover at most
half of the unmasked cells, those whose texture contrast (the Euclidean norm of the normalised std,
range and grad_energy) is at least `MIN_TEXTURE_CONTRAST` (8) background sigmas (so an empty field,
where k-means can only split the film, suggests nothing) -- crystals have sharp edges and internal
contrast, film is smooth and uniform, and crystal cells often split into a core and an edge cluster.
Polarity-invariant; bars are masked before clustering, so a bar cluster cannot win. Ice balls and debris
may be chosen too: the operator or label memory decides between object clusters. The outlined cluster,
when there is one and covers at most half of the unmasked cells, is suggested too (`OUTLINE_RULE`):
straight edges are what tells a crystal from ice and debris, and the outlines already leave out round and
irregular objects. The background and its statistics are those of the k-means clustering, before any
cell moved to the outlined cluster (a plate filling most of the frame would otherwise leave the
normalisation to a few film cells).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from agent.locate import defaults as locate_defaults
from agent.locate.cluster import (
    OUTLIER_CAP_SIGMA,
    ClusterModel,
    black_pixel_mask,
    dark_blocks,
    fit_clusters,
    large_dark_mask,
    mesh_mask,
    suggest_k,
    two_step_black_cells,
)
from agent.locate.errors import SettingsError
from agent.locate.features import (
    check_image,
    check_window,
    grid_edges_px,
    grid_features,
    window_centres_px,
    window_features,
)
from agent.locate.parallel import run_pair
from agent.locate.preprocess import prepare_image
from agent.locate.vacuum import vacuum_mask

if TYPE_CHECKING:  # the outline search (and scipy.fft) is imported only when outlines are on
    from agent.locate.outlines import OutlineTable
    from agent.locate.seams import Seams

logger = logging.getLogger(__name__)

SUGGESTION_RULE = (
    "clusters other than the background (largest) cluster that cover at most half of the unmasked cells and "
    "whose texture contrast (norm of normalised std, range, grad_energy) is at least 8 background sigmas; "
    "bars and black areas masked beforehand"
)
#: Added to `SUGGESTION_RULE` when outlines are on.
OUTLINE_RULE = "; plus the outlined cluster: cells inside outlines of long straight edges (agent.locate.outlines)"
#: Texture contrast (background sigmas) below which a cluster is film, not objects (see the rule).
MIN_TEXTURE_CONTRAST = 8.0
_POLARITY_FEATURES = ("mean", "mode", "skewness")
_TEXTURE_FEATURES = ("std", "range", "grad_energy")
#: The feature added with `outline_length_px`: cell mean of the straight-edge z-score (`agent.locate.outlines`).
STRAIGHT_EDGE_FEATURE = "straight_edge"


class LocateSettings(BaseModel):
    """How to analyse an image (frozen; saved with results). Lengths in image pixels.

    The defaults are the one setting `locate`, `evaluate` and `screen` use unless told otherwise: sliding
    windows of 15 px every 4 px (a few crystal sizes at the atlas pixel size) and k = 5."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["grid", "window"] = locate_defaults.MODE
    grid_rows: int = Field(default=20, ge=1)
    grid_cols: int = Field(default=20, ge=1)
    window_px: int = Field(default=locate_defaults.WINDOW_PX, ge=3)
    stride_px: int = Field(default=locate_defaults.STRIDE_PX, ge=1)
    k: int | None = Field(
        default=locate_defaults.K,
        ge=1,
        description="clusters; more than the 2018 study's 3 so that ice balls and debris get clusters of their own, "
        "which the operator or label memory then rejects; None = 3 (the study's default)",
    )
    suggest_k: bool = Field(default=False, description="also compute the silhouette suggestion for k")
    method: Literal["kmeans", "agglomerative"] = "kmeans"
    bar_filter: Literal["auto", "two-step", "mesh", "none"] = "auto"
    flatten: bool = True
    mask_vacuum: bool = Field(
        default=True, description="mask holes in the support film (bright field; agent.locate.vacuum) like bars"
    )
    clean: bool = Field(default=True, description="remove hot/dead pixels and readout stripes first")
    seed: int = 0
    sample_size: int = Field(default=20_000, ge=100, description="cells the clustering is fitted on (all are labelled)")
    outlier_cap_sigma: float | None = Field(
        default=OUTLIER_CAP_SIGMA,
        gt=0,
        description="clip each feature at median +- this many robust sigmas before clustering; None: no cap",
    )
    masked_fraction: float = Field(default=0.5, gt=0, le=1)
    min_bar_width_px: float | None = Field(default=None, gt=0, description="None: 2 % of the shorter side, >= 8")
    min_bar_distance_px: float = Field(default=8.0, ge=0)
    min_spacing_px: float = Field(default=16.0, ge=0)
    min_area_px: float = Field(default=0.0, ge=0)
    drop_round_objects: bool = Field(
        default=True, description="drop objects with a round outline (ice balls) from the candidates"
    )
    drop_soft_objects: bool = Field(
        default=True,
        description="drop objects whose edge is several times wider than the grid bars' (blurred contamination; "
        "agent.locate.edges)",
    )
    max_object_od: float | None = Field(
        default=None,
        gt=0,
        description="bright field: drop objects whose darkest pixel has a higher optical density (ln units) "
        "than this, i.e. too thick for electron diffraction; needs visible bars for the dark level; None: keep all",
    )
    outline_length_px: int | None = Field(
        default=None,
        ge=9,
        description="also find faint crystals by their straight edges (agent.locate.outlines), with lines of this "
        "length (px, about the shortest facet worth finding); the cells inside their outlines form a cluster of "
        "their own, which is suggested. For high magnification, where crystals are tens of windows wide. None: off",
    )
    max_candidates: int = Field(default=locate_defaults.MAX_CANDIDATES, ge=1)
    similarity_threshold: float = Field(default=0.9, ge=-1, le=1)

    @model_validator(mode="after")
    def _odd_window(self) -> LocateSettings:
        if self.window_px % 2 == 0:
            raise ValueError(f"window_px must be odd so that windows are centred on a pixel, got {self.window_px}")
        return self

    @property
    def effective_k(self) -> int:
        """k used for clustering: the user's k, else 3."""
        return 3 if self.k is None else self.k


@dataclass(frozen=True)
class ClusterSummary:
    """One cluster: size, mean features, normalised centroid (see module docstring), example cells.

    `example_cells_px` are (row_px, col_px) centres of up to 8 cells nearest the cluster centre.
    """

    cluster_id: int
    n_cells: int
    fraction: float
    mean_features: tuple[float, ...]
    normalised_centroid: tuple[float, ...]
    example_cells_px: tuple[tuple[int, int], ...]
    texture_contrast: float = 0.0

    def to_dict(self, feature_names: tuple[str, ...]) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "cluster_id": self.cluster_id,
            "n_cells": self.n_cells,
            "fraction": self.fraction,
            "mean_features": dict(zip(feature_names, self.mean_features, strict=True)),
            "normalised_centroid": dict(zip(feature_names, self.normalised_centroid, strict=True)),
            "texture_contrast": self.texture_contrast,
            "example_cells_px": [list(cell) for cell in self.example_cells_px],
        }


@dataclass(frozen=True)
class ClusterAnalysis:
    """Everything `analyse` found. Cells are grid cells or window centres (`grid_shape` of them).

    - `label_grid` (grid_shape) int32: cluster id per cell, -1 where masked as bar/black.
    - `bar_mask` (image_shape) bool: True on bars / black areas / annotation bands, and on holes in the
      film (`vacuum_mask`, also kept on its own; None when `mask_vacuum` is off).
    - `cell_centres_px` (n_cells, 2) float64 as (col_px, row_px), row-major cell order.
    - `score_grid` (grid_shape) float64: distance of each cell from the background cluster centre in
      scaled PCA space (0 where masked); used to rank candidates.
    - `row_index_px` / `col_index_px`: for every pixel row / column, the cell row / column that
      covers it (`to_pixels` maps any cell grid to a pixel image).
    - `outline_cluster`: with `settings.outline_length_px`, the id of the cluster of cells inside
      straight-edged outlines (the last id), None when there is none. `model` (k-means) knows neither
      that cluster nor the last feature column, `straight_edge`.
    - `seams`: the montage seams found on the image (`seams.find_seams`; falsy when none), None when not
      looked for.
    """

    image_shape: tuple[int, int]
    settings: LocateSettings
    feature_names: tuple[str, ...]
    features: np.ndarray
    grid_shape: tuple[int, int]
    label_grid: np.ndarray
    bar_mask: np.ndarray
    cell_centres_px: np.ndarray
    cell_area_px: np.ndarray
    score_grid: np.ndarray
    row_index_px: np.ndarray
    col_index_px: np.ndarray
    clusters: tuple[ClusterSummary, ...]
    background_cluster: int
    suggested_crystal_clusters: tuple[int, ...]
    suggestion_rule: str
    model: ClusterModel | None
    suggested_k: int | None = None
    k_scores: dict[int, float] = field(default_factory=dict)
    bar_angle_deg: float | None = None
    vacuum_mask: np.ndarray | None = None
    outline_cluster: int | None = None
    seams: Seams | None = None

    @property
    def bar_mask_without_holes(self) -> np.ndarray:
        """`bar_mask` without the film holes (`vacuum_mask`): grid bars, black areas and annotation bands."""
        return self.bar_mask if self.vacuum_mask is None else self.bar_mask & ~self.vacuum_mask

    @property
    def valid_cells(self) -> np.ndarray:
        """Flat bool (n_cells,): True where the cell is not masked."""
        return self.label_grid.ravel() >= 0

    def to_pixels(self, cell_grid: np.ndarray) -> np.ndarray:
        """Expand a (grid_shape) array to the image shape (each pixel takes its cell's value)."""
        cell_grid = np.asarray(cell_grid)
        if cell_grid.shape[:2] != self.grid_shape:
            raise SettingsError(f"cell grid has shape {cell_grid.shape}, expected {self.grid_shape}")
        rows, cols = self.row_index_px, self.col_index_px
        if np.all(np.diff(rows) >= 0) and np.all(np.diff(cols) >= 0):
            # sorted indices are runs of each cell: repeats (columns first) are ~10x faster than indexing
            row_counts = np.bincount(rows, minlength=self.grid_shape[0])
            col_counts = np.bincount(cols, minlength=self.grid_shape[1])
            return np.repeat(np.repeat(cell_grid, col_counts, axis=1), row_counts, axis=0)
        return cell_grid[rows][:, cols]

    def cell_of_pixel(self, row_px: float, col_px: float) -> tuple[int, int]:
        """The (cell_row, cell_col) covering pixel (row_px, col_px) (clipped to the image)."""
        r = int(np.clip(round(row_px), 0, self.image_shape[0] - 1))
        c = int(np.clip(round(col_px), 0, self.image_shape[1] - 1))
        return int(self.row_index_px[r]), int(self.col_index_px[c])

    def cluster(self, cluster_id: int) -> ClusterSummary:
        """The summary of `cluster_id`; `SettingsError` if there is no such cluster."""
        for summary in self.clusters:
            if summary.cluster_id == cluster_id:
                return summary
        known = ", ".join(str(c.cluster_id) for c in self.clusters)
        raise SettingsError(f"no cluster {cluster_id}; this analysis has clusters {known}")

    def normalised_centroids(self) -> np.ndarray:
        """(k, F) matrix of the clusters' normalised centroids, in cluster-id order (for label memory)."""
        return np.array([c.normalised_centroid for c in self.clusters], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def _longest_run(flags: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array."""
    if not flags.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return int((edges[1::2] - edges[::2]).max())


def flat_band_mask(image: np.ndarray, min_flat_fraction: float = 0.5) -> np.ndarray:
    """Annotation bands burned into an image edge (data bars, scale bars, text).

    A line (row or column) is flat when at least `min_flat_fraction` of its pixels share one exact value
    and that value runs unbroken over at least a tenth of the line (burned-in bars are flat; camera data has
    noise, and the equal values of quantised 8-bit film are scattered, not in long runs). Runs of flat
    lines touching the top/bottom (left/right) edge form a band; in it, the pixels equal to the line's
    flat value are masked, plus the gaps between them shorter than a tenth of the line (text on the bar).
    Film in those lines stays.
    """
    mask = np.zeros(image.shape, dtype=bool)
    for axis in (0, 1):
        lines = image if axis == 0 else image.T
        target = mask if axis == 0 else mask.T
        n, length = lines.shape
        depth = max(1, n // 5)  # look at the outer fifth only
        for edge in (np.arange(depth), np.arange(n - 1, n - 1 - depth, -1)):
            flagged = []
            for index in edge:
                line = lines[index]
                values, counts = np.unique(line, return_counts=True)
                top = int(np.argmax(counts))
                if counts[top] < min_flat_fraction * length or _longest_run(line == values[top]) < length // 10:
                    break
                flagged.append((int(index), values[top]))
            if not flagged:
                continue
            indices = np.array([i for i, _ in flagged])
            flat = lines[indices] == np.array([v for _, v in flagged])[:, None]
            gap = max(1, length // 10)
            closed = ndimage.minimum_filter1d(ndimage.maximum_filter1d(flat, gap, axis=1), gap, axis=1)
            target[indices] |= closed | flat
    return mask


def bar_and_black_mask(image: np.ndarray, settings: LocateSettings) -> tuple[np.ndarray, float | None]:
    """Pixel mask of bars/black areas/annotation bands for "auto" and "mesh" filters, plus the bar angle."""
    min_width = settings.min_bar_width_px or max(8.0, 0.02 * min(image.shape))
    flat = flat_band_mask(image)
    mask = flat.copy() if settings.bar_filter == "auto" else np.zeros(image.shape, dtype=bool)
    if settings.bar_filter != "auto":
        mesh = mesh_mask(image, min_width_px=min_width, ignore=flat)
        mask |= mesh.mask
        return mask, mesh.angle_deg
    blocks = dark_blocks(image, flat)  # the block copy and dark class both dark detectors use (imports Otsu's)

    def dark_areas() -> np.ndarray:
        dark = large_dark_mask(image, min_width_px=min_width, ignore=flat, blocks=blocks)
        return dark | black_pixel_mask(image, ignore=flat, blocks=blocks)

    # the mesh detector (small block copies, profiles) beside the dark detectors (full-size masks)
    mesh, dark = run_pair(lambda: mesh_mask(image, min_width_px=min_width, ignore=flat), dark_areas)
    mask |= mesh.mask
    mask |= dark
    return mask, mesh.angle_deg


# --------------------------------------------------------------------------------------------------
# analyse
# --------------------------------------------------------------------------------------------------


def _cell_layout(
    image_shape: tuple[int, int], settings: LocateSettings
) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """grid_shape, cell centres (col, row), cell areas (n,), pixel->cell row index, pixel->cell col index."""
    rows, cols = image_shape
    if settings.mode == "grid":
        er, ec = grid_edges_px(rows, settings.grid_rows), grid_edges_px(cols, settings.grid_cols)
        centre_r = (er[:-1] + er[1:] - 1) / 2.0
        centre_c = (ec[:-1] + ec[1:] - 1) / 2.0
        area = np.outer(np.diff(er), np.diff(ec)).astype(np.float64).ravel()
        row_index = np.searchsorted(er, np.arange(rows), side="right") - 1
        col_index = np.searchsorted(ec, np.arange(cols), side="right") - 1
        grid_shape = (settings.grid_rows, settings.grid_cols)
    else:
        s = settings.stride_px
        centre_r = window_centres_px(rows, s).astype(np.float64)
        centre_c = window_centres_px(cols, s).astype(np.float64)
        grid_shape = (len(centre_r), len(centre_c))
        area = np.full(grid_shape[0] * grid_shape[1], float(s * s))
        row_index = np.minimum(np.round(np.arange(rows) / s).astype(np.int64), grid_shape[0] - 1)
        col_index = np.minimum(np.round(np.arange(cols) / s).astype(np.int64), grid_shape[1] - 1)
    cc, rr = np.meshgrid(centre_c, centre_r)
    centres = np.stack([cc.ravel(), rr.ravel()], axis=1)
    return grid_shape, centres, area, row_index, col_index


def _cell_mask_fraction(mask: np.ndarray, settings: LocateSettings, grid_shape: tuple[int, int]) -> np.ndarray:
    """Flat (n_cells,) fraction of each cell's pixels on the mask (window mode: the centre pixel)."""
    if settings.mode == "grid":
        er = grid_edges_px(mask.shape[0], grid_shape[0])
        ec = grid_edges_px(mask.shape[1], grid_shape[1])
        sums = np.add.reduceat(np.add.reduceat(mask.astype(np.int64), er[:-1], axis=0), ec[:-1], axis=1)
        return (sums / np.outer(np.diff(er), np.diff(ec))).ravel()
    s = settings.stride_px
    return mask[::s, ::s].astype(np.float64).ravel()


def analyse(image: np.ndarray, settings: LocateSettings | None = None) -> ClusterAnalysis:
    """Analyse a 2-D grayscale image (any dtype, either polarity); see the module docstring.

    Raises `ImageInputError` for unusable images and `SettingsError` for settings that do not fit the
    image (grid too fine, window larger than the image, k larger than the number of unmasked patches).
    """
    return _analyse(image, settings or LocateSettings(), keep_prepared=False)[0]


def analyse_and_prepare(
    image: np.ndarray, settings: LocateSettings | None = None
) -> tuple[ClusterAnalysis, np.ndarray]:
    """`analyse`, plus the image as step 2 prepared it (float64, image shape; `preprocess.prepare_image` for
    the analysis' `bar_mask`, `flatten` and `clean`): pass it to `targets.find_candidates(prepared=...)`,
    which otherwise prepares the image a second time."""
    analysis, prepared = _analyse(image, settings or LocateSettings(), keep_prepared=True)
    assert prepared is not None
    return analysis, prepared


def _analyse(
    image: np.ndarray, settings: LocateSettings, keep_prepared: bool
) -> tuple[ClusterAnalysis, np.ndarray | None]:
    """`analyse_and_prepare`; without `keep_prepared` the prepared image is freed before the clustering
    (None)."""
    check_image(image)
    shape = (int(image.shape[0]), int(image.shape[1]))
    _check_settings_fit(shape, settings)
    grid_shape, centres, area, row_index, col_index = _cell_layout(shape, settings)
    # 1. bars, black areas and film holes
    bar_mask, bar_angle, vacuum = _pixel_masks(image, settings, grid_shape, row_index, col_index)
    # 2. clean-up and flattening, 3. features
    prepared, features, names, outlines, seams = _features_and_outlines(image, bar_mask, settings)
    if not keep_prepared:
        prepared = None  # 8 bytes a pixel: not held through the clustering when nobody wants it
    # 4. cluster the unmasked cells
    valid = _valid_cells(bar_mask, settings, grid_shape)
    n_valid = int(valid.sum())
    # Large inputs (a 4k image at stride 1 has 16.8 M cells) are never copied whole: the model is fitted
    # on a seeded sample of the unmasked cells, every cell is labelled in chunks, and the statistics below
    # use bincounts or seeded samples.
    sampler = _CellSampler(np.random.default_rng(settings.seed))
    valid_idx = np.flatnonzero(valid)
    fit = _fit_clusters(features, valid, valid_idx, settings, sampler)
    # 5. outlined cluster, 6. summaries
    cells = _background_and_outlines(fit, features, names, valid, outlines, centres, settings, shape)
    bg_median, bg_spread = _background_statistics(cells, valid_idx, sampler)
    summaries = _cluster_summaries(cells, fit.model, centres, n_valid, bg_median, bg_spread, sampler)
    suggestion = _suggested_clusters(summaries, cells.background, cells.outline_cluster)
    logger.info(
        "analysed %s image: %d cells (%d masked), k=%d, background cluster %d, suggested crystal clusters %s",
        shape,
        cells.features.shape[0],
        cells.features.shape[0] - n_valid,
        cells.k,
        cells.background,
        suggestion,
    )
    analysis = ClusterAnalysis(
        image_shape=shape,
        settings=settings,
        feature_names=tuple(cells.names),
        features=cells.features,
        grid_shape=grid_shape,
        label_grid=cells.labels.reshape(grid_shape),
        bar_mask=bar_mask,
        cell_centres_px=centres,
        cell_area_px=area,
        score_grid=cells.scores.reshape(grid_shape),
        row_index_px=row_index,
        col_index_px=col_index,
        clusters=tuple(summaries),
        background_cluster=cells.background,
        suggested_crystal_clusters=suggestion,
        suggestion_rule=SUGGESTION_RULE + (OUTLINE_RULE if cells.outline_cluster is not None else ""),
        model=fit.model,
        suggested_k=fit.suggested_k,
        k_scores=fit.k_scores,
        bar_angle_deg=bar_angle,
        vacuum_mask=vacuum,
        outline_cluster=cells.outline_cluster,
        seams=seams,
    )
    return analysis, prepared


def _check_settings_fit(shape: tuple[int, int], settings: LocateSettings) -> None:
    """`SettingsError` when the outline lines, the window or the grid of `settings` do not fit an image of
    `shape` (rows, cols px)."""
    if settings.outline_length_px is not None and settings.outline_length_px > min(shape):
        raise SettingsError(
            f"outline lines of {settings.outline_length_px} px do not fit a {shape[0]}x{shape[1]} image; "
            "use a shorter outline length"
        )
    if settings.mode == "window":
        check_window(shape, settings.window_px, settings.stride_px)
    elif settings.grid_rows * 2 > shape[0] or settings.grid_cols * 2 > shape[1]:
        raise SettingsError(
            f"a {settings.grid_rows}x{settings.grid_cols} grid is too fine for a {shape[0]}x{shape[1]} image; "
            "use fewer grid cells"
        )


def _cell_features(data: np.ndarray, settings: LocateSettings) -> tuple[np.ndarray, tuple[str, ...]]:
    """Features (n_cells, F) float64 of the grid cells or windows of `settings`, and their names."""
    if settings.mode == "grid":
        return grid_features(data, settings.grid_rows, settings.grid_cols)
    window, window_names = window_features(data, settings.window_px, settings.stride_px)
    return window.reshape(-1, window.shape[-1]), window_names


def _pixel_masks(
    image: np.ndarray,
    settings: LocateSettings,
    grid_shape: tuple[int, int],
    row_index: np.ndarray,
    col_index: np.ndarray,
) -> tuple[np.ndarray, float | None, np.ndarray | None]:
    """Step 1: the pixel mask of bars, black areas, annotation bands and film holes (`bar_filter`,
    `mask_vacuum`), the bar angle (degrees; None unless the mesh detector ran) and the film holes alone
    (None when `mask_vacuum` is off). `row_index` / `col_index` map pixel rows / columns to cells."""
    shape = image.shape
    bar_angle = None
    if settings.bar_filter in ("auto", "mesh"):
        bar_mask, bar_angle = bar_and_black_mask(image, settings)
    else:
        bar_mask = np.zeros(shape, dtype=bool)
    if settings.bar_filter == "two-step":
        # the study's first step works on the raw image's cells (flattening would erase the black areas)
        raw = prepare_image(image, bar_mask, flatten=False, clean=settings.clean)
        raw_features, raw_names = _cell_features(raw, settings)
        del raw
        black = two_step_black_cells(raw_features, raw_names, seed=settings.seed)
        bar_mask = black.reshape(grid_shape)[row_index][:, col_index]
    # film holes: no crystal lies on vacuum, and left in, a hole spoils the flattening around it
    vacuum = vacuum_mask(image, bar_mask) if settings.mask_vacuum else None
    if vacuum is not None:
        bar_mask = bar_mask | vacuum
    return bar_mask, bar_angle, vacuum


def _features_and_outlines(
    image: np.ndarray, bar_mask: np.ndarray, settings: LocateSettings
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], OutlineTable | None, Seams]:
    """Steps 2 and 3: the image cleaned and flattened (`prepare_image`), its cell features and names, with
    `outline_length_px` its straight-edged outlines (None without), and its montage seams."""
    from agent.locate.seams import find_seams

    seams = find_seams(image, bar_mask)
    data = prepare_image(image, bar_mask, flatten=settings.flatten, clean=settings.clean, seams=seams)
    features, names = _cell_features(data, settings)
    outlines = None
    if settings.outline_length_px:
        from agent.locate.outlines import find_outlines

        outlines = find_outlines(data, bar_mask, settings.outline_length_px)
    return data, features, names, outlines, seams


def _valid_cells(bar_mask: np.ndarray, settings: LocateSettings, grid_shape: tuple[int, int]) -> np.ndarray:
    """Flat bool (n_cells,): the cells less than `masked_fraction` on the mask. `SettingsError` when every
    cell is masked or there are fewer unmasked cells than clusters."""
    masked_fraction = _cell_mask_fraction(bar_mask, settings, grid_shape)
    valid = masked_fraction < settings.masked_fraction
    n_valid = int(valid.sum())
    k = settings.effective_k
    if n_valid == 0:
        raise SettingsError("every patch is masked as grid bar or black area; try --bar-filter none")
    if k > n_valid:
        raise SettingsError(
            f"k={k} is larger than the number of unmasked patches ({n_valid}); use a smaller k or a finer grid"
        )
    return valid


@dataclass(frozen=True)
class _CellSampler:
    """Seeded samples of cell indices; one generator for the whole analysis, so the draws follow the order
    of the calls."""

    rng: np.random.Generator

    def sample(self, indices: np.ndarray, size: int) -> np.ndarray:
        """`indices` itself when it has at most `size` entries, else `size` of them drawn without
        replacement, sorted."""
        return indices if len(indices) <= size else np.sort(self.rng.choice(indices, size=size, replace=False))


@dataclass(frozen=True)
class _ClusterFit:
    """Step 4: the fitted model, the k-means labels (flat int, -1 on masked cells), k, and the silhouette
    suggestion for k with its scores (None and empty unless `settings.suggest_k`)."""

    model: ClusterModel
    labels: np.ndarray
    k: int
    suggested_k: int | None
    k_scores: dict[int, float]


def _fit_clusters(
    features: np.ndarray, valid: np.ndarray, valid_idx: np.ndarray, settings: LocateSettings, sampler: _CellSampler
) -> _ClusterFit:
    """Step 4: fit the clustering on a seeded sample of the unmasked cells and label every cell."""
    k = settings.effective_k
    suggested, k_scores = (None, {})
    if settings.suggest_k:
        suggested, k_scores = suggest_k(features[sampler.sample(valid_idx, 3000)], seed=settings.seed)
    fit_rows = features[sampler.sample(valid_idx, settings.sample_size)]
    model = fit_clusters(
        fit_rows, k, settings.method, settings.seed, settings.sample_size, outlier_cap_sigma=settings.outlier_cap_sigma
    )
    labels = model.predict(features)
    labels[~valid] = -1
    return _ClusterFit(model, labels, k, suggested, k_scores)


@dataclass(frozen=True)
class _CellClusters:
    """Cells after step 5: features (n_cells, F) with `straight_edge` appended when outlines are on, their
    names, flat labels (the outlined cluster included), the number of clusters k, the background
    (largest k-means) cluster with its cells as they were before any moved to the outlined cluster,
    `scores` (flat, distance from the background centre in the model's space, 0 where masked), the
    outlined cluster (None: none) and the number of feature columns the model knows."""

    features: np.ndarray
    names: tuple[str, ...]
    labels: np.ndarray
    k: int
    background: int
    background_cells: np.ndarray
    scores: np.ndarray
    outline_cluster: int | None
    n_model_features: int


def _background_and_outlines(
    fit: _ClusterFit,
    features: np.ndarray,
    names: tuple[str, ...],
    valid: np.ndarray,
    outlines: OutlineTable | None,
    centres: np.ndarray,
    settings: LocateSettings,
    shape: tuple[int, int],
) -> _CellClusters:
    """Step 5: the background cluster and the cells' scores from the k-means labels, then the outlined
    cluster (`_add_outline_cluster`, which relabels `fit.labels` in place) when there are outlines."""
    labels, k, model = fit.labels, fit.k, fit.model
    # the background and its statistics come from the k-means labels: outlines may take most of its cells
    background = int(np.argmax(np.bincount(labels + 1, minlength=k + 1)[1:]))
    scores = model.distance_to(features, background)
    scores[~valid] = 0.0
    background_cells = np.flatnonzero(labels == background)
    outline_cluster = None
    n_model_features = features.shape[1]
    if outlines is not None:
        grid_cell_px = max(shape[0] // settings.grid_rows, shape[1] // settings.grid_cols, 3)
        cell_px = settings.window_px if settings.mode == "window" else grid_cell_px
        features, names, outline_cluster = _add_outline_cluster(outlines, features, names, labels, centres, cell_px, k)
        k += outline_cluster is not None
    return _CellClusters(
        features, names, labels, k, background, background_cells, scores, outline_cluster, n_model_features
    )


def _background_statistics(
    cells: _CellClusters, valid_idx: np.ndarray, sampler: _CellSampler
) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the background cells' median and robust spread (1.4826 * MAD, floored at 1e-6 of the
    feature's scale), in feature units: the origin and unit of the normalised centroids."""
    features = cells.features
    bg_rows = features[sampler.sample(cells.background_cells, 200_000)]
    bg_median = np.median(bg_rows, axis=0)
    bg_spread = 1.4826 * np.median(np.abs(bg_rows - bg_median), axis=0)
    scale = np.maximum(np.abs(bg_median), np.std(features[sampler.sample(valid_idx, 200_000)], axis=0))
    bg_spread = np.maximum(bg_spread, 1e-6 * np.where(scale > 0, scale, 1.0))
    return bg_median, bg_spread


def _cluster_summaries(
    cells: _CellClusters,
    model: ClusterModel,
    centres: np.ndarray,
    n_valid: int,
    bg_median: np.ndarray,
    bg_spread: np.ndarray,
    sampler: _CellSampler,
) -> list[ClusterSummary]:
    """Step 6: one `ClusterSummary` per cluster id 0..k-1, with normalised centroids in background sigmas
    (polarity features as absolute values) and texture contrast (see the module docstring)."""
    features, names, labels, k = cells.features, cells.names, cells.labels, cells.k
    shifted = labels + 1  # masked cells (-1) in bin 0; made once for every feature's bincount
    counts = np.bincount(shifted, minlength=k + 1)[1:]
    polarity_cols = [names.index(n) for n in _POLARITY_FEATURES]
    texture_cols = [names.index(n) for n in _TEXTURE_FEATURES]
    sums = np.stack([np.bincount(shifted, weights=features[:, j], minlength=k + 1)[1:] for j in range(len(names))], 1)
    summaries = []
    for cid in range(k):
        n_cells = int(counts[cid])
        if n_cells:
            mean_features = sums[cid] / n_cells
            normalised = (mean_features - bg_median) / bg_spread
        else:
            mean_features = np.full(len(names), np.nan)
            normalised = np.zeros(len(names))
        normalised[polarity_cols] = np.abs(normalised[polarity_cols])
        summaries.append(
            ClusterSummary(
                cluster_id=cid,
                n_cells=n_cells,
                fraction=n_cells / n_valid,
                mean_features=tuple(float(v) for v in mean_features),
                normalised_centroid=tuple(float(v) for v in normalised),
                example_cells_px=_example_cells(cells, model, cid, centres, sampler),
                texture_contrast=float(np.linalg.norm(normalised[texture_cols])),
            )
        )
    return summaries


def _example_cells(
    cells: _CellClusters, model: ClusterModel, cid: int, centres: np.ndarray, sampler: _CellSampler
) -> tuple[tuple[int, int], ...]:
    """(row_px, col_px) centres of up to 8 cells of cluster `cid` nearest its model centre (the outlined
    cluster, which has none: the cells on the strongest straight edges), from a sample of its cells."""
    members = sampler.sample(np.flatnonzero(cells.labels == cid), 20_000)
    if not len(members):
        return ()
    if cid == cells.outline_cluster:  # no model centroid: show the cells on the strongest edges
        dist = -cells.features[members, -1]
    else:
        dist = model.distance_to(cells.features[members, : cells.n_model_features], cid)
    nearest = members[np.argsort(dist, kind="stable")[:8]]
    return tuple((round(centres[i, 1]), round(centres[i, 0])) for i in nearest)


def _suggested_clusters(
    summaries: list[ClusterSummary], background: int, outline_cluster: int | None
) -> tuple[int, ...]:
    """The default crystal clusters (`SUGGESTION_RULE`, plus `OUTLINE_RULE` for the outlined cluster)."""
    candidates = [s for s in summaries if s.cluster_id not in (background, outline_cluster) and s.n_cells]
    suggestion = tuple(
        s.cluster_id for s in candidates if s.fraction <= 0.5 and s.texture_contrast >= MIN_TEXTURE_CONTRAST
    )
    if outline_cluster is not None and summaries[outline_cluster].fraction <= 0.5:
        suggestion += (outline_cluster,)
    return suggestion


def _add_outline_cluster(
    outlines: OutlineTable,
    features: np.ndarray,
    names: tuple[str, ...],
    labels: np.ndarray,
    centres: np.ndarray,
    cell_px: int,
    k: int,
) -> tuple[np.ndarray, tuple[str, ...], int | None]:
    """Give cells whose centre lies inside an outline cluster id `k` (in place in `labels`; masked cells
    stay masked, and so do the cells of a k-means cluster that lies wholly inside outlines: it is an
    object cluster of its own, and moving it would leave an empty cluster) and append the feature
    `straight_edge`: the mean straight-edge z-score over `cell_px` x `cell_px` pixels around the cell's
    centre (its window, or a square of the grid cell's longer side), so that the outline cluster stands
    out from the film in its normalised centroid (label memory). Returns the new features, names and
    the cluster id (None: no cell moved)."""
    rows = np.clip(np.rint(centres[:, 1]).astype(np.intp), 0, outlines.labels.shape[0] - 1)
    cols = np.clip(np.rint(centres[:, 0]).astype(np.intp), 0, outlines.labels.shape[1] - 1)
    inside = (outlines.labels[rows, cols] > 0) & (labels >= 0)
    cells = np.bincount(labels[labels >= 0], minlength=k)
    moved = np.bincount(labels[inside], minlength=k)
    inside &= ~np.isin(labels, np.flatnonzero((moved == cells) & (cells > 0)))
    local = ndimage.uniform_filter(outlines.edge_z_map, size=cell_px)
    features = np.concatenate([features, local[rows, cols].astype(np.float64)[:, None]], axis=1)
    if not inside.any():
        return features, (*names, STRAIGHT_EDGE_FEATURE), None
    labels[inside] = k
    return features, (*names, STRAIGHT_EDGE_FEATURE), k
