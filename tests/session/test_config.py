"""Screening plans load from TOML, YAML and JSON, are frozen, and bad plans say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import PlanError, ScreeningPlan, load_plan


def test_plans_load_from_toml_yaml_and_json_and_round_trip(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        'specimen = "asbestos-fibres"\n[area]\nsquares = 2\n[targeting]\nmax_targets = 7\n'
    )
    (tmp_path / "p.yaml").write_text("specimen: asbestos-fibres\narea:\n  squares: 2\ntargeting:\n  max_targets: 7\n")
    plans = [load_plan(tmp_path / "p.toml"), load_plan(tmp_path / "p.yaml")]
    assert plans[0] == plans[1]
    assert plans[0].area.squares == 2 and plans[0].targeting.max_targets == 7
    saved = plans[0].save(tmp_path / "plan.json")
    assert load_plan(saved) == plans[0]


def test_plans_are_frozen() -> None:
    plan = ScreeningPlan()
    with pytest.raises(ValueError):
        plan.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[targeting]\nmax_targets = -1\n", r"targeting\.max_targets"),
        ("[area]\nbox_um = [10, 0, 0, 10]\n", "min < max"),
        ("unknown_field = 1\n", "unknown_field"),
        ("this is not toml", "cannot parse"),
    ],
)
def test_bad_plans_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        load_plan(path)


def test_missing_and_unsupported_plan_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "missing.toml")
    (tmp_path / "plan.ini").write_text("x")
    with pytest.raises(PlanError, match=r"toml, \.yaml or \.json"):
        load_plan(tmp_path / "plan.ini")
