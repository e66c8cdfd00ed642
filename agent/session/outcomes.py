"""What a screening session produces: targets, their outcomes and the summary (pydantic, JSON-ready)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True)

Outcome = Literal["recorded", "no-diffraction", "rejected", "failed", "skipped"]

#: Lower bounds of the probability tiers targets are visited in (tier 0: p >= 0.5, 1: 0.2 <= p < 0.5, 2: below):
#: the likely crystals first, each tier on a short stage path; a budget that runs out cuts the unlikely ones.
P_DIFFRACT_TIERS: tuple[float, ...] = (0.5, 0.2)

#: Outcomes that count as "confirmed": the crystal was found again at the search preset.
CONFIRMED_OUTCOMES: frozenset[str] = frozenset({"recorded", "no-diffraction"})


class TargetRecord(BaseModel):
    """A planned target: where the atlas says a crystal is, and why."""

    model_config = _FROZEN

    target_id: str
    order: int = Field(description="position in the planned stage path, from 0")
    x_um: float
    y_um: float
    atlas_col_px: float
    atlas_row_px: float
    area_px: float
    score: float
    cluster_id: int
    from_mixed_cluster: bool = Field(
        default=False,
        description="drawn from a cluster label memory calls mixed: fills a place the crystal clusters' targets "
        "left, visited after them",
    )
    features: dict[str, float] = Field(
        default_factory=dict,
        description="the object's features (agent.locate.object_features); empty for a region without an object",
    )
    p_diffract: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="the crystal classifier's probability that this target gives a diffracting crystal (the last "
        "ranking's); None while there is no classifier (the cold-start rule ranked it)",
    )

    @property
    def tier(self) -> int:
        """Which group of targets this one is visited with (every target of a lower tier first): by the
        classifier's probability when there is one (`P_DIFFRACT_TIERS`), else sure (0) or mixed (1) cluster."""
        return visiting_tier(self.from_mixed_cluster, self.p_diffract)


def visiting_tier(from_mixed_cluster: bool, p_diffract: float | None) -> int:
    """`TargetRecord.tier` of a target drawn from a mixed cluster or not, with this probability (or None)."""
    if p_diffract is None:
        return 1 if from_mixed_cluster else 0
    return sum(1 for bound in P_DIFFRACT_TIERS if p_diffract < bound)


class TargetResult(BaseModel):
    """What happened at a target."""

    model_config = _FROZEN

    target_id: str
    outcome: Outcome
    x_um: float = Field(description="final (re-centred) stage position")
    y_um: float
    recentre_offset_um: float = 0.0
    confirm_score: float = 0.0
    n_spots: int = 0
    signal_to_background: float = 0.0
    reason: str = ""
    images: dict[str, str] = Field(default_factory=dict, description="kind -> path relative to the session")
    microscope_time_s: float = 0.0
    direct: bool = Field(
        default=False,
        description="snapped at its atlas position with no search image (agent.steps.direct): never 'confirmed'",
    )

    @property
    def confirmed(self) -> bool:
        """True if the crystal was found again at the search preset."""
        return self.outcome in CONFIRMED_OUTCOMES and not self.direct

    @property
    def snapped(self) -> bool:
        """True if the target got a diffraction snapshot (found again at search, or snapped directly)."""
        return self.outcome in CONFIRMED_OUTCOMES


class SessionSummary(BaseModel):
    """The numbers a person looks at first; written as `summary.json` and updated as the session goes."""

    model_config = ConfigDict(frozen=True, extra="allow")

    session: str
    state: str
    specimen: str | None = None
    targets_found: int = 0
    targets_visited: int = 0
    targets_confirmed: int = 0
    targets_recorded: int = Field(
        default=0, description="diffracting (confirmed or snapped directly): ready for collection"
    )
    targets_snapped_directly: int = Field(
        default=0, description="snapped at the atlas position with no search image (agent.steps.direct)"
    )
    diffracting_crystals: int | None = Field(
        default=None,
        description="targets whose diffraction snapshot passed confirm.min_spots (None when the plan takes no "
        "snapshots): what a session is for",
    )
    prompts: int = 0
    microscope_time_s: float = 0.0
    diffracting_per_hour: float | None = Field(default=None, description="diffracting crystals per microscope hour")
    time_per_diffracting_s: float | None = Field(default=None, description="microscope seconds per diffracting crystal")
    time_per_confirmed_s: float | None = None
    confirmed_per_hour: float | None = None
    fixed_time_s: dict[str, float] = Field(
        default_factory=dict,
        description="microscope seconds paid once per session, by state (calibrating, mapping, locating, labelling, "
        "targeting)",
    )
    per_target_time_s: float | None = Field(
        default=None, description="mean microscope seconds per visited target (moving ... recording, with retries)"
    )
    faults: int = 0
    precision: float | None = None
    recall: float | None = None
    recall_diffracting: float | None = None
    wall_time_s: float = Field(default=0.0, description="real seconds the session ran, over all its parts (resumes)")
    rounds: int = Field(default=0, description="rounds of mapping (blocks of grid squares mapped)")
    time_budget_s: float | None = Field(default=None, description="the plan's microscope-time budget")
    limited_by: str | None = Field(
        default=None,
        description="what ended the session before every target was visited: the time budget or max_targets",
    )
    ranked_by: str | None = Field(
        default=None,
        description="what ranked the targets last: the crystal classifier (and the records it was fitted on) or "
        "the cold-start rule",
    )


TARGET_COLUMNS = (
    "target_id",
    "order",
    "outcome",
    "x_um",
    "y_um",
    "planned_x_um",
    "planned_y_um",
    "score",
    "p_diffract",
    "cluster_id",
    "from_mixed_cluster",
    "area_px",
    "recentre_offset_um",
    "n_spots",
    "signal_to_background",
    "reason",
)


def target_rows(targets: Sequence[TargetRecord], results: dict[str, TargetResult]) -> list[dict[str, object]]:
    """One row per target (planned fields + outcome), for CSV/JSON export."""
    rows = []
    for target in targets:
        result = results.get(target.target_id)
        rows.append(
            {
                "target_id": target.target_id,
                "order": target.order,
                "outcome": result.outcome if result else "pending",
                "x_um": round(result.x_um if result else target.x_um, 3),
                "y_um": round(result.y_um if result else target.y_um, 3),
                "planned_x_um": round(target.x_um, 3),
                "planned_y_um": round(target.y_um, 3),
                "score": round(target.score, 4),
                "p_diffract": "" if target.p_diffract is None else round(target.p_diffract, 3),
                "cluster_id": target.cluster_id,
                "from_mixed_cluster": target.from_mixed_cluster,
                "area_px": round(target.area_px, 1),
                "recentre_offset_um": round(result.recentre_offset_um, 3) if result else 0.0,
                "n_spots": result.n_spots if result else 0,
                "signal_to_background": round(result.signal_to_background, 3) if result else 0.0,
                "reason": result.reason if result else "",
            }
        )
    return rows


def rows_to_csv(rows: Sequence[dict[str, object]], columns: Sequence[str] = TARGET_COLUMNS) -> bytes:
    """CSV bytes with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()
