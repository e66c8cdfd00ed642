"""The plan of a multi-grid run: which cassette slots, how much of the budget each grid gets.

A run has one microscope-time budget (the screening plan's `time_budget_s`, default one hour; a cassette is
usually given several). It is spent in two passes:

1. **atlas pass**: every slot is loaded in turn and gets a short session: the grid overview and `atlas_squares`
   grid squares mapped, located, labelled, their targets planned, and the best `probe_targets` visited
   (`targeting.visit_limit`), so that the ranking rests on diffraction measured on the grid;
2. **screening**: the grids are ranked (`agent.grids.assess`) and the best are loaded again and screened, each
   with `grid_budget_s` of the budget left (the last one with what remains, when that is at least
   `min_grid_budget_s`), until the budget is spent or no grid worth screening is left. A grid whose visits
   diffract much less than its probes promised is left for the next after `switch_after_visits` visits
   (`agent.grids.yield_guard`).

Times are microscope seconds.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")

#: Screening budget of one grid when the plan does not say (s): 40 minutes maps several rounds of squares and
#: visits their targets; with a two-hour run over a few grids it leaves room for the atlas pass and two grids.
DEFAULT_GRID_BUDGET_S = 2400.0

#: Least budget worth loading a grid for (s): a grid exchange costs minutes and the grid's fixed costs (overview,
#: calibration check, the first round of mapping) a few more, so a shorter stretch would mostly pay overheads.
DEFAULT_MIN_GRID_BUDGET_S = 900.0


class SlotSelectionError(ValueError):
    """A `--grids` value that is not a list of slot numbers and ranges (e.g. `1-12`, `1,3,5-7`)."""


#: The largest slot number `parse_slots` takes (autoloader cassettes hold 12; the bridge allows up to 1000).
MAX_SLOT = 1000


def parse_slots(text: str) -> tuple[int, ...]:
    """Slot numbers from `1-12`, `3`, `1,3,5-7` (1-based, in the order given, each once).

    `SlotSelectionError` names what is wrong: not numbers, a range that runs backwards, a slot below 1 or above
    `MAX_SLOT`."""
    slots: dict[int, None] = {}  # ordered, each once
    for part in (piece.strip() for piece in str(text).split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise SlotSelectionError(f"--grids {text!r}: {part!r} is not a slot number or a range like 1-12")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if first < 1 or last < first:
            raise SlotSelectionError(f"--grids {text!r}: {part!r} must count up from slot 1 or above")
        if last > MAX_SLOT:
            raise SlotSelectionError(f"--grids {text!r}: slot {last} is beyond any cassette (at most {MAX_SLOT})")
        slots.update(dict.fromkeys(range(first, last + 1)))
    if not slots:
        raise SlotSelectionError("--grids needs at least one slot, e.g. 1-12")
    return tuple(slots)


class GridRunPlan(BaseModel):
    """How a multi-grid run spends its budget over the cassette (see the module docstring)."""

    model_config = _FROZEN

    slots: tuple[int, ...] = Field(min_length=1, description="cassette slots to consider, in the order to load them")
    atlas_squares: int = Field(default=4, ge=1, le=64, description="grid squares each grid's atlas pass maps")
    probe_targets: int = Field(
        default=6, ge=0, le=50, description="targets each grid's atlas pass visits to measure its hit rate"
    )
    grid_budget_s: float = Field(
        default=DEFAULT_GRID_BUDGET_S, gt=0, description="microscope seconds of screening per grid (its load excluded)"
    )
    min_grid_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="least screening time worth loading a grid for (default: 900 s, or half of grid_budget_s if less)",
    )
    switch_after_visits: int = Field(
        default=12,
        ge=0,
        description="leave a grid for the next after this many visits if its measured yield is poor (0: never)",
    )
    max_grids: int | None = Field(
        default=None, ge=1, description="screen at most this many grids (default: as many as the budget allows)"
    )

    @model_validator(mode="after")
    def _distinct_slots(self) -> GridRunPlan:
        if len(set(self.slots)) != len(self.slots) or min(self.slots) < 1:
            raise ValueError("slots must be distinct slot numbers from 1")
        if self.min_grid_budget_s is not None and self.min_grid_budget_s > self.grid_budget_s:
            raise ValueError("min_grid_budget_s cannot exceed grid_budget_s")
        return self

    @property
    def least_grid_budget_s(self) -> float:
        """The least screening time worth loading a grid for (s)."""
        if self.min_grid_budget_s is not None:
            return self.min_grid_budget_s
        return min(DEFAULT_MIN_GRID_BUDGET_S, self.grid_budget_s / 2.0)
