"""The frame's edge and the pixels the preparation fills: a bar the frame cuts to a sliver is masked, and film left a
few sigmas off beside a filled strip (a data bar, a seam, the frame's edge of a montage tile) is not an object.
Both gave false candidates on crystal-free 4096^2 images (`benchmarks/bench_crystal_free.py`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from agent.locate.analysis import LocateSettings, analyse
from agent.locate.cluster import black_pixel_mask, frame_edge_slivers
from agent.locate.objects import find_objects
from agent.locate.preprocess import filled_mask, prepare_image
from agent.locate.seams import find_seams
from agent.locate.targets import find_candidates
from tests.synthetic_images import make_grid_image

SIZE = 1024
GRID = {"bar_pitch_px": 300 * SIZE / 768, "bar_width_px": 70 * SIZE / 768}
CAMERA_OFFSET = 200  # `tests.synthetic_images`: what a bar reads


def _plain_scene(seed: int = 0):  # type: ignore[no-untyped-def]
    return make_grid_image((SIZE, SIZE), seed, n_crystals=0, n_ice=0, n_debris=0, **GRID)  # type: ignore[arg-type]


def test_a_bar_cut_to_a_sliver_by_the_frame_is_masked_and_gives_no_candidate() -> None:
    """A bar crossing the frame's last column or two: averaged into blocks or over 3 x 3 pixels it is not black,
    and unmasked it was a row of dark objects along the frame (4 of 7 crystal-free 4k images of one seed)."""
    image = _plain_scene().image.copy()
    film = ~_plain_scene().bar_mask
    rows = np.flatnonzero(film[:, -3:].all(axis=1))[50:450]  # a run of film rows at the right edge
    image[rows, -1] = CAMERA_OFFSET
    image[rows[len(rows) // 2 :], -2] = CAMERA_OFFSET  # one pixel wide, then two
    assert black_pixel_mask(image)[rows, -1].all()
    settings = LocateSettings()
    analysis = analyse(image, settings)
    candidates = find_candidates(analysis, analysis.suggested_crystal_clusters, settings, image=image)
    assert not [c for c in candidates if c.col_px > SIZE - 12], [(c.row_px, c.col_px) for c in candidates]


def test_frame_edge_slivers_are_long_black_runs_on_the_frame_and_nothing_else() -> None:
    image = np.full((200, 300), 1000.0)
    image[20:120, -1] = 0.0  # a bar sliver along the right edge: 100 px
    image[150:160, 0] = 0.0  # 10 px black on the left edge: too short for a bar
    image[0, 100:102] = 0.0  # 2 px on the top edge
    image[60:100, 150] = 0.0  # a black line inside the frame
    image[5:45, 2] = 0.0  # a black line off the frame by two columns, not touching it
    sliver = frame_edge_slivers(image, level=250.0, depth_px=8)
    assert sliver[20:120, -1].all()
    assert np.count_nonzero(sliver) == 100


def test_a_dark_crystal_touching_the_frame_is_not_a_sliver() -> None:
    """A crystal that transmits half the film's intensity is far above the black level; only black is masked."""
    image = _plain_scene().image.astype(np.float64)
    film_level = float(np.median(image[~_plain_scene().bar_mask]))
    rows = np.flatnonzero((~_plain_scene().bar_mask)[:, :30].all(axis=1))[10:60]
    image[rows, :12] = 0.5 * film_level
    assert not black_pixel_mask(image)[rows, :12].any()


def test_the_filled_mask_is_where_prepare_image_wrote_the_film_level() -> None:
    scene = make_grid_image((SIZE, SIZE), 0, n_crystals=0, tile_seams=True, **GRID)  # type: ignore[arg-type]
    bar = np.asarray(analyse(scene.image, LocateSettings()).bar_mask, dtype=bool)
    seams = find_seams(scene.image, bar)
    assert seams  # the montage's seams are found
    prepared = prepare_image(scene.image, bar, seams=seams)
    filled = filled_mask(bar, seams)
    values = prepared[filled]
    assert np.all(values == values[0])
    assert np.count_nonzero(prepared[~filled] == values[0]) < 0.001 * np.count_nonzero(~filled)
    assert filled[:, seams.columns[-1]].all() and not bar[:, seams.columns[-1]].all()


def test_film_a_little_off_beside_a_filled_strip_is_no_object() -> None:
    """A thin strip of film between a grid bar and a data bar, left 3.5 sigmas dark by the flattening: against
    the film level written over the bars its noise stood out; against the film around it, it does not. A faint
    plate in the same strip is kept."""
    rng = np.random.default_rng(2)
    shape = (200, 600)
    image = 1000.0 + rng.normal(0.0, 10.0, shape)
    sigma = float(ndimage.gaussian_filter(image, 1.0).std())
    filled = np.zeros(shape, dtype=bool)
    filled[:60] = True  # the bar above the strip, set to the film level
    filled[72:120] = True  # the data bar below it
    image[filled] = 1000.0
    image[60:72] -= 3.5 * sigma  # the strip, 12 px high
    image[62:70, 500:516] -= 6.0 * sigma  # a faint plate
    regions = np.zeros(shape, dtype=np.int32)
    regions[55:77] = 1  # the candidate region covers the strip
    film = ~filled & (regions == 0)
    no_bars = np.zeros(shape, dtype=bool)
    table = find_objects(image, film, regions, no_bars, filled=filled)
    assert table is not None
    centres = list(zip(table.row_px, table.col_px, strict=True))
    assert len(centres) == 1 and abs(table.col_px[0] - 507.5) < 3, centres
    # judged against the written level instead, the strip's noise is taken for objects
    blind = find_objects(image, film, regions, no_bars, filled=no_bars)
    assert blind is not None and len(blind.row_px) > 2
