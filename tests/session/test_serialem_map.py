"""Starting a session from SerialEM's own grid map (issue 23, item 3): `screen --atlas GRIDMAP.mrc.mdoc --nav grid.nav`.

The map is made the way a lab would have it: a montage acquired on the simulated microscope (the same specimen
and seed as the sessions) at the atlas preset, written with `write_serialem_montage`, and a navigator with a
montage map item whose `MapScaleMat` comes from the instrument's true pixel -> stage matrix. Two full sessions
(one uninterrupted, one killed after its first outcome and resumed), camera 512 px, 3 targets; the rest reads
files only.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from agent.session.journal import read_journal
from agent.steps.atlas import acquire_montage, plan_tiles
from agent.steps.serialem_map import SerialemMapError, load_serialem_map
from drivers.formats.montage import fit_stage_transform, montage_from_arrays, write_serialem_montage
from drivers.formats.nav import NavItem, format_nav, map_item_from_transform, point_item, read_nav, write_nav
from simulator.microscope import SimulatedMicroscope

CAMERA_PX = 512
SPECIMEN, SEED = "protein-plates", 0
MAP_ID = 7


@dataclass(frozen=True)
class GridMap:
    """The lab's files (`mdoc`, `nav`, and the montage's stack beside the mdoc), the map item written and the
    instrument's true atlas matrix (um/px) and ground truth."""

    folder: Path
    mdoc: Path
    nav: Path
    item: NavItem
    matrix_um_per_px: np.ndarray
    microscope: SimulatedMicroscope


@pytest.fixture(scope="module")
def grid_map(
    tmp_path_factory: pytest.TempPathFactory, simulated_microscope: Callable[..., SimulatedMicroscope]
) -> GridMap:
    """A 2 x 2 montage about the stage centre at the atlas preset, and a navigator: a point, the montage's map
    item (MapID 7, stage registration 1, a Windows path as SerialEM writes it) and a single-image map of
    another file."""
    folder = tmp_path_factory.mktemp("serialem")
    microscope = simulated_microscope(SPECIMEN, SEED, CAMERA_PX)
    matrix = microscope.true_image_to_stage_matrix("atlas")
    positions = plan_tiles((-120.0, 120.0, -120.0, 120.0), matrix, (CAMERA_PX, CAMERA_PX), 0.1)
    frames = acquire_montage(microscope, positions, preset="atlas", exposure_s=0.5, approach_um=5.0)
    stages = np.array([(f.metadata.stage.x_um, f.metadata.stage.y_um) for f in frames])
    offsets = np.rint((stages - stages[0]) @ np.linalg.inv(matrix).T).astype(int)  # (col, row) of each piece
    offsets -= offsets.min(axis=0)
    montage = montage_from_arrays(
        [f.image for f in frames], [(int(o[1]), int(o[0])) for o in offsets], 0.3, [tuple(s) for s in stages]
    )
    mdoc = write_serialem_montage(montage, folder / "grid.mrc")
    fit = fit_stage_transform(montage)
    assert fit is not None
    item = map_item_from_transform("grid-map", "D:\\maps\\grid.mrc", MAP_ID, montage.shape_px, fit.stage_xy_um, matrix)
    other = map_item_from_transform(
        "view", "D:\\maps\\view.mrc", 8, (512, 512), (300.0, 0.0), matrix, map_montage=False
    )
    nav = write_nav(folder / "grid.nav", [point_item("1", 10.0, 20.0), item, other])
    return GridMap(folder, mdoc, nav, item, matrix, microscope)


def _nav_with(
    grid_map: GridMap, name: str, items: list[NavItem], drop_key: str | None = None, header: str = ""
) -> Path:
    """A navigator of `items` in the map's folder; `drop_key` removed from the map item's section, `header` lines
    added after the version line."""
    text = format_nav(items)
    if header:
        text = text.replace("\n", f"\n{header}\n", 1)
    if drop_key is not None:
        head, _, rest = text.partition(f"[Item = {grid_map.item.label}]")
        rest = "\n".join(line for line in rest.split("\n") if not line.startswith(f"{drop_key} ="))
        text = f"{head}[Item = {grid_map.item.label}]{rest}"
    path = grid_map.folder / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# The loader (files only)
# --------------------------------------------------------------------------------------------------


def test_the_map_item_places_the_map_pixels_where_the_instrument_saw_them(grid_map: GridMap) -> None:
    loaded = load_serialem_map(grid_map.mdoc, grid_map.nav)  # the navigator's only montage map of grid.mrc
    assert loaded.map_id == MAP_ID and loaded.binning == 1 and loaded.orientation == "stored"
    assert loaded.atlas.image.dtype == np.uint16 and loaded.atlas.image.shape == grid_map.item.map_width_height[::-1]
    np.testing.assert_allclose(loaded.atlas.matrix_um_per_px, grid_map.matrix_um_per_px, rtol=1e-8)
    assert loaded.n_pieces == 4 and loaded.misfit_max_um < 0.5  # pieces placed to the pixel (0.3 um)
    by_stack = load_serialem_map(grid_map.folder / "grid.mrc", grid_map.nav, MAP_ID)  # the .mrc names its .mdoc
    np.testing.assert_array_equal(by_stack.atlas.image, loaded.atlas.image)
    # every piece's recorded stage position, mapped back, falls on that piece's centre
    for stage_xy in loaded.atlas.tile_stage_xy_um:
        col, row = loaded.atlas.stage_to_pixel(np.array(stage_xy))
        assert 0 <= col < loaded.atlas.image.shape[1] and 0 <= row < loaded.atlas.image.shape[0]


def test_serialem_display_rows_and_a_binned_map_give_the_same_stage_positions(grid_map: GridMap) -> None:
    """SerialEM's MapScaleMat counts Y down its display (the stored rows inverted); a map binned by 2 has half
    the pixels at twice the size. Both are read to the same pixel -> stage map as the plain one."""
    plain = load_serialem_map(grid_map.mdoc, grid_map.nav).atlas
    scale = np.asarray(grid_map.item.map_scale_mat).reshape(2, 2)
    display = replace(grid_map.item, map_scale_mat=tuple(float(v) for v in (np.diag([1.0, -1.0]) @ scale).ravel()))
    flipped = load_serialem_map(grid_map.mdoc, _nav_with(grid_map, "display.nav", [display]), MAP_ID)
    assert flipped.orientation == "display"
    rows, cols = plain.image.shape
    probe = np.array([[10.0, 20.0], [cols - 30.0, rows / 2], [cols / 3, rows - 5.0]])
    np.testing.assert_allclose(flipped.atlas.pixel_to_stage_um(probe), plain.pixel_to_stage_um(probe), atol=1e-6)

    width, height = grid_map.item.map_width_height  # type: ignore[misc]
    binned_item = replace(
        grid_map.item, map_width_height=(width // 2, height // 2), map_scale_mat=tuple(v / 2 for v in scale.ravel())
    )
    binned = load_serialem_map(grid_map.mdoc, _nav_with(grid_map, "binned.nav", [binned_item]), MAP_ID)
    assert binned.binning == 2 and binned.atlas.image.shape == (height // 2, width // 2)
    assert binned.atlas.pixel_size_um == pytest.approx(2 * plain.pixel_size_um)
    # the same stage positions to within half a binned pixel (973 montage columns make 486 map columns)
    np.testing.assert_allclose(
        binned.atlas.pixel_to_stage_um((probe + 0.5) / 2 - 0.5),
        plain.pixel_to_stage_um(probe),
        atol=0.5 * binned.atlas.pixel_size_um,
    )


@pytest.fixture(scope="module")
def mismatched_mdoc(grid_map: GridMap) -> Path:
    """`mismatch/grid.mrc.mdoc`: the .mdoc of a 3-piece montage beside a copy of the map's 4-image stack."""
    folder = grid_map.folder / "mismatch"
    folder.mkdir()
    (folder / "grid.mrc").write_bytes((grid_map.folder / "grid.mrc").read_bytes())
    pieces = [np.full((64, 64), 100 * (i + 1), dtype=np.uint16) for i in range(3)]
    small = montage_from_arrays(pieces, [(0, 0), (0, 60), (60, 0)], 0.3, [(0.0, 0.0), (18.0, 0.0), (0.0, 18.0)])
    other = write_serialem_montage(small, folder / "other.mrc")
    target = folder / "grid.mrc.mdoc"
    other.replace(target)
    return target


def test_bad_maps_are_refused_with_the_reason(grid_map: GridMap, mismatched_mdoc: Path) -> None:
    items = [point_item("1", 10.0, 20.0), grid_map.item]
    moved = replace(grid_map.item, stage_xyz_um=(grid_map.item.stage_xyz_um[0] + 40.0, *grid_map.item.stage_xyz_um[1:]))
    cases = {
        "no stage registration": (grid_map.mdoc, _nav_with(grid_map, "noregis.nav", items, drop_key="Regis"), MAP_ID),
        "no MapScaleMat": (grid_map.mdoc, _nav_with(grid_map, "noscale.nav", items, drop_key="MapScaleMat"), MAP_ID),
        "no map item with MapID 99": (grid_map.mdoc, grid_map.nav, 99),
        "shows view.mrc, not this montage grid.mrc": (grid_map.mdoc, grid_map.nav, 8),
        "describes 3 images but grid.mrc holds 4": (mismatched_mdoc, grid_map.nav, MAP_ID),
        "current registration is 2": (
            grid_map.mdoc,
            _nav_with(grid_map, "reg2.nav", items, header="CurrentRegistration = 2"),
            MAP_ID,
        ),
        "40.0 um from where the map's MapScaleMat puts it": (
            grid_map.mdoc,
            _nav_with(grid_map, "moved.nav", [moved]),
            MAP_ID,
        ),
    }
    for reason, (mdoc, nav, map_id) in cases.items():
        with pytest.raises(SerialemMapError) as caught:
            load_serialem_map(mdoc, nav, map_id)
        assert reason in str(caught.value), (reason, str(caught.value))


@pytest.mark.parametrize("case", ["no-registration", "other-stack", "unknown-map-id"])
def test_the_screen_command_refuses_a_bad_map_in_one_line_and_writes_nothing(
    case: str, grid_map: GridMap, mismatched_mdoc: Path, tmp_path: Path
) -> None:
    mdoc, nav, extra = grid_map.mdoc, grid_map.nav, ["--map-id", str(MAP_ID)]
    if case == "no-registration":
        nav = _nav_with(grid_map, "cli-noregis.nav", [grid_map.item], drop_key="Regis")
    elif case == "other-stack":
        mdoc = mismatched_mdoc
    else:
        extra = ["--map-id", "99"]
    out = tmp_path / "session"
    before = nav.read_bytes()
    result = subprocess.run(
        [*_screen(out), "--atlas", str(mdoc), "--nav", str(nav), *extra], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crystal-locator: error: --atlas refused: "), result.stderr
    reason = {"no-registration": "no stage registration", "other-stack": "describes 3 images", "unknown-map-id": "99"}
    assert reason[case] in lines[0]
    assert not out.exists() and nav.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Sessions (two)
# --------------------------------------------------------------------------------------------------


def _screen(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "agent.cli", "screen", "--simulated", "--specimen", SPECIMEN, "--seed", str(SEED),
        "--camera-px", str(CAMERA_PX), "--max-targets", "3", "--no-labels", "--out", str(out),
    ]  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_targets_on_map(out: Path, grid_map: GridMap) -> list[dict]:
    """targets_on_map.nav: the operator's navigator unchanged, then one point per target drawn on the map, Acquire
    = 1 exactly for the diffracting ones; returns the targets table."""
    rows = json.loads((out / "targets.json").read_text())["targets"]
    original = read_nav(grid_map.nav)
    written = read_nav(out / "targets_on_map.nav")
    assert (out / "targets_on_map.nav").read_bytes().startswith(grid_map.nav.read_bytes())
    assert written[: len(original)] == original
    points = written[len(original) :]
    assert [p.label for p in points] == [f"CL-{row['target_id']}" for row in rows]
    for point, row in zip(points, rows, strict=True):
        assert point.kind == "point" and point.drawn_id == MAP_ID and point.regis == grid_map.item.regis
        assert point.acquire == (row["outcome"] == "recorded")
        assert (point.stage_xyz_um[0], point.stage_xyz_um[1]) == pytest.approx((row["x_um"], row["y_um"]), abs=1e-3)
        assert row["outcome"] in point.note
    return rows


@pytest.mark.timeout(600)
def test_a_session_screens_the_serialem_map_without_mapping(grid_map: GridMap, tmp_path: Path) -> None:
    out = tmp_path / "session"
    nav_digest = _digest(grid_map.nav)
    result = subprocess.run(
        [*_screen(out), "--atlas", str(grid_map.mdoc), "--nav", str(grid_map.nav), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["state"] == "done" and summary["targets_visited"] == 3 and summary["rounds"] == 1

    entries = read_journal(out / "journal.jsonl")
    # no overview, no atlas montage: only the search preset is calibrated, the mapping step costs no microscope time
    assert {e["preset"] for e in entries if e["type"] == "calibration_check"} == {"search"}
    assert not any(e["type"] == "artifact" and e["kind"] == "overview" for e in entries)
    mapping = [e for e in entries if e["type"] == "mapping"]
    assert [e["event"] for e in mapping] == ["plan", "done"]
    assert mapping[1]["microscope_time_s"] == mapping[0]["microscope_time_s"]
    assert summary["fixed_time_s"]["mapping"] == 0.0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["area"]["serialem_map"] == {
        "mdoc_path": str(grid_map.mdoc.resolve()), "nav_path": str(grid_map.nav.resolve()), "map_id": MAP_ID
    }  # fmt: skip

    rows = _check_targets_on_map(out, grid_map)
    truth = grid_map.microscope.ground_truth
    assert truth is not None
    on_crystal = [
        int(truth.crystal_id_xy(np.array([r["planned_x_um"]]), np.array([r["planned_y_um"]]), 1.0)[0]) >= 0
        for r in rows
    ]
    assert sum(on_crystal) >= 2, rows  # planned from the map's pixels alone, through the map item's transform
    assert all(hit for hit, r in zip(on_crystal, rows, strict=True) if r["outcome"] == "recorded")
    assert _digest(grid_map.nav) == nav_digest, "the operator's navigator was changed"


@pytest.mark.timeout(600)
def test_a_session_on_a_serialem_map_resumes_after_a_kill(grid_map: GridMap, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    nav_digest = _digest(grid_map.nav)
    command = [*_screen(out), "--atlas", str(grid_map.mdoc), "--nav", str(grid_map.nav)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if any(e["type"] == "target" for e in read_journal(out / "journal.jsonl")):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=60)
    finished_before = {e["target_id"] for e in read_journal(out / "journal.jsonl") if e["type"] == "target"}
    assert 0 < len(finished_before) < 3, "the session was not killed between its first and last outcome"

    resume = [sys.executable, "-m", "agent.cli", "screen", "--resume", str(out), "--no-labels"]
    refused = subprocess.run([*resume, "--atlas", str(grid_map.mdoc)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "keeps the session's SerialEM map" in refused.stderr
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    entries = read_journal(out / "journal.jsonl")
    visits = [e["target_id"] for e in entries if e["type"] == "target"]
    assert len(visits) == len(set(visits)) == 3 and finished_before <= set(visits)
    assert [e["event"] for e in entries if e["type"] == "mapping"] == ["plan", "done"]  # the map was not loaded again
    rows = _check_targets_on_map(out, grid_map)
    assert all(r["outcome"] != "pending" for r in rows)
    assert _digest(grid_map.nav) == nav_digest
