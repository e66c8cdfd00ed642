"""Direct snapshots: a diffraction snapshot at the atlas position with no search image, for a target whose object
is wide enough that the beam lands on it whatever the session's measured position error.

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
- the object's inner radius on the atlas (`inner_radius_um`: the semi-minor axis of the ellipse of its area and
  elongation, times its solidity, so that ragged and concave objects count smaller) is at least the beam radius
  (`confirm.beam_diameter_um` / 2) plus that error.

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


def direct_snapshot_ok(ctx: SessionContext, target: TargetRecord) -> bool:
    """True when `target` is snapped at its atlas position with no search image (see the module doc)."""
    confirm = ctx.plan.confirm
    if not confirm.direct_snapshot or not confirm.diffraction:
        return False
    error_um = position_error_um(ctx)
    radius_um = inner_radius_um(ctx, target)
    if error_um is None or radius_um is None:
        return False
    return radius_um >= confirm.beam_diameter_um / 2.0 + error_um
