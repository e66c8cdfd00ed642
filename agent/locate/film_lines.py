"""Lines in the support film -- folds, tears, carbon edges -- found as whole lines, so that no piece of one
becomes a target.

A fold is a long strip of doubled film: low contrast, even width, running across a grid square from bar to
bar. Pixel by pixel it is barely above the film's noise, so the object search (`agent.locate.objects`,
pixels >= 4 noise sigmas) sees it as a chain of short blobs, each one looking like a small crystal. Here the
deviation from the film is thresholded with hysteresis (`LOW_SIGMA` to grow, `HIGH_SIGMA` to seed: the whole
fold is connected through its weaker stretches) and each connected component is judged as a whole
(`is_line_component`): a line is thin everywhere (its length at least `MIN_LENGTH_WIDTHS` times its
widest place) and either

- spans the film: it meets the film's boundary (bars, holes, the image edge) at two places at least half its
  length apart -- a crystal lies on the film and does not run from bar to bar; or
- is curved: its skeleton's chord is below `MAX_STRAIGHTNESS` of its length, with at most two ends and two
  branch pixels (touching or crossing needles branch).

`film_line_mask` returns the pixels of such lines; objects lying mostly on them are not crystals.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from agent.locate.object_features import fill_holes

#: Hysteresis thresholds (film noise sigmas of the smoothed image): pixels above `HIGH_SIGMA` seed a
#: component, connected pixels above `LOW_SIGMA` grow it.
LOW_SIGMA = 4.0
HIGH_SIGMA = 4.0
#: A line is at least this many times longer than it is wide at its widest place.
MIN_LENGTH_WIDTHS = 12.0
#: A curved line's chord is below this share of its length.
MAX_STRAIGHTNESS = 0.8
#: Pixels from the film's boundary (bars, holes, image edge) that count as meeting it.
BOUNDARY_REACH_PX = 3
#: Smallest component (px) judged at all.
MIN_COMPONENT_PX = 24


def film_line_mask(deviation_sigma: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Bool mask of the pixels of film lines (see module docstring).

    `deviation_sigma` is the smoothed image's deviation from the film level in the objects' polarity, in film
    noise sigmas; `boundary` a bool mask of where the film ends (bars and holes). Pixels on `boundary` are
    never part of a line."""
    candidate = _hysteresis(deviation_sigma, boundary)
    labels, _count = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    near_edge = _near_boundary(boundary)
    lines = np.zeros(candidate.shape, dtype=bool)
    boxes = ndimage.find_objects(labels)
    large = np.flatnonzero(np.bincount(labels.ravel())[1:] >= MIN_COMPONENT_PX)  # only these are judged
    for label_id in large + 1:
        box = boxes[label_id - 1]
        mask = labels[box] == label_id
        if is_line_component(mask, near_edge[box]):
            lines[box] |= mask
    return lines


def _hysteresis(deviation_sigma: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """`skimage.filters.apply_hysteresis_threshold(np.where(boundary, 0, deviation_sigma), LOW_SIGMA,
    HIGH_SIGMA)`; with equal thresholds every component above `LOW_SIGMA` holds a seed, so it is the plain
    threshold (the same mask, without labelling the whole image)."""
    if LOW_SIGMA == HIGH_SIGMA and LOW_SIGMA >= 0:
        return (deviation_sigma > LOW_SIGMA) & ~np.asarray(boundary, dtype=bool)
    from skimage.filters import apply_hysteresis_threshold

    return apply_hysteresis_threshold(np.where(boundary, 0.0, deviation_sigma), LOW_SIGMA, HIGH_SIGMA)


def _near_boundary(boundary: np.ndarray) -> np.ndarray:
    """Pixels within `BOUNDARY_REACH_PX` of the boundary or of the image edge."""
    edge = np.zeros(boundary.shape, dtype=bool)
    reach = BOUNDARY_REACH_PX
    edge[:reach, :] = edge[-reach:, :] = edge[:, :reach] = edge[:, -reach:] = True
    if boundary.any():
        from agent.locate.objects import cross_steps  # ndimage.binary_dilation(boundary, iterations=reach)

        edge |= cross_steps(boundary, reach, erode=False)
    return edge


def is_line_component(mask: np.ndarray, near_edge: np.ndarray | None = None) -> bool:
    """True when one connected component (bool `mask` crop) is a film line: thin everywhere, and spanning the
    film (meets `near_edge`, the film's boundary in the same crop, at two places at least half its length
    apart) or curved and unbranched. Holes are filled first: a plate seen by its edges only is a ring."""
    from skimage.morphology import skeletonize

    mask = fill_holes(mask)
    skeleton = skeletonize(mask)
    length_px = skeleton_length_px(skeleton)
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=bool)  # np.pad(mask, 1)
    padded[1:-1, 1:-1] = mask
    width_px = 2.0 * float(ndimage.distance_transform_edt(padded).max())
    if length_px < MIN_LENGTH_WIDTHS * width_px:
        return False
    if near_edge is not None and _spans(mask, near_edge, length_px):
        return True
    return _curved_and_unbranched(skeleton, length_px)


def skeleton_length_px(skeleton: np.ndarray) -> float:
    """Length (px) of a one-pixel-wide skeleton: its orthogonal links count 1, its diagonal links sqrt(2)
    (a diagonal link that closes a corner of two orthogonal ones does not count)."""
    sk = np.asarray(skeleton, dtype=bool)
    right = sk[:, :-1] & sk[:, 1:]
    down = sk[:-1, :] & sk[1:, :]
    length = float(np.count_nonzero(right) + np.count_nonzero(down))
    for diagonal, corner_a, corner_b in (
        (sk[:-1, :-1] & sk[1:, 1:], sk[:-1, 1:], sk[1:, :-1]),
        (sk[:-1, 1:] & sk[1:, :-1], sk[:-1, :-1], sk[1:, 1:]),
    ):
        length += np.sqrt(2.0) * np.count_nonzero(diagonal & ~corner_a & ~corner_b)
    return max(length, float(np.count_nonzero(sk) > 0))


def _spans(mask: np.ndarray, near_edge: np.ndarray, length_px: float) -> bool:
    """True when `mask` meets `near_edge` in two separate places at least half its length apart."""
    contacts, count = ndimage.label(mask & near_edge, structure=np.ones((3, 3), dtype=bool))
    if count < 2:
        return False
    centres = np.array(ndimage.center_of_mass(contacts > 0, contacts, range(1, count + 1)))
    gaps = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    return float(gaps.max()) >= 0.5 * length_px


def _curved_and_unbranched(skeleton: np.ndarray, length_px: float) -> bool:
    """True for a skeleton with at most two ends and two branch pixels whose chord is below
    `MAX_STRAIGHTNESS` of its length."""
    neighbours = ndimage.convolve(skeleton.astype(np.uint8), np.ones((3, 3), dtype=np.uint8), mode="constant")
    if np.count_nonzero(skeleton & (neighbours == 2)) > 2 or np.count_nonzero(skeleton & (neighbours >= 4)) > 2:
        return False
    rows, cols = np.nonzero(skeleton)
    points = np.column_stack([rows, cols]).astype(np.float64)
    angles = np.linspace(0.0, np.pi, 8, endpoint=False)
    projections = points @ np.stack([np.cos(angles), np.sin(angles)])
    extremes = points[np.unique(np.concatenate([projections.argmin(0), projections.argmax(0)]))]
    chord_px = float(np.max(np.hypot(*(extremes[:, None, :] - extremes[None, :, :]).transpose(2, 0, 1))))
    return chord_px < MAX_STRAIGHTNESS * length_px
