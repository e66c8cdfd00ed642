"""Signed distances (micrometres, positive inside) of the simulator's object shapes, vectorised.

Every function takes arrays of point offsets from an object's centre and the object's parameters
(broadcastable arrays), and returns the signed distance in micrometres: > 0 inside, < 0 outside.
Imaging turns a signed distance into anti-aliased pixel coverage with `coverage_from_distance`;
specimen queries threshold it (optionally with a tolerance).
"""

from __future__ import annotations

import numpy as np

#: Shape codes of crystals, as stored in `Specimen` arrays; index = code.
CRYSTAL_SHAPES: tuple[str, ...] = ("plate", "rod", "needle", "block")
SHAPE_PLATE, SHAPE_ROD, SHAPE_NEEDLE, SHAPE_BLOCK = range(4)


def rotate_to_local(
    dx_um: np.ndarray, dy_um: np.ndarray, cos_a: np.ndarray, sin_a: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dx, dy) in stage um -> (u, v) in the object's frame (u along its long axis)."""
    u = dx_um * cos_a + dy_um * sin_a
    v = -dx_um * sin_a + dy_um * cos_a
    return u, v


def box_distance_um(u: np.ndarray, v: np.ndarray, half_length_um: np.ndarray, half_width_um: np.ndarray) -> np.ndarray:
    """Signed distance to a rectangle |u| <= half_length, |v| <= half_width (exact box SDF, negated)."""
    du = np.abs(u) - half_length_um
    dv = np.abs(v) - half_width_um
    outside = np.hypot(np.maximum(du, 0.0), np.maximum(dv, 0.0))
    inside = np.minimum(np.maximum(du, dv), 0.0)
    return -(outside + inside)


def hexagon_distance_um(
    u: np.ndarray, v: np.ndarray, half_length_um: np.ndarray, half_width_um: np.ndarray
) -> np.ndarray:
    """Approximate signed distance to an elongated hexagon (a plate).

    Vertices at (+-L/2, 0) and (+-L/4, +-W/2): |v| <= W/2 and |u|/(L/2) + |v|/W <= 1 (W = 2 half_width).
    Outside the shape this is the largest half-plane violation, a slight under-estimate of the distance.
    """
    au = np.abs(u)
    av = np.abs(v)
    width = 2.0 * half_width_um
    norm = np.sqrt((1.0 / half_length_um) ** 2 + (1.0 / width) ** 2)
    slant = (1.0 - au / half_length_um - av / width) / norm
    return np.minimum(half_width_um - av, slant)


def crystal_distance_um(
    dx_um: np.ndarray,
    dy_um: np.ndarray,
    length_um: np.ndarray,
    width_um: np.ndarray,
    angle_deg: np.ndarray,
    shape_code: np.ndarray,
) -> np.ndarray:
    """Signed distance (um) of points offset (dx, dy) from crystals' centres; shapes per `CRYSTAL_SHAPES`."""
    angle_rad = np.deg2rad(angle_deg)
    u, v = rotate_to_local(dx_um, dy_um, np.cos(angle_rad), np.sin(angle_rad))
    half_l = np.asarray(length_um, dtype=np.float64) / 2.0
    half_w = np.asarray(width_um, dtype=np.float64) / 2.0
    box = box_distance_um(u, v, half_l, half_w)
    hexagon = hexagon_distance_um(u, v, half_l, half_w)
    return np.where(np.asarray(shape_code) == SHAPE_PLATE, hexagon, box)


def blob_distance_um(
    dx_um: np.ndarray,
    dy_um: np.ndarray,
    radius_um: np.ndarray,
    harmonics: np.ndarray,
    phases: np.ndarray,
) -> np.ndarray:
    """Signed distance (approximate) to a star-shaped blob r(t) = R (1 + sum_k a_k cos(k t + phi_k)).

    `harmonics` and `phases` have a trailing axis of length K (k = 2 .. K+1); all-zero harmonics give a disc.
    """
    distance = np.hypot(dx_um, dy_um)
    theta = np.arctan2(dy_um, dx_um)
    harmonics = np.asarray(harmonics, dtype=np.float64)
    phases = np.asarray(phases, dtype=np.float64)
    factor = np.ones_like(distance)
    for k in range(harmonics.shape[-1]):
        factor = factor + harmonics[..., k] * np.cos((k + 2) * theta + phases[..., k])
    return np.asarray(radius_um) * factor - distance


def coverage_from_distance(distance_um: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Fraction of a pixel covered by a shape, from its signed distance (a one-pixel linear edge ramp)."""
    return np.clip(distance_um / pixel_size_um + 0.5, 0.0, 1.0)
