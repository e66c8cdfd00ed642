"""The session benchmark's own helpers (benchmarks/bench_session.py): mapped area, truth lookup, means."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_session

from simulator import create_simulated_microscope


def test_mapped_boxes_are_the_done_mapping_records_once_each() -> None:
    journal = [
        {"type": "mapping", "event": "plan", "box_um": [0, 1, 0, 1]},
        {"type": "mapping", "event": "done", "box_um": [0, 10, 0, 10]},
        {"type": "mapping", "event": "done", "box_um": [0, 10, 0, 10]},  # a resumed session maps it again
        {"type": "mapping", "event": "done", "box_um": [20, 30, 0, 10]},
    ]
    assert bench_session.mapped_boxes(journal) == [(0, 10, 0, 10), (20, 30, 0, 10)]


def test_crystal_at_finds_the_crystal_aimed_at_and_nothing_on_film() -> None:
    truth = create_simulated_microscope("graphite-flakes", seed=1, camera_shape_px=(256, 256)).ground_truth
    crystal_at = bench_session.crystal_at_function(truth)
    crystals = truth.crystal_truth()[:20]
    assert all(crystal_at(c.x_um, c.y_um) == c.id for c in crystals)
    assert crystal_at(5000.0, 5000.0) == -1  # off the grid


def test_means_give_inf_when_only_the_baseline_found_nothing() -> None:
    rows = [
        {"specimen": "a", "seed": 0, "agent_diffracting_per_hour": 30.0, "naive_diffracting_per_hour": 0.0,
         "oracle_diffracting_per_hour": 60.0},
        {"specimen": "a", "seed": 1, "agent_diffracting_per_hour": 10.0, "naive_diffracting_per_hour": 0.0,
         "oracle_diffracting_per_hour": 20.0},
    ]
    means = bench_session.specimen_means(rows, ["a"])["a"]
    assert means["agent_diffracting_per_hour"] == pytest.approx(20.0)
    assert math.isinf(means["ratio_naive"]) and means["ratio_oracle"] == pytest.approx(0.5)
