"""Bool masks as packed bits: erosion and dilation by the 3x3 cross, and dilation by a square, on 64 pixels a
word.

A full-size bool mask at 4k is 16 MB, one byte a pixel; each step of an erosion or dilation by shifted ANDs /
ORs reads and writes it several times. Packed 64 pixels to a `uint64` word, a step is the same logic on 2 MB:
the vertical neighbours are the words of the rows above and below, the horizontal ones the word shifted by one
bit with the carry from the neighbouring word. The results equal `objects.cross_steps` and `preprocess.grow_mask`
pixel for pixel.
"""

from __future__ import annotations

import numpy as np

#: Masks of at least this many pixels are worth packing (packing and unpacking cost ~1 ms per 16 MB; per-object
#: crops of a few hundred pixels are faster as plain bools).
PACKED_MIN_PX = 1 << 16

_ONE, _TOP = np.uint64(1), np.uint64(63)


def pack_rows(mask: np.ndarray) -> np.ndarray:
    """(rows, ceil(cols / 64)) uint64 of the bool `mask` (rows, cols): pixel c of a row is bit c % 64 of word
    c // 64; the bits past the last column are 0."""
    rows, cols = mask.shape
    words = -(-cols // 64)
    if words * 64 != cols:
        padded = np.zeros((rows, words * 64), dtype=bool)
        padded[:, :cols] = mask
        mask = padded
    return np.packbits(np.ascontiguousarray(mask, dtype=bool), axis=1, bitorder="little").view(np.uint64)


def unpack_rows(packed: np.ndarray, cols: int) -> np.ndarray:
    """The bool mask (rows, `cols`) of `pack_rows`' words `packed`."""
    return np.unpackbits(packed.view(np.uint8), axis=1, count=cols, bitorder="little").view(bool)


def _last_word_bits(cols: int) -> np.uint64:
    """The bits of a row's last word that hold pixels of a row of `cols` columns."""
    used = cols - (-(-cols // 64) - 1) * 64
    return np.uint64((1 << used) - 1) if used < 64 else np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _horizontal(
    current: np.ndarray, out: np.ndarray, carry: np.ndarray, toward_left: bool, shift_px: int = 1
) -> np.ndarray:
    """`out` = each pixel's neighbour `shift_px` (1..63) to the right (`toward_left`: pixel c takes pixel
    c + shift_px) or to the left (pixel c takes c - shift_px), outside the row counting as False (0)."""
    near, far = np.uint64(shift_px), np.uint64(64 - shift_px)
    if toward_left:
        np.right_shift(current, near, out=out)
        np.left_shift(current[:, 1:], far, out=carry[:, :-1])
        carry[:, -1] = 0
    else:
        np.left_shift(current, near, out=out)
        np.right_shift(current[:, :-1], far, out=carry[:, 1:])
        carry[:, 0] = 0
    out |= carry
    return out


def packed_square_dilation(mask: np.ndarray, size_px: int) -> np.ndarray:
    """`mask` (bool) dilated by a `size_px` x `size_px` square (odd side, at most 127; at the border, the
    square's part inside the image): `ndimage.maximum_filter(mask, size_px) > 0`, computed on packed bits."""
    if size_px % 2 == 0 or not 1 <= size_px <= 127:
        raise ValueError(f"size_px must be odd and 1..127, got {size_px}")
    mask = np.asarray(mask, dtype=bool)
    rows, cols = mask.shape
    reach = size_px // 2
    if rows == 0 or cols == 0 or reach == 0:
        return mask.copy()
    current = pack_rows(mask)
    tall = current.copy()
    for shift in range(1, min(reach, rows - 1) + 1):
        tall[shift:] |= current[:-shift]
        tall[:-shift] |= current[shift:]
    grown = tall.copy()
    side, carry = np.empty_like(tall), np.empty_like(tall)
    for shift in range(1, reach + 1):
        grown |= _horizontal(tall, side, carry, toward_left=True, shift_px=shift)
        grown |= _horizontal(tall, side, carry, toward_left=False, shift_px=shift)
    grown[:, -1] &= _last_word_bits(cols)
    return unpack_rows(grown, cols)


def packed_cross_steps(mask: np.ndarray, iterations: int, erode: bool) -> np.ndarray:
    """`mask` (bool) eroded (`erode`) or dilated `iterations` times by the 3x3 cross, outside the image counting
    as False: the same mask as `objects.cross_steps` (`ndimage.binary_erosion` / `binary_dilation(mask,
    iterations=...)` with the default structure), computed on packed bits."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = mask.shape
    if rows == 0 or cols == 0 or iterations <= 0:
        return mask.copy()
    current = pack_rows(mask)
    last_bits = _last_word_bits(cols)
    combine = np.bitwise_and if erode else np.bitwise_or
    side, carry = np.empty_like(current), np.empty_like(current)
    for _ in range(iterations):
        out = current.copy()
        combine(out, _horizontal(current, side, carry, toward_left=True), out=out)
        combine(out, _horizontal(current, side, carry, toward_left=False), out=out)
        combine(out[1:], current[:-1], out=out[1:])
        combine(out[:-1], current[1:], out=out[:-1])
        if erode:  # the rows above the first and below the last are outside: False
            out[0] = 0
            out[-1] = 0
        out[:, -1] &= last_bits  # the padding bits stay 0
        current = out
    return unpack_rows(current, cols)


def block_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """(ceil(rows / factor), ceil(cols / factor)) bool: True where any pixel of the `factor` x `factor` block of
    `mask` is True (blocks past the edge padded with False), as `padded.reshape(r, f, c, f).any(axis=(1, 3))`
    but the rows of a block ORed first (whole rows at a time) and, for factors of 2, 4 and 8, each block's row
    of bools read as one 2-, 4- or 8-byte word."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = mask.shape
    out_rows, out_cols = -(-rows // factor), -(-cols // factor)
    tall = np.zeros((out_rows, out_cols * factor), dtype=bool)
    for offset in range(factor):
        part = mask[offset::factor]
        tall[: part.shape[0], :cols] |= part
    word = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(factor)
    if word is not None:
        return tall.view(word) != 0
    return tall.reshape(out_rows, out_cols, factor).any(axis=2)


def distance_to_true_px(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Euclidean distance (px, float64) from the pixels (`rows`, `cols`: int arrays inside `mask`) to the nearest
    True pixel of the bool `mask` (which must hold one): `ndimage.distance_transform_edt(~mask)[rows, cols]`,
    the same values, without the transform of the whole mask.

    The nearest True pixel of a False pixel has a False 4-neighbour (its neighbour towards the pixel is nearer),
    so only the mask's edge pixels are searched (a k-d tree of their integer coordinates: the squared distances
    are exact, and the square root is the transform's)."""
    from scipy.spatial import cKDTree

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    distance = np.zeros(rows.shape, dtype=np.float64)
    outside = ~mask[rows, cols]
    if outside.any():
        edge = mask & ~packed_cross_steps(mask, 1, erode=True)
        tree = cKDTree(np.argwhere(edge).astype(np.float64))
        distance[outside] = tree.query(np.column_stack([rows[outside], cols[outside]]).astype(np.float64))[0]
    return distance
