"""What label memory stores and what it answers: `LabelRecord` (one labelled cluster, one line of the log)
and `LabelSuggestion` (memory's vote about a new cluster).

A record is a cluster's feature vector (the locator's `ClusterSummary.normalised_centroid`, normalised
so that it compares across images) with the feature names, whether the cluster holds crystals, the
specimen type, optics preset, session and who gave the label (`source`: an operator's answer, the web
console, the agent itself, ...). The JSON form of a record is the on-disk format (`labels.jsonl`).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

LabelSource = Literal["operator", "console", "simulated", "auto", "import"]


class LabelMemoryError(Exception):
    """The label memory could not be read or written (bad folder, unreadable export, bad input)."""


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def _finite(values: tuple[float, ...]) -> tuple[float, ...]:
    if not all(math.isfinite(v) for v in values):
        raise ValueError("must hold finite numbers only")
    return values


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


#: A feature vector of finite numbers (label and object records).
FiniteVector = Annotated[tuple[float, ...], AfterValidator(_finite)]
#: A time, taken as UTC when it carries no zone.
UtcTime = Annotated[datetime, AfterValidator(_utc)]


class LabelRecord(BaseModel):
    """One labelled cluster: its normalised feature vector and whether it holds crystals."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    feature_vector: FiniteVector = Field(min_length=1)
    feature_names: tuple[str, ...] = Field(min_length=1)
    is_crystal: bool
    specimen: str = Field(min_length=1, max_length=200)
    preset: str = Field(min_length=1, max_length=200)
    session: str = Field(default="", max_length=200)
    source: LabelSource = "operator"
    operator: str | None = Field(default=None, max_length=200)
    prompt_id: str | None = Field(default=None, max_length=200)
    cluster_id: int | None = None
    time_utc: UtcTime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _names_match(self) -> LabelRecord:
        if len(self.feature_vector) != len(self.feature_names):
            raise ValueError(f"{len(self.feature_vector)} feature values but {len(self.feature_names)} feature names")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature names repeat: {self.feature_names}")
        return self


class LabelSuggestion(BaseModel):
    """What memory says about one new cluster.

    `confidence` is 0..1 (0: no or conflicting memory); `n_support`: sessions whose labels back the
    suggestion; `p_crystal`: smoothed probability of "crystal"; `nearest_distance`: RMS signed-log
    distance to the closest comparable record (None without any); `mixed`: earlier sessions answered
    clusters like this one both ways, and one more answer could not make the label confident (asking
    would not settle it; see `agent.prompts.label_votes`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    is_crystal: bool
    confidence: float = Field(ge=0.0, le=1.0)
    n_support: int = Field(ge=0)
    p_crystal: float = Field(ge=0.0, le=1.0)
    nearest_distance: float | None = None
    held_out_precision: float | None = Field(default=None, ge=0.0, le=1.0)
    mixed: bool = False
