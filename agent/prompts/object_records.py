"""What label memory stores about single objects: `ObjectRecord`, one line of `objects.jsonl`.

A cluster label (`LabelRecord`) says "clusters like this hold crystals"; an object record says what one
object turned out to be. Its label comes from

- a visited target's outcome (`source` "microscope", or "simulated" on a simulated microscope):
  "diffracting" (the snapshot passed `min_spots`), "no-spots" (found again at search magnification, no
  Bragg spots), "not-found" (nothing found again where the atlas showed it);
- an operator's cluster answer spread to the cluster's objects (`source` "operator", "console" or
  "simulated"): "crystal" or "not-crystal".

The features are the locator's (`agent.locate.object_features.CANDIDATE_FEATURE_NAMES`, stored with their
names so that a later release with other features can still read them). `format` is the record layout's
version: a line of another layout is refused with a message naming the file and the version, never skipped
in silence (see `agent.prompts.label_log`).
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.prompts.label_records import FiniteVector, UtcTime, utc_now

#: File name of the object log inside a memory folder.
OBJECTS_FILE_NAME = "objects.jsonl"
#: The layout of `ObjectRecord` this release writes and reads.
OBJECT_RECORD_FORMAT = 1

ObjectLabel = Literal["diffracting", "no-spots", "not-found", "crystal", "not-crystal"]
ObjectSource = Literal["microscope", "simulated", "operator", "console"]
#: Labels that say "a crystal worth a diffraction snapshot" (the classifier's positive class).
POSITIVE_LABELS: frozenset[str] = frozenset({"diffracting", "crystal"})
#: Labels from a visited target's outcome (the others come from cluster answers).
OUTCOME_LABELS: frozenset[str] = frozenset({"diffracting", "no-spots", "not-found"})


class ObjectRecord(BaseModel):
    """One object and what it turned out to be (see module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = OBJECT_RECORD_FORMAT
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    features: FiniteVector = Field(min_length=1)
    feature_names: tuple[str, ...] = Field(min_length=1)
    label: ObjectLabel
    source: ObjectSource
    specimen: str = Field(min_length=1, max_length=200)
    preset: str = Field(min_length=1, max_length=200)
    session: str = Field(default="", max_length=200)
    target_id: str | None = Field(default=None, max_length=64)
    time_utc: UtcTime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _names_match(self) -> ObjectRecord:
        if len(self.features) != len(self.feature_names):
            raise ValueError(f"{len(self.features)} feature values but {len(self.feature_names)} feature names")
        return self

    @property
    def positive(self) -> bool:
        """True for "diffracting" and "crystal"."""
        return self.label in POSITIVE_LABELS

    @property
    def is_outcome(self) -> bool:
        """True for a visited target's outcome, False for a spread cluster answer."""
        return self.label in OUTCOME_LABELS
