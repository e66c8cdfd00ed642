"""Step `mapping`: choose the stage box to map and acquire the atlas montage there.

The box is the plan's own (`area.box_um`), else the next block of grid squares seen on the overview
(typical squares: empty, broken and contaminated ones avoided; the first block nearest the stage centre,
each later one next to the block before, never a square mapped already), else one atlas field at the stage
position. It is clipped to the stage limits.

A session sized by its budget maps in rounds: `next_block` says whether another block is left, and every
round's atlas is written as `atlas/atlas.tif` (round 1) or `atlas/round-<n>/atlas.tif`.

A plan with `area.serialem_map` maps nothing: the operator's SerialEM grid map is the atlas (`map_serialem`), in one
round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from agent.session.records import MappingPlanned
from agent.steps.atlas import (
    Atlas,
    GridSquare,
    acquire_montage,
    assemble,
    block_box_um,
    choose_block,
    find_squares,
    plan_tiles,
)
from agent.steps.calibrate import bar_mask, overview_atlas
from agent.steps.context import SessionContext
from agent.steps.serialem_map import load_serialem_map

logger = logging.getLogger(__name__)

BoxUm = tuple[float, float, float, float]


@dataclass(frozen=True)
class MapResult:
    """The assembled atlas, the stage box it was asked to cover (x_min, x_max, y_min, y_max um) and the
    microscope seconds from the plan to the assembled atlas (as the `mapping` records' times say)."""

    atlas: Atlas
    box_um: BoxUm
    mapping_s: float = 0.0


def map_grid(ctx: SessionContext) -> MapResult:
    """Plan the montage, acquire it at the atlas preset and assemble it; the atlas TIFF is saved.

    Raises `MicroscopeError` subclasses from the stage or camera. A plan with `area.serialem_map` takes that map
    instead (`map_serialem`)."""
    if ctx.plan.area.serialem_map is not None:
        return map_serialem(ctx)
    if ctx.image_shift_limit_um() > 0:  # the montage's tiles are where the stage is: no shift left by a target
        ctx.microscope.set_image_shift(0.0, 0.0)  # type: ignore[attr-defined]
    ctx.field = None
    limits = ctx.microscope.stage_limits()
    atlas_preset = ctx.plan.presets.atlas
    matrix = ctx.calibration.matrix(atlas_preset)
    frame_shape = ctx.frame_shape(atlas_preset)
    round_number = ctx.rounds + 1
    box, squares = _box_to_map(ctx, matrix, frame_shape)
    box = (
        max(box[0], limits.x_min_um),
        min(box[1], limits.x_max_um),
        max(box[2], limits.y_min_um),
        min(box[3], limits.y_max_um),
    )
    positions = plan_tiles(box, matrix, frame_shape, ctx.plan.area.overlap_fraction)
    planned_s = ctx.clock_s()
    ctx.output.record(
        MappingPlanned(event="plan", round=round_number, box_um=box, tiles=len(positions), squares=squares)
    )
    frames = acquire_montage(
        ctx.microscope,
        positions,
        preset=atlas_preset,
        exposure_s=ctx.plan.exposures.atlas_s,
        approach_um=ctx.plan.targeting.approach_um,
    )
    atlas = assemble(frames, matrix)
    path = ctx.output.save_frame("atlas", f"{atlas_folder(round_number)}/atlas.tif", atlas.as_frame(ctx.clock_s()))
    done_s = ctx.clock_s()
    ctx.output.record(
        MappingPlanned(
            event="done", round=round_number, box_um=box, path=path, shape_px=atlas.image.shape, squares=squares
        )
    )
    return MapResult(atlas=atlas, box_um=box, mapping_s=done_s - planned_s)


def map_serialem(ctx: SessionContext) -> MapResult:
    """The plan's SerialEM grid map as this session's atlas (`agent.steps.serialem_map`): no stage move and no
    exposure; recorded and saved (`atlas/atlas.tif`) as a mapped atlas is, with the map's stage box. Its pieces
    must agree with the map item's transform within `confirm.radius_um`. Raises `SerialemMapError`."""
    source = ctx.plan.area.serialem_map
    assert source is not None
    loaded = load_serialem_map(
        source.mdoc_path,
        source.nav_path,
        source.map_id,
        tolerance_um=ctx.plan.confirm.radius_um,
        preset=ctx.plan.presets.atlas,
    )
    logger.info("%s", loaded.describe())
    round_number = ctx.rounds + 1
    box = loaded.box_um
    planned_s = ctx.clock_s()
    ctx.output.record(MappingPlanned(event="plan", round=round_number, box_um=box, tiles=loaded.n_pieces))
    atlas = loaded.atlas
    path = ctx.output.save_frame("atlas", f"{atlas_folder(round_number)}/atlas.tif", atlas.as_frame(ctx.clock_s()))
    ctx.output.record(
        MappingPlanned(event="done", round=round_number, box_um=box, path=path, shape_px=atlas.image.shape)
    )
    return MapResult(atlas=atlas, box_um=box, mapping_s=ctx.clock_s() - planned_s)


def atlas_folder(round_number: int) -> str:
    """The session sub-folder of one round's atlas and its outputs: `atlas`, then `atlas/round-<n>`."""
    return "atlas" if round_number <= 1 else f"atlas/round-{round_number}"


def next_block(ctx: SessionContext) -> list[GridSquare]:
    """The grid squares the next round would map: `squares_per_block` typical squares of the overview not
    mapped yet, the first nearest the last mapped square (the stage centre at first). Empty when none is left
    or there is no overview."""
    overview = overview_atlas(ctx) if ctx.rounds == 0 else ctx.overview
    if overview is None:
        return []
    squares = [
        s for s in find_squares(overview, bar_mask(ctx, overview)) if not in_any_box(s.x_um, s.y_um, ctx.map_boxes_um)
    ]
    near = (0.0, 0.0)
    if ctx.map_boxes_um:
        x_min, x_max, y_min, y_max = ctx.map_boxes_um[-1]
        near = ((x_min + x_max) / 2, (y_min + y_max) / 2)
    return choose_block(squares, ctx.plan.squares_per_block(), near_xy_um=near)


def in_any_box(x_um: float, y_um: float, boxes_um: list[BoxUm]) -> bool:
    """True when stage point (x_um, y_um) lies in one of `boxes_um` (x_min, x_max, y_min, y_max)."""
    return any(b[0] <= x_um <= b[1] and b[2] <= y_um <= b[3] for b in boxes_um)


def _box_to_map(
    ctx: SessionContext, matrix: np.ndarray, frame_shape: tuple[int, int]
) -> tuple[BoxUm, list[dict[str, float]]]:
    """The stage box the plan asks for and the grid squares chosen in it (empty unless from the overview)."""
    area = ctx.plan.area
    if area.box_um is not None:
        return area.box_um, []
    if area.overview:
        block = next_block(ctx)
        if block:
            squares = [{"x_um": s.x_um, "y_um": s.y_um, "typicality": s.typicality} for s in block]
            return block_box_um(block, area.margin_um), squares
        logger.warning("no grid squares found in the overview; mapping one atlas field at the centre")
        return field_box(matrix, frame_shape, (0.0, 0.0)), []
    here = ctx.microscope.get_stage()
    return field_box(matrix, frame_shape, (here.x_um, here.y_um)), []


def field_box(matrix: np.ndarray, frame_shape: tuple[int, int], centre_xy_um: tuple[float, float]) -> BoxUm:
    """The stage box of one field of view centred at `centre_xy_um` (slightly smaller than the frame)."""
    half = 0.45 * np.abs(matrix) @ np.array([frame_shape[1], frame_shape[0]], dtype=np.float64)
    return (centre_xy_um[0] - half[0], centre_xy_um[0] + half[0], centre_xy_um[1] - half[1], centre_xy_um[1] + half[1])
