"""Montage seams: straight steps in brightness along a pixel row or column, where tiles that were exposed apart
meet in a stitched image.

Tiles of a montage are exposed one by one; each has its own gain, dose and illumination, and where two meet
the image steps by a few per cent along a line exactly parallel to the image axes. Flattened as one image,
the step leaves a band of film darker than the rest on one side, and the locator read that band as a row of
objects (48 candidates on a crystal-free 2x2 montage). `find_seams` finds the steps; `tile_labels` cuts the
image into the tiles they bound, so that `preprocess.flatten_illumination` flattens every tile on its own;
`seam_band` is the strip along each seam that no object may come from (a crystal cut by a seam is seen half
in one exposure and half in another).

How a seam is found, for columns (rows likewise): the step between neighbouring columns is the difference of
log intensities (a gain step is a ratio) of unmasked pixel pairs, sampled every `SAMPLE_STRIDE`-th line and
averaged (trimmed) in blocks of `BLOCK_LINES` lines along the seam; steps over `MAX_STEP_LOG` are edges, not
gain. A column boundary is a seam where at least `MIN_BLOCK_FRACTION` of the blocks (and half of those with
unmasked pixels) step the same way by more than `MIN_STEP_LOG` (2 %: a smaller step does not lift film above
the locator's contrast threshold) and by more than `MIN_STEP_SIGMAS` robust spreads of all blocks, and where
the step lasts: a readout stripe's is undone a few lines on, so the step between the means of `LASTING_LINES`
lines on either side (the steps weighted by a triangle) must be at least half the line's own. Of seams closer
than `LASTING_LINES` the strongest is kept.

On integer images a seam must also step by two grey levels of the film (an 8-bit export of dim film steps by
a few % from one level to the next).

Measured on the synthetic images of `tests.synthetic_images` (1024^2 and 2048^2, three seeds, eleven conditions):
the 2x2 seams are found in bright field, 16- and 8-bit; no seam is found on images without one (bright columns,
8-bit, dark field, mottle, holes, axis-parallel bars). Missed: the middle seams of 8-bit dark-field montages,
whose 7-8 % step is less than two grey levels of their dim film.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.locate.parallel import run_pair

#: Lines (rows for a column seam) per block whose (trimmed mean) step is tested.
BLOCK_LINES = 32
#: Smallest step in ln(intensity) across a seam (2 %).
MIN_STEP_LOG = 0.02
#: Largest step in ln(intensity) taken for a seam (40 %: tiles of one montage are not exposed that differently).
MAX_STEP_LOG = 0.34
#: A block's step must exceed this many robust spreads of the steps of all blocks.
MIN_STEP_SIGMAS = 6.0
#: Share of the blocks along a line that must step the same way for a seam (at least 4 blocks; and at least half
#: of the blocks with unmasked pixels on the line must step).
MIN_BLOCK_FRACTION = 0.15
#: Lines on either side whose means are compared: a step must last this long to be a seam.
LASTING_LINES = 32
#: Every this-many-th line of a block is sampled.
SAMPLE_STRIDE = 4
#: Fewest unmasked pixel pairs among a block's sampled lines for its step to count.
MIN_PAIRS_PER_BLOCK = 4


@dataclass(frozen=True)
class Seams:
    """Seams of one image: `columns` are the column indices c where a seam runs between columns c - 1 and c,
    `rows` likewise between rows r - 1 and r; `shape` is the image's (rows, cols)."""

    shape: tuple[int, int]
    columns: tuple[int, ...] = ()
    rows: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.columns or self.rows)


def find_seams(image: np.ndarray, mask: np.ndarray) -> Seams:
    """The montage seams of a 2-D `image` (any real dtype), pixels of `mask` (bars, black areas, data bars)
    left out; see the module docstring."""
    data = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    min_step = MIN_STEP_LOG
    film = data[::8, ::8][~mask[::8, ::8]]  # a sample of the film (every 8th pixel of every 8th row)
    if np.issubdtype(data.dtype, np.integer) and film.size:
        # whole grey levels: an 8-bit export of dim film steps by a few % from one level to the next, and the
        # block means of such steps are not a seam; a seam must step by at least two levels of the film
        min_step = max(min_step, 2.0 * float(np.log1p(1.0 / max(float(np.median(film)), 1.0))))
    def log_of(lines: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(lines.astype(np.float32), 1.0))

    # only every SAMPLE_STRIDE-th line along a seam is read: the log of two quarter-size copies, not the image
    stride = SAMPLE_STRIDE
    any_order = bool(np.issubdtype(data.dtype, np.integer))
    # the columns' search on a second thread beside the rows' (numpy work on separate copies)
    columns, rows = run_pair(
        lambda: _seam_lines(log_of(data[::stride]), mask[::stride], min_step, any_order),
        lambda: _seam_lines(log_of(data[:, ::stride].T), mask[:, ::stride].T, min_step, any_order),
    )
    return Seams(shape=(int(data.shape[0]), int(data.shape[1])), columns=columns, rows=rows)


def _seam_lines(log: np.ndarray, mask: np.ndarray, min_step: float, any_order: bool = False) -> tuple[int, ...]:
    """Column boundaries c (between c - 1 and c) of `log` that step by at least `min_step` (ln units) and are
    seams (see the module docstring). `log` and `mask` hold every `SAMPLE_STRIDE`-th row of the image: a seam
    runs the whole block, so the block's step needs only a few lines. `any_order`: see `_block_steps`."""
    per_block = BLOCK_LINES // SAMPLE_STRIDE
    n_blocks = log.shape[0] // per_block
    cols = log.shape[1]
    if n_blocks < 4 or cols < 8:
        return ()
    block_steps = _block_steps(log, mask, n_blocks, per_block, any_order)
    # steps of more than `MAX_STEP_LOG` are edges of objects or of the bars' blurred rims, never a gain step
    known = np.nan_to_num(block_steps, nan=0.0)
    known[np.abs(known) > MAX_STEP_LOG] = 0.0
    finite = known[np.isfinite(block_steps)]
    if finite.size < 16:
        return ()
    spread = 1.4826 * float(np.median(np.abs(finite - np.median(finite))))
    limit = max(min_step, MIN_STEP_SIGMAS * spread)
    up, down = (known > limit).sum(axis=0), (known < -limit).sum(axis=0)
    n_valid = np.isfinite(block_steps).sum(axis=0)
    least = max(4, int(np.ceil(MIN_BLOCK_FRACTION * n_blocks)))
    stepping = (np.maximum(up, down) >= least) & (up + down >= 0.5 * n_valid)
    # a seam's step lasts; a readout stripe steps up and back down within a few lines (and
    # `preprocess.remove_stripes` corrects it): the step between the means of `LASTING_LINES` lines on either
    # side (the steps weighted by a triangle) keeps a seam's whole and undoes most of a stripe's; a line whose
    # own step is mostly undone that way is a stripe's edge, however strong
    offsets = np.arange(-(LASTING_LINES - 1), LASTING_LINES)
    triangle = (LASTING_LINES - np.abs(offsets)) / LASTING_LINES
    lasting = ndimage.convolve1d(known, triangle, axis=1, mode="constant")
    lasts = np.abs(lasting.sum(axis=0)) >= 0.5 * np.abs(known.sum(axis=0))
    # of neighbouring seam lines (a blurred step) keep the one that steps most
    strength = np.where(stepping & lasts, np.abs(known).sum(axis=0), 0.0)
    peak = ndimage.maximum_filter1d(strength, 2 * LASTING_LINES - 1, mode="constant")
    return tuple(int(c) + 1 for c in np.flatnonzero((strength > 0) & (strength >= peak)))


def _block_steps(log: np.ndarray, mask: np.ndarray, n_blocks: int, per_block: int, any_order: bool) -> np.ndarray:
    """(n_blocks, cols - 1) float64: the trimmed mean (lowest and highest dropped) of the steps between
    neighbouring columns of `log` over the unmasked pixel pairs of each block of `per_block` rows; NaN for a
    block with fewer than `MIN_PAIRS_PER_BLOCK` pairs. The trimmed mean is as robust to a crystal's edge as the
    median, and not stuck on the grey levels of an 8-bit export, whose single-level steps a median returns.

    The steps are summed in ascending order. `any_order` (the log of an integer image: every log is 0 or at least
    ln 2, a float32 multiple of 2**-24 below 64) makes the order immaterial -- the steps are multiples of 2**-24
    below 64 and any sum of eight is exact in float64 -- so the steps are not sorted: the lowest and highest are
    a minimum and a maximum (the same sums, 3x faster)."""
    cols = log.shape[1]
    sampled = slice(0, n_blocks * per_block)
    step = np.diff(log[sampled], axis=1)
    valid = ~(mask[sampled, 1:] | mask[sampled, :-1])
    counts = valid.reshape(n_blocks, per_block, cols - 1).sum(axis=1)
    if any_order:
        step[~valid] = 0.0
        blocks = step.reshape(n_blocks, per_block, cols - 1)
        finite_sum = blocks.sum(axis=1, dtype=np.float64)
        step[~valid] = np.inf
        lowest = blocks.min(axis=1)
        step[~valid] = -np.inf
        highest = blocks.max(axis=1)  # -inf without pairs (the block is NaN then)
    else:
        step[~valid] = np.inf  # sorted last
        ordered = np.sort(step.reshape(n_blocks, per_block, cols - 1), axis=1)
        finite_sum = np.where(np.isfinite(ordered), ordered, 0.0).sum(axis=1, dtype=np.float64)
        lowest = ordered[:, 0, :]
        highest = np.take_along_axis(ordered, np.maximum(counts - 1, 0)[:, None, :], axis=1)[:, 0, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        block_steps = (finite_sum - lowest - highest) / (counts - 2)
    block_steps[counts < MIN_PAIRS_PER_BLOCK] = np.nan
    return block_steps


def tile_labels(seams: Seams, block_px: int = 1) -> np.ndarray:
    """Int32 labels of the tiles the seams bound: tile k + 1 for the k-th rectangle in row-major order. Every
    seam is taken to cross the whole image (montage tiles are laid out on a grid). Per pixel (`block_px` 1,
    `seams.shape`), or per `block_px` x `block_px` block (blocks as `preprocess.block_mean`: edges that do not
    fill a block are cropped), the tile of the block's centre pixel."""
    rows, cols = seams.shape
    centre = block_px // 2
    row_px = np.arange(centre, (rows // block_px) * block_px, block_px)
    col_px = np.arange(centre, (cols // block_px) * block_px, block_px)
    row_tile = np.searchsorted(np.asarray(seams.rows, dtype=np.int64), row_px, side="right")
    col_tile = np.searchsorted(np.asarray(seams.columns, dtype=np.int64), col_px, side="right")
    n_cols = len(seams.columns) + 1
    return (row_tile[:, None] * n_cols + col_tile[None, :] + 1).astype(np.int32)


def seam_band(seams: Seams, half_width_px: int) -> np.ndarray:
    """Bool mask (`seams.shape`) of the strips within `half_width_px` of every seam, and of every tile
    narrower than 2 * `half_width_px` + 1 (a sliver between the frame and a seam)."""
    rows, cols = seams.shape
    band = np.zeros((rows, cols), dtype=bool)
    for axis, lines, length in ((1, seams.columns, cols), (0, seams.rows, rows)):
        edges = [0, *lines, length]
        for line in lines:
            lo, hi = max(0, line - half_width_px), min(length, line + half_width_px)
            (band[:, lo:hi] if axis == 1 else band[lo:hi, :])[...] = True
        for lo, hi in itertools.pairwise(edges):
            if hi - lo <= 2 * half_width_px:
                (band[:, lo:hi] if axis == 1 else band[lo:hi, :])[...] = True
    return band

