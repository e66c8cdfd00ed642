"""Label memory: clusters people labelled before, re-used to label new clusters so prompts get rarer.

`LabelMemory` keeps `LabelRecord`s (one labelled cluster each) in an append-only log in a folder
(`agent.prompts.label_log`) and suggests a label for new clusters from the records of the same
specimen type and preset (`LabelSuggestion`; the vote rule is `agent.prompts.label_votes`). Records made
by the agent itself (`source="auto"`) are stored and take part in the nearest-record search but carry no
weight by default, so the memory cannot talk itself into a mistake. How the rule was tuned, with the
measured figures: `docs/label-memory.md`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.prompts.label_log import LabelLog, read_export, read_label_file
from agent.prompts.label_records import LabelMemoryError, LabelRecord, LabelSource, LabelSuggestion, utc_now
from agent.prompts.label_votes import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_PRIOR_STRENGTH,
    DEFAULT_SOURCE_WEIGHTS,
    LabelVoter,
    local_precision,
)
from agent.prompts.object_records import OBJECTS_FILE_NAME, ObjectRecord


class LabelMemory:
    """An append-only label log in `folder` (created if missing) and suggestions drawn from it.

    Safe for one writer thread per process and several processes on one machine (lock file).
    `bandwidth`: fixed kernel width (None: adapt it to the memory); `prior_strength`: pseudo-count of
    "no idea"; `source_weights`: each source's weight as evidence (`agent.prompts.label_votes`).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        bandwidth: float | None = None,
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
        source_weights: dict[str, float] | None = None,
    ) -> None:
        if not ((bandwidth is None or bandwidth > 0) and prior_strength > 0):
            raise LabelMemoryError(f"bandwidth and prior_strength must be > 0, got {bandwidth}, {prior_strength}")
        self._log: LabelLog[LabelRecord] = LabelLog(Path(folder).expanduser())
        #: What visited objects turned out to be (`agent.prompts.object_records`), beside the cluster labels.
        self._objects: LabelLog[ObjectRecord] = LabelLog(self._log.folder, OBJECTS_FILE_NAME, ObjectRecord)
        self.folder = self._log.folder
        self.path = self._log.path
        #: Fixed kernel width, or None to adapt it to the memory (`agent.prompts.label_votes`).
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.prior_strength = float(prior_strength)
        self.source_weights = dict(DEFAULT_SOURCE_WEIGHTS if source_weights is None else source_weights)
        self._held_out_cache: dict[tuple[Any, str, str], dict[str, tuple[bool, bool]]] = {}

    @property
    def skipped_lines(self) -> int:
        """Lines that could not be read at the last load (torn tail after a crash, or corrupt)."""
        return self._log.skipped_lines

    # -- reading -----------------------------------------------------------------------------------

    def list_records(
        self, *, specimen: str | None = None, preset: str | None = None, session: str | None = None
    ) -> list[LabelRecord]:
        """All readable records, oldest first, optionally only those of a specimen / preset / session."""
        records = self._load()
        return [
            r
            for r in records
            if (specimen is None or r.specimen == specimen)
            and (preset is None or r.preset == preset)
            and (session is None or r.session == session)
        ]

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self) -> Iterator[LabelRecord]:
        return iter(self._load())

    def _load(self) -> list[LabelRecord]:
        return self._log.records()

    # -- writing -----------------------------------------------------------------------------------

    def add(self, record: LabelRecord | Sequence[LabelRecord]) -> list[LabelRecord]:
        """Append one record (or several) durably: flushed and fsync'ed before this returns."""
        return self.add_many([record] if isinstance(record, LabelRecord) else list(record))

    def add_many(self, records: Sequence[LabelRecord]) -> list[LabelRecord]:
        """Append several records, one line each, in one write; durable when this returns."""
        return self._log.append(records)

    def record_clusters(
        self,
        centroids: np.ndarray,
        feature_names: Sequence[str],
        is_crystal: Sequence[bool],
        *,
        specimen: str,
        preset: str,
        session: str,
        source: LabelSource = "operator",
        operator: str | None = None,
        prompt_id: str | None = None,
        cluster_ids: Sequence[int] | None = None,
    ) -> list[LabelRecord]:
        """Store one label per cluster: `centroids` (n, F) with `is_crystal` (n booleans)."""
        matrix = _as_matrix(centroids, feature_names)
        if len(is_crystal) != matrix.shape[0]:
            raise LabelMemoryError(f"{matrix.shape[0]} centroids but {len(is_crystal)} labels")
        if cluster_ids is not None and len(cluster_ids) != matrix.shape[0]:
            raise LabelMemoryError(f"{matrix.shape[0]} centroids but {len(cluster_ids)} cluster ids")
        try:
            records = [
                LabelRecord(
                    feature_vector=tuple(float(v) for v in matrix[i]),
                    feature_names=tuple(feature_names),
                    is_crystal=bool(is_crystal[i]),
                    specimen=specimen,
                    preset=preset,
                    session=session,
                    source=source,
                    operator=operator,
                    prompt_id=prompt_id,
                    cluster_id=None if cluster_ids is None else int(cluster_ids[i]),
                )
                for i in range(matrix.shape[0])
            ]
        except ValidationError as exc:
            raise LabelMemoryError(f"cannot store these labels: {exc}") from exc
        return self.add_many(records)

    def prune(
        self,
        specimen: str | None = None,
        older_than_s: float | None = None,
        session: str | None = None,
        *,
        source: str | None = None,
    ) -> int:
        """Remove records matching ALL given filters (at least one is required); returns how many.

        `older_than_s`: records whose time is more than that many seconds ago. Unreadable lines
        are kept as they are. The file is rewritten atomically.
        """
        if specimen is None and older_than_s is None and session is None and source is None:
            raise LabelMemoryError(
                "prune needs at least one filter (specimen, older_than_s, session, source); "
                "use clear() to remove everything"
            )
        now = utc_now()

        def doomed(record: LabelRecord | ObjectRecord) -> bool:
            return (
                (specimen is None or record.specimen == specimen)
                and (session is None or record.session == session)
                and (source is None or record.source == source)
                and (older_than_s is None or (now - record.time_utc).total_seconds() > older_than_s)
            )

        removed = self._log.rewrite(doomed)
        if self._objects.path.exists():
            removed += self._objects.rewrite(doomed)
        return removed

    def clear(self) -> int:
        """Remove every record, cluster labels and object outcomes (the memory starts empty); returns how many."""
        removed = self._log.rewrite(lambda record: True)
        return removed + (self._objects.rewrite(lambda record: True) if self._objects.path.exists() else 0)

    # -- objects -----------------------------------------------------------------------------------

    def object_records(self, *, preset: str | None = None, exclude_session: str | None = None) -> list[ObjectRecord]:
        """Every readable object record (outcomes and spread answers), oldest first, optionally of one preset
        only and without those of one session."""
        return [
            r
            for r in self._objects.records()
            if (preset is None or r.preset == preset) and (exclude_session is None or r.session != exclude_session)
        ]

    def add_objects(self, records: Sequence[ObjectRecord]) -> list[ObjectRecord]:
        """Append object records, one line each, in one write; durable when this returns."""
        return self._objects.append(records)

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write all records, cluster labels and object outcomes (`object_records`, what the crystal classifier
        learns from), to one JSON file (atomically); `import_file` reads it back."""
        objects = [r.model_dump(mode="json") for r in self._objects.records()] if self._objects.path.exists() else []
        return self._log.export(path, {"object_records": objects})

    def import_file(self, path: str | os.PathLike[str]) -> int:
        """Add the records of an export (cluster labels and object outcomes), of another memory's `labels.jsonl`
        or of its `objects.jsonl`, that are not already here (by id); returns how many."""
        incoming: list[LabelRecord] = []
        incoming_objects: list[ObjectRecord] = []
        if Path(path).name == OBJECTS_FILE_NAME:
            incoming_objects = read_export(path, "object_records", ObjectRecord)
        else:
            incoming = read_label_file(path)
            if Path(path).suffix != ".jsonl":
                incoming_objects = read_export(path, "object_records", ObjectRecord)
        known = {r.id for r in self._load()}
        new = [r for r in incoming if r.id not in known]
        self.add_many(new)
        known_objects = {r.id for r in self.object_records()}
        new_objects = [r for r in incoming_objects if r.id not in known_objects]
        if new_objects:
            self.add_objects(new_objects)
        return len(new) + len(new_objects)

    # -- suggestions -------------------------------------------------------------------------------

    def suggest(
        self,
        centroids: np.ndarray,
        feature_names: Sequence[str],
        specimen: str,
        preset: str,
        *,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> list[LabelSuggestion]:
        """One suggestion per row of `centroids` (n, F), from records of the same specimen and preset.

        `confidence_threshold` is the confidence at which the caller takes a label without asking; a
        cluster is called mixed when one more answer could not lift a split vote to it.

        The vote's confidence is capped at the memory's local held-out precision for the suggested label:
        how often the memory, predicting the sessions that vote here from the other sessions, was right
        when it said that label. A memory that mispredicted its own past answers for clusters like this
        one gives no confident label (see `LabelSuggestion.mixed` for split votes); mistakes about other
        kinds of cluster do not hold it back.
        """
        query = _as_matrix(centroids, feature_names)
        records = [r for r in self._load() if r.specimen == specimen and r.preset == preset]
        votes, voters = self._votes_and_voters(query, tuple(feature_names), records, confidence_threshold)
        verdicts = self.held_out_verdicts(specimen, preset)
        suggestions = []
        for vote, near in zip(votes, voters, strict=True):
            precision = local_precision(near, verdicts, vote.is_crystal)
            suggestions.append(
                vote.model_copy(update={"confidence": min(vote.confidence, precision), "held_out_precision": precision})
            )
        return suggestions

    def held_out_precision(self, specimen: str, preset: str) -> dict[bool, float]:
        """Per suggested label (True: crystal), `(right + 1) / (n + 1)` over the memory's confident
        predictions of that label for its own past answers (`held_out_verdicts`)."""
        verdicts = self.held_out_verdicts(specimen, preset).values()
        result = {}
        for label in (True, False):
            mine = [right for predicted, right in verdicts if predicted == label]
            result[label] = (sum(mine) + 1) / (len(mine) + 1)
        return result

    def held_out_verdicts(self, specimen: str, preset: str) -> dict[str, tuple[bool, bool]]:
        """Record id -> (label predicted for it without its session, whether that matched its answer), for
        the records of `specimen` and `preset` (`LabelVoter.held_out_verdicts`). Cached until the file changes.
        """
        loaded = self._load()  # first: it sets the cache key
        key = (self._log.cache_key, specimen, preset)
        cached = self._held_out_cache.get(key)
        if cached is not None:
            return cached
        records = [r for r in loaded if r.specimen == specimen and r.preset == preset]
        verdicts = self._voter().held_out_verdicts(records)
        self._held_out_cache = {key: verdicts}
        return verdicts

    def _votes_and_voters(
        self,
        query: np.ndarray,
        names: tuple[str, ...],
        records: Sequence[LabelRecord],
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> tuple[list[LabelSuggestion], list[list[tuple[str, float]]]]:
        """The sessions' votes for each row of `query`, before the held-out check, and per row the records
        that voted: (record id, vote weight) (`LabelVoter.votes_and_voters`)."""
        return self._voter().votes_and_voters(query, names, records, confidence_threshold)

    def _voter(self) -> LabelVoter:
        """The vote rule with this memory's current settings."""
        return LabelVoter(self.bandwidth, self.prior_strength, self.source_weights)


def _as_matrix(centroids: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
    matrix = np.asarray(centroids, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise LabelMemoryError(f"centroids must be (n_clusters, n_features), got shape {matrix.shape}")
    if matrix.shape[1] != len(feature_names):
        raise LabelMemoryError(f"centroids have {matrix.shape[1]} features but {len(feature_names)} names were given")
    if len(set(feature_names)) != len(feature_names):
        raise LabelMemoryError(f"feature names repeat: {list(feature_names)}")
    if not np.all(np.isfinite(matrix)):
        raise LabelMemoryError("centroids contain NaN or infinite values; normalise them first")
    return matrix
