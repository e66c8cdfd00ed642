"""Steps `moving`, `zooming` and `confirming`: go to a target, take a search image, find the object again.

At `confirming` a target is rejected when nothing crystal-like lies near it at the search preset, when the
object there is round (an ice ball), when the object found holds the spot of an earlier snapshot (one crystal the
atlas saw in pieces: a faint needle, a large flake), or when it re-centres onto an object an earlier target already
confirmed (within `targeting.min_spacing_um`: pieces of one large flake or blob are measured once).
Otherwise the object is put under the beam: by image shift where the microscope has it (no new image), else
by a stage move and a new search image there (when the plan asks and the offset matters).

A target that lies in the search image the stage still sits on (the previous target's, within the image-shift
range) is not moved to: it is confirmed on that image and reached by image shift, so neighbouring crystals
cost an image shift and a diffraction snapshot each (`in_search_field`). Where the microscope has image shift, a
new field is placed for the targets it can serve, not for the first one alone (`field_point`): the stage goes
to the centre of the visited target and its nearest unvisited neighbours of the same tier that one search image
and the image-shift range can hold, so that one stage move and one search image serve them all.

Two shortcuts skip the search image: a target on the atlas object of a target already snapped is rejected with no
move (`same_object_as`), and a target whose object is wider than the beam plus the session's measured position
error is snapped at its atlas position (`agent.steps.direct`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.config import ScreeningPlan
from agent.session.outcomes import CONFIRMED_OUTCOMES, TargetRecord
from agent.steps import direct
from agent.steps.context import SearchField, SessionContext, VisitState
from agent.steps.motion import approach_move
from agent.steps.object_near_centre import find_object_near_centre
from drivers.base import Frame
from drivers.geometry import pixel_to_stage_um, stage_to_pixel

#: What the atlas saw at a stage point (see `atlas_classes`).
OFF_ATLAS, BAR, FILM, OTHER = -1, 0, 1, 2


@dataclass(frozen=True)
class Rejection:
    """A target found not to be a new crystal at the search preset: where the stage was and why."""

    x_um: float
    y_um: float
    reason: str


def move(ctx: SessionContext) -> None:
    """Go to the visited target: nothing to do when it lies in the search image the stage sits on (it is then
    reached by image shift, see `in_search_field`); else set the search preset, reset any image shift and
    move the stage to the target's field (`field_point`), taking up backlash only when the move needs it."""
    visit = ctx.require_visit()
    target = visit.target
    visit.same_as = same_object_as(ctx, target)
    if visit.same_as is not None:
        return
    limit_um = ctx.image_shift_limit_um()
    if ctx.field is not None and in_search_field(ctx, ctx.field, target.x_um, target.y_um, limit_um):
        visit.in_field = True
        return
    visit.in_field = False
    if direct.direct_snapshot_ok(ctx, target):
        _move_for_direct_snapshot(ctx, visit, limit_um)
        return
    ctx.field = None
    # back to imaging before the move, so that leaving diffraction (a driver may stay there after a snapshot)
    # overlaps the move and its settling
    ctx.microscope.set_preset(ctx.plan.presets.search)
    x_um, y_um = target.x_um, target.y_um
    if limit_um > 0:
        ctx.microscope.set_image_shift(0.0, 0.0)  # type: ignore[attr-defined]
        x_um, y_um = field_point(ctx, target, limit_um)
        visit.off_centre = (x_um, y_um) != (target.x_um, target.y_um)
    approach_move(ctx.microscope, x_um, y_um, ctx.plan.targeting.approach_um)


def _move_for_direct_snapshot(ctx: SessionContext, visit: VisitState, limit_um: float) -> None:
    """Put the beam on a target snapped with no search image (`agent.steps.direct`), at the search preset (the
    snapshot's) without leaving diffraction if the optics are still there. With image shift: by image shift alone
    when the target is in its range of where the stage is (no move, no settling; a search field the stage sits on
    stays valid), else the stage goes to the centre of the target and its directly snapped neighbours
    (`direct.group_point`) and the image shift puts the beam on the target. Without: the stage on the target."""
    visit.direct = True
    target = visit.target
    on_search = ctx.microscope.get_preset() == ctx.plan.presets.search
    if not on_search:
        ctx.microscope.set_preset(ctx.plan.presets.search)
    if limit_um <= 0:
        approach_move(ctx.microscope, target.x_um, target.y_um, ctx.plan.targeting.approach_um)
        return
    here = ctx.microscope.get_stage()
    stage_xy = (here.x_um, here.y_um)
    if not (on_search and direct.within_shift(stage_xy, target.x_um, target.y_um, limit_um)):
        ctx.field = None
        approach_move(ctx.microscope, *direct.group_point(ctx, target, limit_um), ctx.plan.targeting.approach_um)
        here = ctx.microscope.get_stage()
        stage_xy = (here.x_um, here.y_um)
    ctx.microscope.set_image_shift(target.x_um - stage_xy[0], target.y_um - stage_xy[1])  # type: ignore[attr-defined]


def same_object_as(ctx: SessionContext, target: TargetRecord) -> str | None:
    """The id of a target already snapped (a diffraction snapshot taken) whose atlas object holds `target`: within
    that object's equivalent radius (the disc of its atlas area) of where it was measured, or within
    `targeting.min_spacing_um`. One snapshot tells whether an object diffracts; a second target on a large flake
    or blob is then not worth a move."""
    planned = {t.target_id: t for t in ctx.targets}
    pixel_um = ctx.atlas.pixel_size_um if ctx.atlas is not None else 0.0
    for result in ctx.results.values():
        if not result.snapped:
            continue
        earlier = planned.get(result.target_id)
        log_area = earlier.features.get("log_area_px") if earlier is not None else None
        radius_um = math.sqrt(math.exp(log_area) / math.pi) * pixel_um if log_area is not None else 0.0
        if math.hypot(result.x_um - target.x_um, result.y_um - target.y_um) < max(
            ctx.plan.targeting.min_spacing_um, radius_um
        ):
            return result.target_id
    return None


def field_point(ctx: SessionContext, target: TargetRecord, limit_um: float) -> tuple[float, float]:
    """Where the stage goes (x_um, y_um) for a new search field that starts with `target`: the centre of the box
    of `target` and the unvisited targets of its tier nearest to it (nearest first, the planned order breaking
    ties) while every one of them stays reachable from that centre (`reachable`: inside the image-shift range and
    the confirmation margin of the search frame). `target` alone: its own position."""
    shape = ctx.frame_shape(ctx.plan.presets.search)
    others = [
        t for t in ctx.targets
        if t.target_id not in ctx.results and t.tier == target.tier and t.target_id != target.target_id
        and abs(t.x_um - target.x_um) <= 2 * limit_um and abs(t.y_um - target.y_um) <= 2 * limit_um
    ]
    others.sort(key=lambda t: math.hypot(t.x_um - target.x_um, t.y_um - target.y_um))  # stable: planned order
    group = [(target.x_um, target.y_um)]
    centre = group[0]
    for other in others:
        trial = [*group, (other.x_um, other.y_um)]
        xs, ys = [p[0] for p in trial], [p[1] for p in trial]
        trial_centre = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
        if all(reachable(ctx, trial_centre, shape, x, y, limit_um) for x, y in trial):
            group, centre = trial, trial_centre
    return centre


def zoom(ctx: SessionContext) -> None:
    """Take the search image (saved, kept in the visit) at the search preset; a target in the current search
    field uses that image instead."""
    visit = ctx.require_visit()
    if visit.direct or visit.same_as is not None:
        return
    if visit.in_field and ctx.field is not None:
        visit.search = ctx.field.frame
        visit.images["search"] = ctx.field.path
        return
    if ctx.microscope.get_preset() != ctx.plan.presets.search:  # `move` set it, unless resumed here
        ctx.microscope.set_preset(ctx.plan.presets.search)
    frame = ctx.microscope.acquire(ctx.plan.exposures.search_s)
    visit.search = frame
    target_id = visit.target.target_id
    visit.images["search"] = ctx.output.save_frame("search", f"targets/{target_id}_search.tif", frame, target_id)
    if ctx.image_shift_limit_um() > 0:
        ctx.field = SearchField(frame=frame, path=visit.images["search"])


def in_search_field(ctx: SessionContext, field: SearchField, x_um: float, y_um: float, limit_um: float) -> bool:
    """True when stage point (x_um, y_um) can be confirmed on `field`'s image and reached by image shift: within
    `limit_um` of the stage on each axis, and at least the confirmation radius inside the frame."""
    if limit_um <= 0:
        return False
    # a field's frame is taken with no image shift (`move`, `_recentre`), so its view is the stage position
    return reachable(ctx, field.frame.metadata.view_xy_um, field.frame.shape_px, x_um, y_um, limit_um)


def reachable(
    ctx: SessionContext, view_xy_um: tuple[float, float], shape_px: tuple[int, int], x_um: float, y_um: float,
    limit_um: float,
) -> bool:
    """True when stage point (x_um, y_um) is within `limit_um` of `view_xy_um` (the centre of a search frame of
    `shape_px` taken with no image shift) on each axis and at least the confirmation radius inside that frame."""
    if abs(x_um - view_xy_um[0]) > limit_um or abs(y_um - view_xy_um[1]) > limit_um:
        return False
    matrix = ctx.calibration.matrix(ctx.plan.presets.search)
    col, row = stage_to_pixel(np.array([x_um, y_um]), shape_px, view_xy_um, matrix)
    margin_px = ctx.plan.confirm.radius_um / math.sqrt(abs(float(np.linalg.det(matrix))))
    rows, cols = shape_px
    return bool(margin_px <= col <= cols - 1 - margin_px and margin_px <= row <= rows - 1 - margin_px)


def confirm(ctx: SessionContext) -> Rejection | None:
    """Find the target's object near its expected place in the search image; None when confirmed (the visit
    then holds its stage position, contrast and re-centring offset), else why it was rejected."""
    visit = ctx.require_visit()
    target = visit.target
    if visit.same_as is not None:
        return Rejection(
            target.x_um, target.y_um, f"the same object as {visit.same_as} (on the atlas: no move, no image)"
        )
    if visit.direct:
        _take_direct(ctx, visit)
        return None
    assert visit.search is not None
    frame = visit.search
    expected_xy = (target.x_um, target.y_um) if visit.in_field or visit.off_centre else None
    snapped = [result for result in ctx.results.values() if result.snapped]
    found = locate_near_centre(
        frame, ctx.calibration.matrix(ctx.plan.presets.search), ctx.plan, lambda xy: atlas_classes(ctx, xy),
        expected_xy_um=expected_xy, others_xy_um=[(result.x_um, result.y_um) for result in snapped],
    )
    view_x, view_y = expected_xy or frame.metadata.view_xy_um
    if found is None:
        return Rejection(view_x, view_y, "nothing crystal-like near the expected position at the search preset")
    x_um, y_um, confirm_score, round_outline = found.x_um, found.y_um, found.contrast_sigma, found.round_outline
    if round_outline and ctx.plan.confirm.reject_round:
        return Rejection(x_um, y_um, "a round object at the search preset (an ice ball)")
    if found.holds:
        # one crystal the atlas saw in pieces (a faint needle, a large flake): snapped once already
        earlier = snapped[found.holds[0]].target_id
        return Rejection(x_um, y_um, f"the same object as {earlier} (it holds that snapshot in the search image)")
    offset_um = math.hypot(x_um - view_x, y_um - view_y)
    visit.x_um, visit.y_um, visit.confirm_score, visit.offset_um = x_um, y_um, confirm_score, offset_um
    earlier = measured_near(ctx, x_um, y_um)
    if earlier is not None:
        # several atlas targets on one large object (pieces of a blob, two ends of a flake) all re-centre
        # onto it: measure it once
        return Rejection(x_um, y_um, f"the same object as {earlier} (re-centred onto it at the search preset)")
    if visit.in_field or visit.off_centre or (
        ctx.plan.confirm.recentre and offset_um > 0.05 * ctx.plan.confirm.radius_um
    ):
        _recentre(ctx, x_um, y_um)
    return None


def _take_direct(ctx: SessionContext, visit: VisitState) -> None:
    """A target snapped with no search image stands where the atlas put it."""
    target = visit.target
    visit.x_um, visit.y_um, visit.confirm_score, visit.offset_um = target.x_um, target.y_um, 0.0, 0.0


def _recentre(ctx: SessionContext, x_um: float, y_um: float) -> None:
    """Put the object at (x_um, y_um) under the beam: by image shift when the microscope can reach it that way
    (no new image: the shift is exact to its calibration), else by a stage move and a new search image there."""
    visit = ctx.require_visit()
    assert visit.search is not None
    stage = visit.search.metadata.stage
    shift = (x_um - stage.x_um, y_um - stage.y_um)
    limit_um = ctx.image_shift_limit_um()
    if limit_um > 0 and abs(shift[0]) <= limit_um and abs(shift[1]) <= limit_um:
        ctx.microscope.set_image_shift(*shift)  # type: ignore[attr-defined]
        return
    ctx.field = None
    if limit_um > 0:
        ctx.microscope.set_image_shift(0.0, 0.0)  # type: ignore[attr-defined]
    approach_move(ctx.microscope, x_um, y_um, ctx.plan.targeting.approach_um)
    centred = ctx.microscope.acquire(ctx.plan.exposures.search_s)
    target_id = visit.target.target_id
    visit.images["centred"] = ctx.output.save_frame("centred", f"targets/{target_id}_centred.tif", centred, target_id)
    visit.search = centred
    if limit_um > 0:
        ctx.field = SearchField(frame=centred, path=visit.images["centred"])


def measured_near(ctx: SessionContext, x_um: float, y_um: float) -> str | None:
    """The id of a target already confirmed within `targeting.min_spacing_um` of (x, y) um, if any."""
    spacing_um = ctx.plan.targeting.min_spacing_um
    for result in ctx.results.values():
        if result.outcome in CONFIRMED_OUTCOMES and math.hypot(result.x_um - x_um, result.y_um - y_um) < spacing_um:
            return result.target_id
    return None


def atlas_classes(ctx: SessionContext, xy_um: np.ndarray) -> np.ndarray:
    """What the atlas says is at stage points (n, 2) um: OFF_ATLAS, BAR (bars, black areas), FILM (the
    background cluster) or OTHER (any other cluster)."""
    result = np.full(len(xy_um), OFF_ATLAS, dtype=np.int8)
    if ctx.atlas is None or ctx.analysis is None:
        return result
    analysis = ctx.analysis
    bar = np.asarray(analysis.bar_mask, dtype=bool)
    col_row = np.rint(ctx.atlas.stage_to_pixel(np.asarray(xy_um, dtype=np.float64))).astype(np.int64)
    inside = (col_row[:, 0] >= 0) & (col_row[:, 0] < bar.shape[1])
    inside &= (col_row[:, 1] >= 0) & (col_row[:, 1] < bar.shape[0])
    rows, cols = col_row[inside, 1], col_row[inside, 0]
    labels = np.asarray(analysis.label_grid)[analysis.row_index_px[rows], analysis.col_index_px[cols]]
    classes = np.where(labels == analysis.background_cluster, FILM, OTHER)
    classes[(labels < 0) | bar[rows, cols]] = BAR
    result[inside] = classes
    return result


def _atlas_masks(
    image_shape: tuple[int, ...],
    stage_xy: tuple[float, float],
    matrix_um_per_px: np.ndarray,
    classes_at: object,
) -> tuple[np.ndarray, np.ndarray]:
    """Bar pixels (never the target) and film pixels well inside film (the film level) of a search frame, from
    what the atlas saw at a coarse grid of its pixels."""
    step = max(1, min(image_shape[:2]) // 128)
    rows = np.arange(0, image_shape[0], step)
    cols = np.arange(0, image_shape[1], step)
    grid_cols, grid_rows = np.meshgrid(cols, rows)
    points = np.column_stack([grid_cols.ravel(), grid_rows.ravel()]).astype(np.float64)
    stage_points = pixel_to_stage_um(points, image_shape, stage_xy, matrix_um_per_px)
    coarse = classes_at(stage_points).reshape(grid_rows.shape)  # type: ignore[operator]
    full = np.repeat(np.repeat(coarse, step, axis=0), step, axis=1)[: image_shape[0], : image_shape[1]]
    # Atlas cells are coarse: keep only film well inside film areas (away from any object).
    return full == BAR, ndimage.binary_erosion(full == FILM, iterations=max(1, 4 * step))


@dataclass(frozen=True)
class Located:
    """An object found again on a search frame: its stage position (um), contrast in film-noise sigmas, whether
    its outline is round (an ice ball), and which of the `others_xy_um` points lie on it."""

    x_um: float
    y_um: float
    contrast_sigma: float
    round_outline: bool
    holds: tuple[int, ...] = ()


def locate_near_centre(
    frame: Frame,
    matrix_um_per_px: np.ndarray,
    plan: ScreeningPlan,
    classes_at: object | None = None,
    expected_xy_um: tuple[float, float] | None = None,
    others_xy_um: list[tuple[float, float]] | None = None,
) -> Located | None:
    """Find the object nearest the centre of a search frame (or its stage point `expected_xy_um`) within
    `confirm.radius_um` (see `agent.steps.object_near_centre`), or None; `others_xy_um`: stage points to test
    against it (`Located.holds`).

    `classes_at(stage_xy_um (n, 2)) -> (n,)` says what the atlas saw at stage points (BAR, FILM, OTHER,
    OFF_ATLAS): bar pixels can never be the target, and film pixels set the film level even when objects
    cover most of the frame's border.
    """
    image = np.asarray(frame.image)
    stage_xy = frame.metadata.view_xy_um
    pixel_um = float(math.sqrt(abs(np.linalg.det(matrix_um_per_px))))
    exclude = film = None
    if classes_at is not None:
        exclude, film = _atlas_masks(image.shape, stage_xy, matrix_um_per_px, classes_at)
    point_px = None
    if expected_xy_um is not None:
        col, row = stage_to_pixel(np.asarray(expected_xy_um, dtype=np.float64), image.shape, stage_xy, matrix_um_per_px)
        point_px = (float(col), float(row))
    found = find_object_near_centre(
        image,
        point_px=point_px,
        radius_px=plan.confirm.radius_um / pixel_um,
        min_contrast_sigma=plan.confirm.min_contrast_sigma,
        exclude_mask=exclude,
        film_mask=film,
        min_area_px=math.pi / 4 * (plan.confirm.min_size_um / pixel_um) ** 2,
        others_px=_others_px(others_xy_um, image.shape, stage_xy, matrix_um_per_px),
    )
    if found is None:
        return None
    xy = pixel_to_stage_um(np.array([found.col_px, found.row_px]), image.shape, stage_xy, matrix_um_per_px)
    return Located(float(xy[0]), float(xy[1]), found.contrast_sigma, found.round_outline, found.holds)


def _others_px(
    others_xy_um: list[tuple[float, float]] | None, shape: tuple[int, ...], stage_xy: tuple[float, float],
    matrix_um_per_px: np.ndarray,
) -> list[tuple[float, float]] | None:
    """Stage points (um) as (col, row) pixels of a frame of `shape` centred on `stage_xy` (points off the frame
    stay off it)."""
    if not others_xy_um:
        return None
    points = [stage_to_pixel(np.asarray(xy, dtype=np.float64), shape, stage_xy, matrix_um_per_px)
              for xy in others_xy_um]
    return [(float(col), float(row)) for col, row in points]
