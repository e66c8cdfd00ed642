"""From clusters (or a similarity map) to ranked, de-duplicated candidate targets.

`find_candidates`: cells of the chosen crystal clusters (or cells whose similarity reaches
`settings.similarity_threshold`) -> 8-connected regions on the cell grid -> given the image, one
candidate per object inside the regions (`objects_in_regions`; a region in which no object stands out
from the film's noise gives none, so empty film gives nothing), each with its features
(`object_features.CANDIDATE_FEATURE_NAMES`) and scored by the cold-start rule
(`object_features.cold_start_score`); without the image (or for a similarity map), one candidate per region
at its area-weighted centroid (moved to the region's nearest cell when the centroid falls outside it, e.g.
for a curved fibre), scored by the region's highest cell score (distance from the background cluster, or
similarity) -> drop regions smaller than `min_area_px` and candidates closer than `min_bar_distance_px` to
the bar mask -> rank by score, every region's best candidate before any region's second one -> greedy
de-duplication: a candidate closer than `min_spacing_px` to a better one is dropped -> at most
`max_candidates`.

Stage coordinates (`Candidate.x_um`, `y_um`) are filled in by the caller, which knows the frame's stage
position and calibration (`agent.commands.locate.candidates_to_stage`); the locator is pixel-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from agent.locate.analysis import ClusterAnalysis, LocateSettings
from agent.locate.bitmask import block_any, distance_to_true_px
from agent.locate.errors import SettingsError
from agent.locate.object_features import CANDIDATE_FEATURE_NAMES, CONTEXT_FEATURE_NAMES, cold_start_score
from agent.locate.objects import ObjectTable, cross_steps


@dataclass(frozen=True)
class Candidate:
    """A candidate target: centre in pixels (row, col), area in pixels, score (higher is better),
    the cluster it came from (-1 for similarity candidates), stage position (um) when known, and the
    object's features (`object_features.CANDIDATE_FEATURE_NAMES`; empty for a region without objects)."""

    row_px: float
    col_px: float
    area_px: float
    score: float
    cluster_id: int
    x_um: float | None = None
    y_um: float | None = None
    features: tuple[float, ...] = ()

    def feature_dict(self) -> dict[str, float]:
        """The features by name ({} when there are none)."""
        return dict(zip(CANDIDATE_FEATURE_NAMES, self.features, strict=True)) if self.features else {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (features by name)."""
        values: dict[str, Any] = dataclasses.asdict(self)
        values["features"] = {name: round(value, 6) for name, value in self.feature_dict().items()}
        return values


def bar_distance_px(bar_mask: np.ndarray, points_rc: np.ndarray, max_side_px: int = 1024) -> np.ndarray:
    """Distance (px) from each (row, col) point to the nearest True pixel of `bar_mask` (inf if none).

    Computed on a block-reduced mask (a block counts as bar if any pixel is) for speed, so the result is
    accurate to about one block (the mask's longer side / `max_side_px`).
    """
    points_rc = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
    if not bar_mask.any():
        return np.full(points_rc.shape[0], np.inf)
    factor = max(1, int(np.ceil(max(bar_mask.shape) / max_side_px)))
    small = block_any(bar_mask, factor) if factor > 1 else bar_mask  # the edge blocks padded with False
    r = np.clip((points_rc[:, 0] // factor).astype(np.int64), 0, small.shape[0] - 1)
    c = np.clip((points_rc[:, 1] // factor).astype(np.int64), 0, small.shape[1] - 1)
    # ndimage.distance_transform_edt(~small)[r, c], at the points only
    return np.maximum(distance_to_true_px(small, r, c) * factor - (factor - 1) * 0.5, 0.0)


def find_candidates(
    analysis: ClusterAnalysis,
    crystal_clusters: Sequence[int],
    settings: LocateSettings | None = None,
    score_map: np.ndarray | None = None,
    image: np.ndarray | None = None,
    prepared: np.ndarray | None = None,
) -> list[Candidate]:
    """Ranked candidates from `crystal_clusters` of `analysis`, or from `score_map` (a similarity map of
    the cell grid, thresholded at `settings.similarity_threshold`) when given; see module docstring.

    With `image` (the analysed image), each region is split into the objects it holds (see
    `objects_in_regions`) and every object becomes a candidate at its own centroid; a region in which no
    object stands out keeps its centroid, and a region whose objects were all dropped (ice balls, too
    thick) gives no candidate. `prepared`, if given, is `image` as `preprocess.prepare_image` makes it for
    `analysis.bar_mask` and these settings' `flatten` and `clean`: a caller that asks for the candidates
    of several cluster sets prepares the image once.

    Raises `SettingsError` for unknown cluster ids or a score map of the wrong shape.
    """
    settings = settings or analysis.settings
    selection = _select_cells(analysis, crystal_clusters, settings, score_map)
    if selection is None or not selection[0].any():
        return []
    selected, scores, cluster_of_cell = selection
    regions, n_regions = ndimage.label(selected, structure=np.ones((3, 3), dtype=bool))
    index = np.arange(1, n_regions + 1)
    best = _region_maxima(scores, regions, n_regions)
    sites = _region_sites(analysis, regions, n_regions, settings.min_area_px)
    score, within_region = best[sites.region_of], sites.area_px
    dominant = ndimage.median(cluster_of_cell, regions, index) if score_map is None else np.full(n_regions, -1)
    dominant = np.atleast_1d(np.asarray(dominant))
    if image is not None and score_map is None:
        outlined = np.flatnonzero(dominant == analysis.outline_cluster) if analysis.outline_cluster is not None else []
        sites = _object_sites(sites, image, analysis, regions, settings, prepared, np.asarray(outlined, dtype=int))
        assert sites.features is not None
        score = within_region = _object_scores(sites.features)
    keep = sites.keep
    if settings.min_bar_distance_px > 0:
        # from bars only: a crystal may lie right at the edge of a hole in the film
        keep = keep & (_bar_distances_px(analysis, sites) >= settings.min_bar_distance_px)
    dominant = dominant[sites.region_of]
    order = _ranked_order(keep, within_region, sites.region_of, score)
    return _spaced_candidates(order, sites, score, dominant, settings)


#: Cold-start score of an outlined region in which no object stands out by its contrast (a faint crystal seen
#: by its straight edges only, `agent.locate.outlines`): the middle of the rule's 0..1 range, as the rule has
#: no contrast or shape of an object to go on.
OUTLINED_REGION_SCORE = 0.5


def _region_maxima(values: np.ndarray, regions: np.ndarray, n_regions: int) -> np.ndarray:
    """The largest of `values` in each region 1..n_regions of `regions` (float64, (n_regions,); -inf for a
    region without cells), as `ndimage.maximum` but in one pass over the region cells."""
    in_region = regions.ravel() > 0
    best = np.full(n_regions + 1, -np.inf)
    np.maximum.at(best, regions.ravel()[in_region], np.asarray(values, dtype=np.float64).ravel()[in_region])
    return best[1:]


def _object_scores(features: np.ndarray) -> np.ndarray:
    """`cold_start_score` of every site; `OUTLINED_REGION_SCORE` for sites without features (NaN rows)."""
    measured = np.isfinite(features).all(axis=1)
    scores = np.full(len(features), OUTLINED_REGION_SCORE)
    if measured.any():
        scores[measured] = cold_start_score(features[measured])
    return scores


def _bar_distances_px(analysis: ClusterAnalysis, sites: _Sites) -> np.ndarray:
    """Distance (px) of every site to the nearest grid bar (not to film holes: a crystal may lie right at a
    hole's edge)."""
    if sites.bar_distance_px is not None:
        return sites.bar_distance_px
    return bar_distance_px(analysis.bar_mask_without_holes, np.stack([sites.rows_px, sites.cols_px], 1))


@dataclass(frozen=True)
class _Sites:
    """Candidate sites before ranking (one entry each): the 0-based index of the region the site lies in,
    its centre (row_px, col_px) and area (px), and whether the region is large enough (`min_area_px`);
    for object sites also their features (n, len(CANDIDATE_FEATURE_NAMES)) and distance to the bars (px)."""

    region_of: np.ndarray
    rows_px: np.ndarray
    cols_px: np.ndarray
    area_px: np.ndarray
    keep: np.ndarray
    features: np.ndarray | None = None
    bar_distance_px: np.ndarray | None = None


def _select_cells(
    analysis: ClusterAnalysis,
    crystal_clusters: Sequence[int],
    settings: LocateSettings,
    score_map: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The chosen cells (bool, cell grid), every cell's score and cluster id (-1 everywhere for a score
    map); None when no cluster is chosen. `SettingsError` for unknown cluster ids or a score map of the
    wrong shape."""
    known = {c.cluster_id for c in analysis.clusters}
    if score_map is None:
        unknown = [c for c in crystal_clusters if int(c) not in known]
        if unknown:
            raise SettingsError(f"unknown cluster ids {unknown}; this analysis has clusters {sorted(known)}")
        if not crystal_clusters:
            return None
        selected = np.isin(analysis.label_grid, np.asarray(list(crystal_clusters), dtype=np.int32))
        return selected, analysis.score_grid, analysis.label_grid
    score_map = np.asarray(score_map, dtype=np.float64)
    if score_map.shape != analysis.grid_shape:
        raise SettingsError(f"score map has shape {score_map.shape}, expected the cell grid {analysis.grid_shape}")
    finite = np.isfinite(score_map)
    selected = finite & (np.where(finite, score_map, -np.inf) >= settings.similarity_threshold)
    selected &= analysis.label_grid >= 0
    scores = np.where(finite, score_map, 0.0)
    cluster_of_cell = np.full(analysis.grid_shape, -1, dtype=np.int32)
    return selected, scores, cluster_of_cell


def _region_sites(analysis: ClusterAnalysis, regions: np.ndarray, n_regions: int, min_area_px: float) -> _Sites:
    """One site per region (`regions`: ids 1..n_regions on the cell grid) at its area-weighted centroid,
    moved to the region's nearest cell when the centroid falls outside it (a curved fibre, say)."""
    flat_regions = regions.ravel()
    in_region = flat_regions > 0
    area_cells = analysis.cell_area_px
    weights = np.bincount(flat_regions[in_region], weights=area_cells[in_region], minlength=n_regions + 1)[1:]
    centres = analysis.cell_centres_px  # (col, row)
    col_sum = np.bincount(
        flat_regions[in_region], weights=(centres[:, 0] * area_cells)[in_region], minlength=n_regions + 1
    )
    row_sum = np.bincount(
        flat_regions[in_region], weights=(centres[:, 1] * area_cells)[in_region], minlength=n_regions + 1
    )
    centroid_col = col_sum[1:] / weights
    centroid_row = row_sum[1:] / weights
    # nearest member cell when the centroid falls outside its region
    rows_out, cols_out = [], []
    boxes = None
    for label_id, (r, c) in enumerate(zip(centroid_row, centroid_col, strict=True), start=1):
        cell_r, cell_c = analysis.cell_of_pixel(r, c)
        if regions[cell_r, cell_c] != label_id:
            boxes = ndimage.find_objects(regions) if boxes is None else boxes
            members = _members(regions, label_id, boxes[label_id - 1])  # np.flatnonzero(flat_regions == label_id)
            d2 = (centres[members, 0] - c) ** 2 + (centres[members, 1] - r) ** 2
            nearest = members[int(np.argmin(d2))]
            c, r = centres[nearest]
        rows_out.append(float(r))
        cols_out.append(float(c))
    return _Sites(np.arange(n_regions), np.array(rows_out), np.array(cols_out), weights, weights >= min_area_px)


def _members(regions: np.ndarray, label_id: int, box: tuple[slice, slice]) -> np.ndarray:
    """`np.flatnonzero(regions.ravel() == label_id)` (ascending flat indices), searched in the region's bounding
    `box` only."""
    rows, cols = np.nonzero(regions[box] == label_id)
    return (rows + box[0].start) * regions.shape[1] + (cols + box[1].start)


def _object_sites(
    sites: _Sites,
    image: np.ndarray,
    analysis: ClusterAnalysis,
    regions: np.ndarray,
    settings: LocateSettings,
    prepared: np.ndarray | None,
    outlined_regions: np.ndarray,
) -> _Sites:
    """The objects inside the regions (`objects_in_regions`) as sites, with their features: regions where
    nothing stands out from the film's noise give none, except regions of the outlined cluster
    (`outlined_regions`, 0-based: faint crystals found by their straight edges), which keep their centroid
    with NaN features. Only those when there is no film to compare with."""
    table = objects_in_regions(image, analysis, regions, settings, prepared=prepared)
    n_features = len(CANDIDATE_FEATURE_NAMES)
    if table is None:
        region_of = rows = cols = area = np.zeros(0)
        features = np.zeros((0, n_features - len(CONTEXT_FEATURE_NAMES)))
        dropped: tuple[int, ...] = ()
    else:
        region_of, rows, cols, area = table.region, table.row_px, table.col_px, table.area_px
        features, dropped = table.features, table.dropped_regions
    lone = np.setdiff1d(outlined_regions, np.concatenate([region_of, np.asarray(dropped)]).astype(int))
    n_objects = len(region_of)
    region_of = np.concatenate([region_of, lone]).astype(np.int64)
    rows, cols = np.concatenate([rows, sites.rows_px[lone]]), np.concatenate([cols, sites.cols_px[lone]])
    # the bar distances of every site at once: a feature of the objects, and the ranking's bar test
    distance_px = bar_distance_px(analysis.bar_mask_without_holes, np.stack([rows, cols], 1))
    points = np.stack([rows[:n_objects], cols[:n_objects]], 1)
    context = np.column_stack(
        [np.log1p(np.minimum(distance_px[:n_objects], 1e6)), _neighbour_counts(points, area[:n_objects])]
    )
    return _Sites(
        region_of,
        rows,
        cols,
        np.concatenate([area, sites.area_px[lone]]),
        sites.keep[region_of],
        np.vstack([np.hstack([features, context]), np.full((len(lone), n_features), np.nan)]),
        distance_px,
    )


def _neighbour_counts(points_rc: np.ndarray, area_px: np.ndarray, radii: float = 4.0) -> np.ndarray:
    """For every object, how many other objects lie within `radii` of its equivalent radii (sqrt(area/pi))."""
    from scipy.spatial import cKDTree

    if len(points_rc) < 2:
        return np.zeros(len(points_rc))
    reach_px = radii * np.sqrt(area_px / np.pi)
    tree = cKDTree(points_rc)
    return np.array(
        [len(tree.query_ball_point(p, r)) - 1 for p, r in zip(points_rc, reach_px, strict=True)], dtype=np.float64
    )


def _ranked_order(keep: np.ndarray, within: np.ndarray, region_of: np.ndarray, best: np.ndarray) -> list[int]:
    """Indices of the kept sites, best first: by `best`, every region's first site (highest `within`) before
    any region's second one."""
    # take every region's first kept site, then the second ones, ..., so that the pieces of one big blob do
    # not crowd out the other regions' objects
    kept_index = np.flatnonzero(keep)
    by_size = kept_index[np.lexsort((-within[kept_index], region_of[kept_index]))]
    starts = np.flatnonzero(np.r_[True, np.diff(region_of[by_size]) != 0])
    rank_in_region = np.arange(len(by_size)) - np.repeat(starts, np.diff(np.r_[starts, len(by_size)]))
    return by_size[np.lexsort((-best[by_size], rank_in_region))].tolist()


def _spaced_candidates(
    order: list[int], sites: _Sites, best: np.ndarray, dominant: np.ndarray, settings: LocateSettings
) -> list[Candidate]:
    """Greedy de-duplication in `order`: a site closer than `min_spacing_px` to a chosen one is dropped;
    at most `max_candidates`. `best` and `dominant` are each site's score and cluster id."""
    chosen: list[Candidate] = []
    min_d2 = settings.min_spacing_px**2
    for i in order:
        if any((sites.rows_px[i] - c.row_px) ** 2 + (sites.cols_px[i] - c.col_px) ** 2 < min_d2 for c in chosen):
            continue
        chosen.append(
            Candidate(
                row_px=float(sites.rows_px[i]),
                col_px=float(sites.cols_px[i]),
                area_px=float(sites.area_px[i]),
                score=float(best[i]),
                cluster_id=int(dominant[i]),
                features=_features_of(sites, i),
            )
        )
        if len(chosen) >= settings.max_candidates:
            break
    return chosen


def _features_of(sites: _Sites, index: int) -> tuple[float, ...]:
    """The features of site `index`, () when it has none (a region site, or an outlined region)."""
    if sites.features is None or not np.isfinite(sites.features[index]).all():
        return ()
    return tuple(float(v) for v in sites.features[index])


def objects_in_regions(
    image: np.ndarray,
    analysis: ClusterAnalysis,
    regions: np.ndarray,
    settings: LocateSettings,
    min_contrast_sigma: float = 4.0,
    prepared: np.ndarray | None = None,
) -> ObjectTable | None:
    """The separate objects inside candidate regions, found at pixel level (`agent.locate.objects`).

    The image is prepared as for the features (artefacts removed, illumination flattened, bars and seam strips
    set to the film level); the film level and noise come from the film outside the candidate regions; an
    object's surroundings leave out the pixels set to the level (`preprocess.filled_mask`). Pixels of a
    region that differ from the film by more than `min_contrast_sigma` noise sigmas, in the objects'
    measured polarity, form objects; touching objects are split where they meet (pieces at least a third
    of `settings.min_spacing_px` apart, at least 2 px). Ice balls (round), film lines, with
    `settings.drop_soft_objects` objects whose edge is far wider than the bars' (`agent.locate.edges`), and with
    `settings.max_object_od` objects too thick for diffraction are dropped (the thickness test and the
    `optical_density` feature need the bars for the camera's dark level). None when there is no film to
    compare with. `prepared`: the prepared image when the caller has it already (see `find_candidates`).
    """
    from agent.locate.objects import find_objects
    from agent.locate.preprocess import filled_mask, prepare_image
    from agent.locate.seams import find_seams

    bar = np.asarray(analysis.bar_mask, dtype=bool)
    seams = analysis.seams if analysis.seams is not None else find_seams(image, bar)
    if prepared is None:
        prepared = prepare_image(image, bar, flatten=settings.flatten, clean=settings.clean, seams=seams)
    # the film is every unmasked cell outside the candidate regions, not the background cluster alone: film
    # with mottle or residual illumination splits into several clusters, and the largest one's level is
    # then biased (it flipped the objects' polarity on a mottled film)
    film = analysis.to_pixels(regions == 0)
    return find_objects(
        prepared,
        film,
        # region ids in the smallest unsigned type that holds them (uint8 up to 255 regions, else uint16, ...):
        # a quarter or half of int32's full-size array to write (first touch of fresh memory is slow)
        analysis.to_pixels(regions.astype(np.min_scalar_type(max(int(regions.max(initial=0)), 1)))),
        bar,
        min_contrast_sigma=min_contrast_sigma,
        min_distance_px=max(2, round(settings.min_spacing_px / 3)),
        min_area_px=settings.min_area_px,
        dark_fraction=dark_fraction(image, bar, film),
        max_od=settings.max_object_od,
        drop_round=settings.drop_round_objects,
        max_edge_px=_max_edge_px(image, bar) if settings.drop_soft_objects else None,
        filled=filled_mask(bar, seams),
    )


def _max_edge_px(image: np.ndarray, bar_mask: np.ndarray) -> float:
    """The widest edge (px) a crystal may have in `image`: `edges.SOFT_EDGE_FACTOR` times the bars' edge width."""
    from agent.locate.edges import SOFT_EDGE_FACTOR, bar_edge_width_px

    return SOFT_EDGE_FACTOR * bar_edge_width_px(image, bar_mask)


def dark_fraction(image: np.ndarray, bar_mask: np.ndarray, film: np.ndarray, min_pixels: int = 400) -> float | None:
    """The camera's zero-transmission level as a fraction of the film level, from the raw `image`: median
    of the bar pixels well inside the bar mask (grid bars stop the beam) over the median of the film
    pixels. None when fewer than `min_pixels` bar pixels remain or the ratio is not in [0, 1).

    "Well inside" is 4 erosions by the 3x3 cross (`ndimage.binary_erosion(bar_mask, iterations=4)`), film
    pixels 4 cross dilations away from the bars; both by shifted ANDs / ORs, the same masks 2-3x faster."""
    bar_mask = np.asarray(bar_mask, dtype=bool)
    inner = cross_steps(bar_mask, 4, erode=True)
    film_only = film & ~cross_steps(bar_mask, 4, erode=False)
    if np.count_nonzero(inner) < min_pixels or np.count_nonzero(film_only) < min_pixels:
        return None
    step_bar = max(1, int(np.count_nonzero(inner)) // 200_000)
    step_film = max(1, int(np.count_nonzero(film_only)) // 200_000)
    dark = float(np.median(image[inner][::step_bar]))
    bright = float(np.median(image[film_only][::step_film]))
    if not bright > 0 or not 0 <= dark / bright < 1:
        return None
    return dark / bright

