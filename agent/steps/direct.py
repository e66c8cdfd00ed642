"""Direct snapshots: a diffraction snapshot at the atlas position with no search image, for a target whose object
the beam lights well enough whatever the session's measured position error.

A search image exists to find the object again and put the beam on it. When the atlas already places the beam on
the object, it only costs time: on `thermo-serialem` a target with a search image needs a preset change back to
imaging, the search exposure and two diffraction switches, about 9 s; a direct snapshot needs the move, settling
and the snapshot, about 5 s, and consecutive direct snapshots stay in diffraction. Serial ED goes from the
low-magnification map straight to diffraction the same way (Smeets et al. 2018, instamatic).

A target is snapped directly when all of these hold (`direct_snapshot_ok`):
- the plan allows it (`confirm.direct_snapshot`);
- the session has re-centred at least `confirm.direct_after_measured` (default 8) diffracting targets on
  search images. Its position
  error is twice their median re-centring offset (`position_error_um`): for a 2-D normal error the median radius
  is 1.18 sigma, so twice it is 2.35 sigma, which holds 94 % of the targets;
- the beam, anywhere within that error of the atlas position, is sure to light at least `MIN_SURE_LIT_SHARE` of what
  a perfectly centred beam would light of the object (`sure_lit_share`). The object is taken as a disc of its inner
  radius on the atlas (`inner_radius_um`: the semi-minor axis of the ellipse of its area and elongation, times its
  solidity, so that ragged and concave objects count smaller). That holds for objects wider than the beam radius
  (`confirm.beam_diameter_um` / 2) plus the error (the beam lies on the object whatever the error, as before), and
  for objects so narrow that the beam, off by the error, still covers most of their width (a small plate, a needle
  across the beam): centring them on a search image changes little of what the beam lights. Objects in between
  (about as wide as the beam) still get a search image.

Everything it reads is in the journal (the plan, the atlas, the targets' features and the outcomes so far), so a
resumed session decides as the uninterrupted one did. A direct snapshot is not a confirmation: its target counts
as diffracting or not, never as found again at the search preset (`TargetResult.direct`).
"""

from __future__ import annotations

import math
import statistics

from agent.session.outcomes import TargetRecord
from agent.steps.context import SessionContext


def position_error_um(ctx: SessionContext) -> float | None:
    """Twice the median re-centring offset (um) of this session's diffracting targets that had a search image,
    or None while fewer than `confirm.direct_after_measured` were measured."""
    results = ctx.results.values()
    offsets = [result.recentre_offset_um for result in results if result.outcome == "recorded" and not result.direct]
    if len(offsets) < ctx.plan.confirm.direct_after_measured:
        return None
    return 2.0 * statistics.median(offsets)


def inner_radius_um(ctx: SessionContext, target: TargetRecord) -> float | None:
    """The radius (um) of the widest disc the target's object holds about its centre, estimated from its atlas
    features (area, elongation, solidity) and the atlas' pixel size; None without them."""
    features = target.features
    if ctx.atlas is None or not all(k in features for k in ("log_area_px", "log_elongation", "solidity")):
        return None
    area_px = math.exp(features["log_area_px"])
    elongation = max(1.0, math.exp(features["log_elongation"]))
    semi_minor_px = math.sqrt(area_px / (math.pi * elongation))
    return semi_minor_px * min(1.0, max(0.0, features["solidity"])) * ctx.atlas.pixel_size_um


#: The share of a perfectly centred beam's lit area of an object that a direct snapshot must be sure to light
#: (`sure_lit_share`). No published figure: a guess that half the crystal area a re-centred snapshot would light
#: still shows its lattice (the spots' intensity scales with the lit crystal area; MicroED and serial ED take
#: crystals smaller than the selected area as they are, Smeets et al. 2018).
MIN_SURE_LIT_SHARE = 0.5


def sure_lit_share(radius_um: float, beam_radius_um: float, error_um: float) -> float:
    """The share (0-1) of an object disc of `radius_um` that a beam of `beam_radius_um` lights when centred on it
    that a beam off by up to `error_um` is sure to light: all of it when the object is at least the beam radius plus
    the error wide (the beam stays on it), else the concentric disc of radius min(object, beam - error) over
    min(object, beam), squared (that disc stays under the beam)."""
    if radius_um <= 0 or beam_radius_um <= 0:
        return 0.0
    if radius_um >= beam_radius_um + error_um:
        return 1.0
    sure_um = max(0.0, min(radius_um, beam_radius_um - error_um))
    return (sure_um / min(radius_um, beam_radius_um)) ** 2


def direct_snapshot_ok(ctx: SessionContext, target: TargetRecord, error_um: float | None = None) -> bool:
    """True when `target` is snapped at its atlas position with no search image (see the module doc);
    `error_um`: `position_error_um(ctx)` when the caller has it already."""
    confirm = ctx.plan.confirm
    if not confirm.direct_snapshot or not confirm.diffraction:
        return False
    error_um = position_error_um(ctx) if error_um is None else error_um
    radius_um = inner_radius_um(ctx, target)
    if error_um is None or radius_um is None:
        return False
    return sure_lit_share(radius_um, confirm.beam_diameter_um / 2.0, error_um) >= MIN_SURE_LIT_SHARE


def within_shift(stage_xy_um: tuple[float, float], x_um: float, y_um: float, limit_um: float) -> bool:
    """True when stage point (x_um, y_um) is within `limit_um` of `stage_xy_um` on each axis (image-shift range)."""
    return limit_um > 0 and abs(x_um - stage_xy_um[0]) <= limit_um and abs(y_um - stage_xy_um[1]) <= limit_um


def shift_reachable(
    ctx: SessionContext, stage_xy_um: tuple[float, float], candidates: list[TargetRecord], limit_um: float
) -> TargetRecord | None:
    """The first of `candidates` (in their order) snapped directly that the beam reaches from the stage at
    `stage_xy_um` by image shift alone (no stage move, no settling), or None."""
    if limit_um <= 0 or not ctx.plan.confirm.direct_snapshot:
        return None
    error_um = position_error_um(ctx)
    if error_um is None:
        return None
    return next(
        (t for t in candidates if within_shift(stage_xy_um, t.x_um, t.y_um, limit_um)
         and direct_snapshot_ok(ctx, t, error_um)),
        None,
    )


def group_point(ctx: SessionContext, target: TargetRecord, limit_um: float) -> tuple[float, float]:
    """Where the stage goes (x_um, y_um) for a direct snapshot of `target`: the centre of the box of `target` and
    the unvisited targets of its tier snapped directly nearest to it (nearest first, the planned order breaking
    ties) while that box stays within twice `limit_um` on each axis, so that every one of them is then snapped by
    image shift from there with no further stage move (serial ED's beam shift from crystal to crystal). `target`
    alone: its own position."""
    error_um = position_error_um(ctx)
    others = [
        t for t in ctx.targets
        if t.target_id not in ctx.results and t.tier == target.tier and t.target_id != target.target_id
        and abs(t.x_um - target.x_um) <= 2 * limit_um and abs(t.y_um - target.y_um) <= 2 * limit_um
        and direct_snapshot_ok(ctx, t, error_um)
    ]
    others.sort(key=lambda t: math.hypot(t.x_um - target.x_um, t.y_um - target.y_um))  # stable: planned order
    xs, ys = [target.x_um], [target.y_um]
    for other in others:
        trial_x, trial_y = [*xs, other.x_um], [*ys, other.y_um]
        if max(trial_x) - min(trial_x) <= 2 * limit_um and max(trial_y) - min(trial_y) <= 2 * limit_um:
            xs, ys = trial_x, trial_y
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
