"""Step `calibrating`: the image -> stage matrix of every preset the session uses and lacks.

With the instrument's stored calibration (`ctx.stored_calibration`, from `agent.steps.calibration_store`),
each stored preset is checked with one test move (`agent.steps.calibration_check`, seconds) and measured
again only when the check fails; a preset not stored, stored for other optics (its nominal pixel size or
binning changed), or any preset under `ctx.recalibrate`, is measured (`measure_preset`, about a minute).
Each preset ends with a `calibration_check` record (ok / failed / measured, the check's error in pixels
and the microscope time spent); a measured preset's `calibration` record comes first (the session's
subscribers store it, in the session folder and in the instrument's store).

Each preset is measured at a grid-square corner near the stage centre, where film meets bar along two
directions (structure in both axes at every magnification), found on the overview (`square_corners`);
without a visible mesh, near the centre (a spiral of points over retries). Each retry of the step
(`ctx.calibration_attempt`) takes the next corner or spiral point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from agent.session.records import CalibrationChecked, CalibrationMeasured
from agent.steps.atlas import Atlas, frame_atlas
from agent.steps.calibration_check import CheckResult, check_preset
from agent.steps.context import SessionContext
from agent.steps.motion import approach_move
from agent.steps.serialem_map import load_serialem_map
from agent.steps.stage_calibration import CalibrationSet, PresetCalibration, measure_preset
from drivers.geometry import image_centre_px


@dataclass(frozen=True)
class CalibrateResult:
    """The calibration with every needed preset measured."""

    calibration: CalibrationSet


def presets_to_calibrate(ctx: SessionContext) -> list[str]:
    """The presets this session uses: overview (when the plan maps from an overview), atlas, search; only search
    on a SerialEM map (`area.serialem_map`: the map item gives the atlas' pixel -> stage transform)."""
    presets = ctx.plan.presets
    if ctx.plan.area.serialem_map is not None:
        return [presets.search]
    needed = [presets.atlas, presets.search]
    if ctx.plan.area.overview and ctx.plan.area.box_um is None:
        needed.insert(0, presets.overview)
    return needed


def calibrate(ctx: SessionContext) -> CalibrateResult:
    """Check or measure each needed preset not yet in `ctx.calibration` (see the module docstring); each is
    recorded as soon as it is settled (so a restarted session keeps it). Raises `MicroscopeError` subclasses
    from the stage or camera and `CalibrationError` when the image shows too little structure."""
    for preset in presets_to_calibrate(ctx):
        if preset not in ctx.calibration.presets:
            settle_preset(ctx, preset)
    return CalibrateResult(calibration=ctx.calibration)


def settle_preset(ctx: SessionContext, preset: str) -> None:
    """Check the stored matrix of `preset` and keep it, or measure it; record what happened."""
    started_s = ctx.clock_s()
    site = calibration_site(ctx, preset)
    stored, reason = stored_preset(ctx, preset)
    check = None
    if stored is not None:
        check = check_preset(
            ctx.microscope,
            stored,
            exposure_s=ctx.plan.exposures.calibration_s,
            stage_xy_um=site,
            approach_um=ctx.plan.targeting.approach_um,
        )
        if check.passed:
            ctx.calibration = ctx.calibration.with_preset(stored)
            ctx.output.record(_check_record(ctx, preset, "ok", check, stored, started_s, check.reason))
            return
        reason = f"check failed: {check.reason}"
    measured = measure_preset(
        ctx.microscope,
        preset,
        exposure_s=ctx.plan.exposures.calibration_s,
        stage_xy_um=site,
        approach_um=ctx.plan.targeting.approach_um,
    )
    ctx.calibration = ctx.calibration.with_preset(measured)
    ctx.output.record(CalibrationMeasured.model_validate(measured.model_dump(mode="json")))
    result = "measured" if check is None else "failed"
    ctx.output.record(_check_record(ctx, preset, result, check, stored, started_s, reason))


def _check_record(
    ctx: SessionContext,
    preset: str,
    result: Literal["ok", "failed", "measured"],
    check: CheckResult | None,
    stored: PresetCalibration | None,
    started_s: float,
    reason: str,
) -> CalibrationChecked:
    """The `calibration_check` record of one preset; `started_s` is the clock when its calibration began."""
    return CalibrationChecked(
        preset=preset,
        result=result,
        reason=reason,
        error_px=None if check is None else check.error_px,
        tolerance_px=None if check is None else check.tolerance_px,
        shift_px=None if check is None else check.shift_px,
        time_s=round(ctx.clock_s() - started_s, 3),
        stored_utc=None if stored is None else stored.measured_utc,
        calibration=stored.model_dump(mode="json") if result == "ok" and stored is not None else None,
    )


def stored_preset(ctx: SessionContext, preset: str) -> tuple[PresetCalibration | None, str]:
    """The stored calibration of `preset` to check, or None with the reason it must be measured."""
    stored = ctx.stored_calibration
    if ctx.recalibrate:
        return None, "--recalibrate: measuring every preset"
    if stored is None or preset not in stored.presets:
        return None, f"no stored calibration of {preset!r} for {ctx.info.name!r}"
    entry = stored.presets[preset]
    nominal_um = ctx.info.preset(preset).pixel_size_um
    if not math.isclose(entry.nominal_pixel_size_um, nominal_um, rel_tol=1e-3):
        return None, (
            f"the stored {preset!r} was measured at a nominal {entry.nominal_pixel_size_um:.4g} um/px; "
            f"the preset now has {nominal_um:.4g} um/px"
        )
    return entry, ""


def calibration_site(ctx: SessionContext, preset: str) -> tuple[float, float]:
    """Where to calibrate `preset` (stage um): the corner of a grid square near the centre when the overview
    shows the mesh, else near the stage centre. For presets above the atlas the corner is refined on an atlas
    frame (the overview locates it only to a few pixels of ~2-6 um)."""
    attempt = ctx.calibration_attempt
    spiral = (40.0 * attempt * math.cos(attempt * 2.4), 40.0 * attempt * math.sin(attempt * 2.4))
    if ctx.plan.area.serialem_map is not None:
        return serialem_map_site(ctx, spiral)
    overview_preset, atlas_preset = ctx.plan.presets.overview, ctx.plan.presets.atlas
    if preset == overview_preset or overview_preset not in ctx.calibration.presets:
        return spiral
    overview = overview_atlas(ctx)
    corners = square_corners(overview, bar_mask(ctx, overview), near_xy_um=(0.0, 0.0))
    if not corners:
        return spiral
    site = corners[attempt % len(corners)]
    if preset != atlas_preset and atlas_preset in ctx.calibration.presets:
        ctx.microscope.set_preset(atlas_preset)
        approach_move(ctx.microscope, site[0], site[1], ctx.plan.targeting.approach_um, always=True)
        frame = ctx.microscope.acquire(ctx.plan.exposures.calibration_s)
        local = frame_atlas(frame, ctx.calibration.matrix(atlas_preset))
        refined = square_corners(local, bar_mask(ctx, local), near_xy_um=site)
        if refined:
            site = refined[0]
    return site


def serialem_map_site(ctx: SessionContext, spiral_um: tuple[float, float]) -> tuple[float, float]:
    """Where to calibrate on a SerialEM map session: the corner of a grid square near the map's centre, the
    `ctx.calibration_attempt`-th nearest (the map item places it to about a map pixel); without a visible mesh,
    `spiral_um` (stage um) about the map's centre."""
    source = ctx.plan.area.serialem_map
    assert source is not None
    radius_um = ctx.plan.confirm.radius_um
    atlas = load_serialem_map(source.mdoc_path, source.nav_path, source.map_id, tolerance_um=radius_um).atlas
    centre = atlas.pixel_to_stage_um(image_centre_px(atlas.image.shape))
    corners = square_corners(atlas, bar_mask(ctx, atlas), near_xy_um=(float(centre[0]), float(centre[1])))
    if corners:
        return corners[ctx.calibration_attempt % len(corners)]
    return (float(centre[0]) + spiral_um[0], float(centre[1]) + spiral_um[1])


def overview_atlas(ctx: SessionContext) -> Atlas:
    """The whole-grid overview (acquired once per session at the stage centre, then kept in the context)."""
    if ctx.overview is None:
        preset = ctx.plan.presets.overview
        ctx.microscope.set_preset(preset)
        approach_move(ctx.microscope, 0.0, 0.0, ctx.plan.targeting.approach_um, always=True)
        frame = ctx.microscope.acquire(ctx.plan.exposures.overview_s)
        ctx.output.save_frame("overview", "overview.tif", frame)
        ctx.overview = frame_atlas(frame, ctx.calibration.matrix(preset))
    return ctx.overview


def bar_mask(ctx: SessionContext, atlas: Atlas) -> np.ndarray:
    """Grid bars and black areas of an overview or atlas image; the overview's is computed once.

    Only the locator's mask step runs (`bar_and_black_mask`, the same as `analyse` with
    `bar_filter="auto"`): no features or clustering are needed for it.
    """
    from agent.locate.analysis import LocateSettings, bar_and_black_mask

    if atlas is ctx.overview and ctx.overview_bar_mask is not None:
        return ctx.overview_bar_mask
    mask, _angle_deg = bar_and_black_mask(np.asarray(atlas.image), LocateSettings(bar_filter="auto"))
    mask = np.asarray(mask, dtype=bool)
    if atlas is ctx.overview:
        ctx.overview_bar_mask = mask
    return mask


def square_corners(
    atlas: Atlas, bar_mask: np.ndarray, near_xy_um: tuple[float, float], max_corners: int = 8
) -> list[tuple[float, float]]:
    """Stage positions of grid-square corners, nearest `near_xy_um` first (empty if no mesh is seen).

    Bar crossings are the bar pixels farthest from open film (local maxima of the distance transform
    inside the bars); the film pixel nearest a crossing is a square's corner. Only the inner half of
    the image around `near_xy_um` is searched, which keeps off the grid rim.
    """
    mask = np.asarray(bar_mask, dtype=bool)
    rows, cols = mask.shape
    origin = atlas.stage_to_pixel(np.asarray(near_xy_um, dtype=np.float64))
    yy, xx = np.mgrid[:rows, :cols]
    inside = np.hypot(xx - origin[0], yy - origin[1]) < min(rows, cols) / 2
    if not inside.any() or not 0.02 < mask[inside].mean() < 0.95:
        return []
    distance, nearest = ndimage.distance_transform_edt(mask, return_indices=True)
    ridge = (distance == ndimage.maximum_filter(distance, size=3)) & (distance > 1) & inside
    if not np.any(ridge):
        return []
    # Mid-bar ridge points are w/2 from film, crossings w/2 * sqrt(2); the region outside the grid (also
    # "bar") is much farther. The median ridge value is the mesh's w/2.
    half_width = float(np.median(distance[ridge]))
    band = (distance >= 1.2 * half_width) & (distance <= 1.7 * half_width) & inside
    size = max(3, int(2 * half_width) | 1)
    peaks = band & (distance == ndimage.maximum_filter(np.where(band, distance, 0.0), size=size))
    if not np.any(peaks):
        return []
    peak_rows, peak_cols = np.nonzero(peaks)
    order = np.argsort(np.hypot(peak_cols - origin[0], peak_rows - origin[1]))[:max_corners]
    corner_rc = nearest[:, peak_rows[order], peak_cols[order]]
    xy = atlas.pixel_to_stage_um(np.column_stack([corner_rc[1], corner_rc[0]]).astype(np.float64))
    return [(float(x), float(y)) for x, y in xy]
