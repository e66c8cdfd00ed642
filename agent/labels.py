"""Label memory: clusters people labelled before, re-used to label new clusters so prompts get rarer.

Every label is a `LabelRecord`: a cluster's feature vector (the locator's
`ClusterSummary.normalised_centroid`, normalised so that it compares across images) with the
feature names, whether the cluster holds crystals, the specimen type, optics preset, session and
who gave the label (`source`: an operator's answer, the web console, the agent itself, ...).

Storage: one append-only JSON-lines file per memory folder (`labels.jsonl`). Every record is one
line written with a single `write`, flushed and fsync'ed; a crash can at worst leave a torn last
line, which reading skips (with a warning) and the next append steps over. Prune and clear rewrite
the file atomically. A lock file serialises writers of several processes on one machine.

Suggestions (`LabelMemory.suggest`): for each new cluster centroid, only records of the same
specimen type and preset are used, compared on the features both have (matched by name, so the
feature set may grow). Each feature is compressed with a signed log, `sign(x) * log1p(|x|)`, so a
feature that is 50 background-sigmas away does not drown the others, and the distance is a trimmed
RMS difference over the shared features (the worst 20 % of features are left out, so one feature
that behaves differently in a new image cannot hide an otherwise close match). A record's weight is
a Gaussian kernel of that distance. Its width adapts to the memory: a fraction
(`AUTO_BANDWIDTH_FRACTION`) of the typical distance between the closest crystal and non-crystal
clusters of one session, i.e. of how far apart the things to tell apart are in this feature space,
whatever the locator's normalisation (a fixed `bandwidth` may be given instead).

Votes: each earlier session votes once, with the label of its record nearest to the new cluster
(one image's ten clusters are not ten opinions, and a different cluster of that image that merely
lies close does not vote against it), weighted by that record's kernel weight; a session whose
nearest record has weight below `MIN_VOTE_WEIGHT` saw nothing alike and does not vote. With `w_c` /
`w_n` the summed votes for crystal / not crystal and `prior_strength` a pseudo-count of "no idea":

    p_crystal  = (w_c + prior/2) / (w_c + w_n + prior)
    confidence = |w_c - w_n| / (w_c + w_n + prior)        (0 = no idea, -> 1 with agreeing votes)

No memory, memory far away (a different-looking specimen) and conflicting memory all give a low
vote confidence; one earlier session gives at most 0.77 (1 / 1.3), agreeing close labels from two
sessions more than `DEFAULT_CONFIDENCE_THRESHOLD` (0.8).

Mixed clusters (`LabelSuggestion.mixed`): sessions voted both ways, and one more answer agreeing with
the majority (vote weight `ANSWER_VOTE_WEIGHT`, its own record) could still not lift the confidence to
the caller's threshold: `(|w_c - w_n| + 1) / (w_c + w_n + prior + 1) < threshold`. Asking would not settle
such a cluster. Operators have answered clusters like it differently before: typically a cluster of which
a part lies on crystals (a flake's or fibre's edge, 10-60 % of its cells on crystals), where the answer
depends on which cells the gallery happens to show. At the default threshold any minority above about a
tenth of the votes can never be outvoted (confidence tends to 1 - 2 x minority share); with two to one
nothing can settle it soon. A lopsided split that one answer settles (ten to one) is asked about, since
that answer makes it sure. (Until stop 17 the rule was a fixed minority share of one in five; a cluster
with a minority between one in ten and one in five was asked in every session and never became sure:
in an eight-session replay, protein asked in 67-75 % of the seventh and eighth sessions for it.)
The screening loop asks no prompt for mixed clusters alone by default; their targets fill the places the
crystal clusters' targets leave and are visited after them, and the search-preset check decides object by
object (`agent.labelling`, `OperatorPlan.mixed`). The price: one careless answer (or one unlucky gallery)
among few makes a clean cluster mixed. It still gets the places the sure clusters leave, and since mixed
clusters join every prompt asked anyway, further answers accumulate until the odd one is outvoted; a
mature memory that never asks keeps it mixed. `OperatorPlan.mixed = "ask"` trades those prompts back.

Held-out check (`held_out_verdicts`, `local_precision`): votes trust that clusters which look alike
hold alike things. Whether they do depends on the specimen, the atlas and the locator's features, so the
memory checks it on its own answers: every session with answers is predicted from the other sessions,
and each confident prediction (vote confidence >= `CALIBRATION_CONFIDENCE`) gets a verdict, right or
wrong. The check is local: a suggestion looks at the verdicts of the records that voted on it (each
earlier session's nearest record, either label), and over those whose own held-out prediction was the
label it suggests takes `(right + 1) / (n + 1)`, each verdict counted with its record's vote weight
(one assumed success, so a memory that was never wrong is not held back; one wrong verdict of full
weight among fewer than four drops below the default threshold). The suggestion's confidence is capped
at that figure: where the memory mispredicted its own past answers (look-alike clusters answered
differently in different sessions) it gives no confident label (and, when the votes split, calls the
cluster mixed: above) instead of guessing, until enough right predictions outweigh the mistakes, while
a mistake about one kind of cluster (a mixed film-and-crystal cluster) does not hold back the labels of
another (the clean crystal cluster) that it predicted right every time. `held_out_precision` gives the
unweighted figure over all verdicts of a memory, for reports.

Measured (`benchmarks/bench_labels.py`: sessions of a type on one memory, then a new type; one grid
square, the default plan's window features and k = 5, simulated operator; its offline replay relabels the
same sessions in 24 orders, all of them for four sessions). Figures of stop 17, with the kernel width at
0.7 of the gap and the "can one answer settle it" rule for mixed clusters; before, in brackets, 0.5 and
a fixed minority share of one in five:

- 1024 px camera (the atlas frame shows about 300 um, several grid squares): clusters recur across
  seeds.
  - Live prompts per session, seeds 1-4: 1,1,0,0 for every type (polymer was 1,1,1,0). Seeds 11-14:
    1,1,0,0 for graphite, asbestos and protein, 1,1,0,1 for polymer (graphite was 1,1,1,0, polymer
    1,1,1,1: its fourth session's crystal cluster came out at 0.79, with a kurtosis unlike the earlier
    sessions'). A new type asks again (1 prompt) every time.
  - Replayed third / fourth session: 0 / 0 for every type on seeds 1-4, and on seeds 11-14 except
    polymer 0.08 / 0 (graphite was 0.17 / 0, polymer 0.42 / 0). Eight sessions of seeds 21-28, mean
    prompts of sessions 3 to 8: asbestos and protein 0 throughout (protein was 0.17-0.75 from the sixth
    on: one dissenting session among seven kept a cluster below the threshold for good), graphite 0.08 or
    0, polymer 0.08-0.38 (was 0.42-0.79): lopsided splits that one answer settles, and clusters unlike
    any before.
  - Confident labels that disagree with the operator, replayed: the same look-alikes as before. Asbestos
    12 of 210 (seeds 1-4) and 12 of 210 (11-14): a debris-and-film-tear cluster that looks like the
    dense-fibre cluster answered "crystal" before; graphite 12 of 210 (11-14) and 9 of 607 (21-28, was
    17); protein 17 of 646 (21-28); polymer 23 of 433 (21-28, 21 of them "not crystal" on a crystal
    cluster, was 18 of 465); graphite 4 of 220 (seeds 1-4, "not crystal", was 2 of 218).
  - On the same sessions (where memory labelled the clusters), the clusters memory labelled crystal hold
    this share of their cells on crystals, against the clusters the operator's criterion picks: seeds
    1-4 graphite 0.57 / 0.56, asbestos 0.58 / 0.66 (the look-alike), protein 0.58 / 0.58, polymer
    0.86 / 0.86; seeds 11-14 graphite 0.81 / 0.83 (one of seven auto crystal labels wrong), asbestos
    0.72 / 0.64, protein 0.70 / 0.70, polymer 0.72 / 0.75.
- 2048 px camera (the README's), replayed (seeds 1-4): third / fourth session 0 / 0 for every type
  (protein was 0.08 / 0, polymer 0.42 / 0). Confident labels that disagree with the operator: graphite
  12 of 210 ("not crystal"), protein 12 of 210 ("crystal"), polymer 20 of 200 (4 "crystal", 16 "not
  crystal" on the crystal cluster of one seed's atlas that looks like film; was 14 of 186), asbestos 0.
- 512 px camera (about one grid square, often empty or without crystals): clusters do not recur, and
  film-thickness steps and bar edges look like graphite flakes and asbestos fibres to these features.
  Replayed third / fourth session (seeds 1-4): graphite 0.25 / 0, asbestos 0.75 / 0.75, protein 0 / 0,
  polymer 0.25 / 0.25 (was 0.58 / 0, 0.83 / 0.75, 0 / 0, 0.92 / 1.0); confident crystal labels wrong:
  graphite 4 of 168 (was 16 of 176), protein 12 of 210. Most wrong auto labels here are look-alikes
  seen for the first time, which no memory of earlier answers can catch; the remedy is a larger atlas.

The kernel width trades prompts against silent misses: over all five replayed sets (about 5 800
confident labels), going from 0.5 to 0.7 took the prompts of sessions 3 and later from 11.9 to 3.6
(summed over positions and sets), confident "crystal" labels on non-crystal clusters from 114 to 94, and
added 11 confident "not crystal" labels on crystal clusters (44 to 55): clusters whose targets the loop
does not visit. Wider still asked less on these sets with no more mistakes (0.8: 2.4 prompts, 90 and 55
wrong; 1.0: 1.5, 90 and 55); it stays at 0.7 because a wider kernel lets less alike records vote, and
how alike "alike" must be on real atlases these simulated sets cannot tell. Votes weighted by
how much closer a session's nearest record is than its nearest record of the other label (tried at
stop 17) made fewer mistakes only by asking far more (on the three four-session sets at 1024 and 2048
px, prompts of sessions 3 and later 5-22 at widths 0.3-1.0, against 1.25 for plain votes): the wrong
labels that remain are clusters that look like the other label in these features, which no vote rule
can tell.

Speed (`benchmarks/bench_label_memory.py`): a session's first suggestion computes the held-out check from
scratch; each record's nearest record per session is found once for the whole memory, with arrays. Five
clusters per session: 0.03 s for 50 sessions, 0.25 s for 200, 1.3 s for 500, 4.4 s for 1000 (the pairwise
distances grow with the square of the memory; the per-session loops this replaced took 170 s at 500).

Records made by the agent itself (`source="auto"`) are stored for the record and take part in the
nearest-record search (a session whose nearest record was auto-labelled casts no vote) but carry no
weight by default, so the memory cannot talk itself into a mistake.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivers.formats.images import write_atomic

logger = logging.getLogger(__name__)

#: File name of the append log inside a memory folder.
LABELS_FILE_NAME = "labels.jsonl"
#: Environment variable that overrides the default memory folder.
LABELS_ENV_VAR = "CRYSTAL_LOCATOR_LABELS"
#: Suggestions at or above this confidence may be used without asking (the screening loop's default).
DEFAULT_CONFIDENCE_THRESHOLD = 0.8
#: Kernel width (trimmed RMS signed-log feature units) when the memory cannot say (see module doc).
DEFAULT_BANDWIDTH = 0.35
#: Adaptive kernel width: this fraction of the median closest crystal / non-crystal distance per session.
AUTO_BANDWIDTH_FRACTION = 0.7
#: Limits of the adaptive kernel width.
BANDWIDTH_LIMITS = (0.05, 3.0)
#: Fraction of the shared features left out of a distance (the largest differences).
TRIM_FRACTION = 0.2
#: A session votes only if its nearest record has at least this kernel weight (else it saw nothing alike).
MIN_VOTE_WEIGHT = 0.3
#: The held-out check counts the memory's predictions of its own past sessions at this vote confidence or more.
CALIBRATION_CONFIDENCE = 0.5
#: Vote weight of one more answer about a cluster, for deciding whether asking could settle it (module
#: docstring, mixed clusters): the answer's own record, at distance 0 from the cluster.
ANSWER_VOTE_WEIGHT = 1.0
#: Pseudo-count of "no idea" evidence added to every suggestion.
DEFAULT_PRIOR_STRENGTH = 0.3
#: Weight of each source's labels as evidence ("auto": the agent's own guesses, none by default).
DEFAULT_SOURCE_WEIGHTS: dict[str, float] = {
    "operator": 1.0,
    "console": 1.0,
    "simulated": 1.0,
    "import": 1.0,
    "auto": 0.0,
}
#: Shared features needed to compare a record with a query: this fraction of the query's features.
MIN_SHARED_FEATURE_FRACTION = 0.75
EXPORT_FORMAT = "crystal-locator-labels"
EXPORT_VERSION = 1

LabelSource = Literal["operator", "console", "simulated", "auto", "import"]


class LabelMemoryError(Exception):
    """The label memory could not be read or written (bad folder, unreadable export, bad input)."""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class LabelRecord(BaseModel):
    """One labelled cluster: its normalised feature vector and whether it holds crystals."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    feature_vector: tuple[float, ...] = Field(min_length=1)
    feature_names: tuple[str, ...] = Field(min_length=1)
    is_crystal: bool
    specimen: str = Field(min_length=1, max_length=200)
    preset: str = Field(min_length=1, max_length=200)
    session: str = Field(default="", max_length=200)
    source: LabelSource = "operator"
    operator: str | None = Field(default=None, max_length=200)
    prompt_id: str | None = Field(default=None, max_length=200)
    cluster_id: int | None = None
    time_utc: datetime = Field(default_factory=_utc_now)

    @field_validator("feature_vector")
    @classmethod
    def _finite(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(math.isfinite(v) for v in value):
            raise ValueError("feature_vector must hold finite numbers only")
        return value

    @field_validator("time_utc")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)

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
    would not settle it; see the module docstring).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    is_crystal: bool
    confidence: float = Field(ge=0.0, le=1.0)
    n_support: int = Field(ge=0)
    p_crystal: float = Field(ge=0.0, le=1.0)
    nearest_distance: float | None = None
    held_out_precision: float | None = Field(default=None, ge=0.0, le=1.0)
    mixed: bool = False


def default_labels_dir() -> Path:
    """The per-user memory folder: `$CRYSTAL_LOCATOR_LABELS`, else `$XDG_DATA_HOME/crystal-locator/labels`,
    else `~/.local/share/crystal-locator/labels`. Not created here."""
    override = os.environ.get(LABELS_ENV_VAR)
    if override:
        return Path(override).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME")
    base = Path(data_home).expanduser() if data_home else Path.home() / ".local" / "share"
    return base / "crystal-locator" / "labels"


def signed_log(values: np.ndarray) -> np.ndarray:
    """`sign(x) * log1p(|x|)`, elementwise, float64: compresses large normalised feature values."""
    array = np.asarray(values, dtype=np.float64)
    return np.sign(array) * np.log1p(np.abs(array))


class LabelMemory:
    """An append-only label log in `folder` (created if missing) and suggestions drawn from it.

    Safe for one writer thread per process and several processes on one machine (lock file).
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
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabelMemoryError(f"cannot create the label memory folder {self.folder}: {exc}") from exc
        if not self.folder.is_dir():
            raise LabelMemoryError(f"{self.folder} is not a folder; pass a folder for the label memory")
        self.path = self.folder / LABELS_FILE_NAME
        self._lock_path = self.folder / ".labels.lock"
        #: Fixed kernel width, or None to adapt it to the memory (see the module docstring).
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self.prior_strength = float(prior_strength)
        self.source_weights = dict(DEFAULT_SOURCE_WEIGHTS if source_weights is None else source_weights)
        self._cache_key: tuple[int, int, int] | None = None
        self._records: list[LabelRecord] = []
        #: Lines that could not be read at the last load (torn tail after a crash, or corrupt).
        self.skipped_lines = 0
        self._held_out_cache: dict[tuple[Any, str, str], dict[str, tuple[bool, bool]]] = {}

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
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self._cache_key, self.skipped_lines = [], None, 0
            return []
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key == self._cache_key:
            return self._records
        records, skipped = _parse_lines(self.path.read_bytes(), self.path)
        self._records, self._cache_key, self.skipped_lines = records, key, skipped
        return records

    # -- writing -----------------------------------------------------------------------------------

    def add(self, record: LabelRecord | Sequence[LabelRecord]) -> list[LabelRecord]:
        """Append one record (or several) durably: flushed and fsync'ed before this returns."""
        return self.add_many([record] if isinstance(record, LabelRecord) else list(record))

    def add_many(self, records: Sequence[LabelRecord]) -> list[LabelRecord]:
        """Append several records, one line each, in one write; durable when this returns."""
        records = list(records)
        if not records:
            return []
        payload = b"".join(r.model_dump_json().encode() + b"\n" for r in records)
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size > 0:
                    with open(self.path, "rb") as handle:
                        handle.seek(size - 1)
                        if handle.read(1) != b"\n":  # a torn line from a crash: step over it
                            payload = b"\n" + payload
                _write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        logger.debug("label memory %s: appended %d record(s)", self.path, len(records))
        return records

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
        now = _utc_now()

        def doomed(record: LabelRecord) -> bool:
            return (
                (specimen is None or record.specimen == specimen)
                and (session is None or record.session == session)
                and (source is None or record.source == source)
                and (older_than_s is None or (now - record.time_utc).total_seconds() > older_than_s)
            )

        return self._rewrite(doomed)

    def clear(self) -> int:
        """Remove every record (the memory starts empty); returns how many were removed."""
        return self._rewrite(lambda record: True)

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write all records to one JSON file (atomically); `import_file` reads it back."""
        records = self._load()
        document = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_utc": _utc_now().isoformat(),
            "records": [r.model_dump(mode="json") for r in records],
        }
        return write_atomic(path, json.dumps(document, indent=1).encode())

    def import_file(self, path: str | os.PathLike[str]) -> int:
        """Add the records of an export (or another memory's `labels.jsonl`) not already here; returns how many."""
        source = Path(path)
        try:
            raw = source.read_bytes()
        except OSError as exc:
            raise LabelMemoryError(f"cannot read {source}: {exc}") from exc
        if source.suffix == ".jsonl":
            incoming, _ = _parse_lines(raw, source)
        else:
            try:
                document = json.loads(raw)
                if document.get("format") != EXPORT_FORMAT:
                    raise ValueError(f"format is {document.get('format')!r}, expected {EXPORT_FORMAT!r}")
                incoming = [LabelRecord.model_validate(r) for r in document["records"]]
            except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as exc:
                raise LabelMemoryError(f"{source} is not a label export: {exc}") from exc
        known = {r.id for r in self._load()}
        new = [r for r in incoming if r.id not in known]
        self.add_many(new)
        return len(new)

    def _rewrite(self, doomed: Any) -> int:
        with self._locked():
            raw = self.path.read_bytes() if self.path.exists() else b""
            kept: list[bytes] = []
            removed = 0
            for line in raw.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    record = LabelRecord.model_validate_json(line)
                except ValidationError:
                    kept.append(line)  # not ours to judge: keep unreadable lines verbatim
                    continue
                if doomed(record):
                    removed += 1
                else:
                    kept.append(line)
            write_atomic(self.path, b"".join(line + b"\n" for line in kept))
        self._cache_key = None
        logger.info("label memory %s: removed %d record(s)", self.path, removed)
        return removed

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: one process at a time is the caller's job
            yield
            return
        with open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

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
        cluster is called mixed when one more answer could not lift a split vote to it (module docstring).

        The vote's confidence is capped at the memory's local held-out precision for the suggested label:
        how often the memory, predicting the sessions that vote here from the other sessions, was right
        when it said that label (module docstring). A memory that mispredicted its own past answers for
        clusters like this one gives no confident label (see `LabelSuggestion.mixed` for split votes);
        mistakes about other kinds of cluster do not hold it back.
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
        predictions of that label for its own past answers (`held_out_verdicts`; module docstring)."""
        verdicts = self.held_out_verdicts(specimen, preset).values()
        result = {}
        for label in (True, False):
            mine = [right for predicted, right in verdicts if predicted == label]
            result[label] = (sum(mine) + 1) / (len(mine) + 1)
        return result

    def held_out_verdicts(self, specimen: str, preset: str) -> dict[str, tuple[bool, bool]]:
        """Record id -> (label predicted for it without its session, whether that matched its answer).

        Every session with answers that count (source weight > 0) is predicted from the other sessions'
        records; only predictions with a vote confidence of at least `CALIBRATION_CONFIDENCE` get a
        verdict (a memory that said "no idea" was not wrong). Cached until the file changes.

        Cost: each record's nearest record per session is found once for the whole memory (the nearest
        record of another session does not depend on which session is held out); only the kernel width,
        which depends on the sessions left in, is worked out per held-out session.
        """
        loaded = self._load()  # first: it sets the cache key
        key = (self._cache_key, specimen, preset)
        cached = self._held_out_cache.get(key)
        if cached is not None:
            return cached
        records = [r for r in loaded if r.specimen == specimen and r.preset == preset]
        verdicts: dict[str, tuple[bool, bool]] = {}
        memory = _Comparable(records, self.source_weights)
        answered = sorted({r.session for r in records if self.source_weights.get(r.source, 0.0) > 0})
        if len(answered) > 1:
            for names, rows in memory.by_names.items():
                rows = rows[memory.source_weight[rows] > 0]
                if not len(rows):
                    continue
                query = memory.vectors(rows)
                nearest = self._nearest_per_session(query, names, memory)
                own = memory.session_code[rows]
                nearest.distance[np.arange(len(rows)), own] = np.inf  # a session does not predict itself
                nearest.record[np.arange(len(rows)), own] = -1
                for code in np.unique(own):
                    mine = np.flatnonzero(own == code)
                    votes, _ = self._votes(nearest.take(mine), memory, held_out_session=int(code), voters=False)
                    for row, vote in zip(rows[mine], votes, strict=True):
                        record = records[row]
                        if vote.n_support and vote.confidence >= CALIBRATION_CONFIDENCE:
                            verdicts[record.id] = (vote.is_crystal, vote.is_crystal == record.is_crystal)
        self._held_out_cache = {key: verdicts}
        return verdicts

    def _votes_and_voters(
        self,
        query: np.ndarray,
        names: tuple[str, ...],
        records: Sequence[LabelRecord],
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> tuple[list[LabelSuggestion], list[list[tuple[str, float]]]]:
        """The sessions' votes (module docstring) for each row of `query`, before the held-out check, and
        per row the records that voted: (record id, vote weight)."""
        memory = _Comparable(list(records), self.source_weights)
        nearest = self._nearest_per_session(query, names, memory)
        return self._votes(nearest, memory, confidence_threshold=confidence_threshold)

    def _nearest_per_session(self, query: np.ndarray, names: tuple[str, ...], memory: _Comparable) -> _Nearest:
        """For each row of `query` (features `names`) and each session of `memory`, the session's nearest
        comparable record (sharing at least `MIN_SHARED_FEATURE_FRACTION` of the features, compared on
        those; where a session's records come in several feature sets, the first nearest wins)."""
        needed = max(1, math.ceil(MIN_SHARED_FEATURE_FRACTION * len(names)))
        nearest = _Nearest.empty(query.shape[0], len(memory.sessions))
        for group_names, rows in memory.by_names.items():
            shared = [n for n in names if n in group_names]
            if len(shared) < needed:
                continue
            q_cols = [names.index(n) for n in shared]
            r_cols = [group_names.index(n) for n in shared]
            stored = signed_log(memory.vectors(rows)[:, r_cols])
            group_index = len(nearest.groups)
            fixed = self.bandwidth or None
            nearest.groups.append(_GroupWidth(fixed, {} if fixed else memory.session_gaps(stored, rows)))
            # columns sorted by session (stable: ties go to the lower record index, as argmin would)
            order = np.argsort(memory.session_code[rows], kind="stable")
            codes = memory.session_code[rows][order]
            starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
            sessions = codes[starts]
            counts = np.diff(np.r_[starts, len(codes)])
            positions = np.arange(len(order))
            query_log = signed_log(query[:, q_cols])
            chunk = max(1, int(_DISTANCE_CHUNK_VALUES // max(1, len(rows) * len(shared))))
            for begin in range(0, query.shape[0], chunk):
                block = slice(begin, begin + chunk)
                distance = trimmed_rms_distance(query_log[block], stored)[:, order]
                closest = np.minimum.reduceat(distance, starts, axis=1)
                at_min = np.where(distance == np.repeat(closest, counts, axis=1), positions, len(order))
                first = np.minimum.reduceat(at_min, starts, axis=1)
                better = closest < nearest.distance[block][:, sessions]
                i, j = np.nonzero(better)
                target_rows = np.arange(query.shape[0])[block][i]
                nearest.distance[target_rows, sessions[j]] = closest[i, j]
                nearest.record[target_rows, sessions[j]] = rows[order[first[i, j]]]
                nearest.group[target_rows, sessions[j]] = group_index
        return nearest

    def _votes(
        self,
        nearest: _Nearest,
        memory: _Comparable,
        held_out_session: int | None = None,
        voters: bool = True,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> tuple[list[LabelSuggestion], list[list[tuple[str, float]]]]:
        """Votes (module docstring) from each session's nearest record, and (if `voters`) per row the records
        that voted; the kernel width of each feature set leaves out `held_out_session`'s gap when given;
        `confidence_threshold` decides which split votes are mixed."""
        widths = np.array(
            [width.value(held_out_session) for width in nearest.groups] or [DEFAULT_BANDWIDTH], dtype=np.float64
        )
        found = nearest.record >= 0
        record = np.where(found, nearest.record, 0)
        distance = np.where(found, nearest.distance, 0.0)
        weight = np.exp(-0.5 * (distance / widths[np.where(found, nearest.group, 0)]) ** 2)
        weight = np.where(found, weight * memory.source_weight[record], 0.0)
        counted = found & (weight >= MIN_VOTE_WEIGHT)
        crystal = memory.is_crystal[record]
        w_c = np.sum(np.where(counted & crystal, weight, 0.0), axis=1)
        w_n = np.sum(np.where(counted & ~crystal, weight, 0.0), axis=1)
        total = w_c + w_n + self.prior_strength
        is_crystal = w_c > w_n
        support = np.sum(counted & (crystal == is_crystal[:, None]), axis=1)
        margin = np.abs(w_c - w_n)
        confidence = np.minimum(1.0, margin / total)
        # split votes that one more agreeing answer could not make confident: asking would not settle them
        settled_by_answer = (margin + ANSWER_VOTE_WEIGHT) / (total + ANSWER_VOTE_WEIGHT)
        mixed = (np.minimum(w_c, w_n) > 0) & (settled_by_answer < confidence_threshold)
        closest = nearest.distance.min(axis=1, initial=np.inf)
        suggestions: list[LabelSuggestion] = []
        voted: list[list[tuple[str, float]]] = []
        for i in range(len(total)):
            suggestions.append(
                LabelSuggestion(
                    is_crystal=bool(is_crystal[i]),
                    confidence=float(confidence[i]),
                    n_support=int(support[i]),
                    p_crystal=float(min(1.0, (w_c[i] + (total[i] - w_c[i] - w_n[i]) / 2) / total[i])),
                    nearest_distance=float(closest[i]) if np.isfinite(closest[i]) else None,
                    mixed=bool(mixed[i]),
                )
            )
            if voters:
                ids = memory.record_ids[nearest.record[i][counted[i]]]
                voted.append(list(zip(ids.tolist(), weight[i][counted[i]].tolist(), strict=True)))
        return suggestions, voted


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


#: Values of the (query rows x records x features) difference array computed at once (~64 MiB).
_DISTANCE_CHUNK_VALUES = 8_000_000


class _Comparable:
    """The records of one specimen and preset as arrays, for votes over many records at once."""

    def __init__(self, records: list[LabelRecord], source_weights: dict[str, float]) -> None:
        self.records = records
        self.record_ids = np.array([r.id for r in records], dtype=object)
        self.sessions = sorted({r.session for r in records})
        code_of = {session: code for code, session in enumerate(self.sessions)}
        self.session_code = np.array([code_of[r.session] for r in records], dtype=np.intp)
        self.is_crystal = np.array([r.is_crystal for r in records], dtype=bool)
        self.source_weight = np.array([source_weights.get(r.source, 0.0) for r in records], dtype=np.float64)
        groups: dict[tuple[str, ...], list[int]] = {}
        for row, record in enumerate(records):
            groups.setdefault(record.feature_names, []).append(row)
        #: feature names -> record rows, in order of first appearance
        self.by_names = {names: np.array(rows, dtype=np.intp) for names, rows in groups.items()}

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The feature vectors of `rows` (all of one feature set), (len(rows), F) float64."""
        return np.array([self.records[row].feature_vector for row in rows], dtype=np.float64)

    def session_gaps(self, stored: np.ndarray, rows: np.ndarray) -> dict[int, float]:
        """Session code -> distance between that session's closest crystal and non-crystal records among
        `rows` (`stored`: their signed-log vectors), for sessions that labelled both kinds."""
        codes, crystal = self.session_code[rows], self.is_crystal[rows]
        gaps = {}
        for code in np.unique(codes):
            mine = codes == code
            if (mine & crystal).any() and (mine & ~crystal).any():
                gaps[int(code)] = float(trimmed_rms_distance(stored[mine & crystal], stored[mine & ~crystal]).min())
        return gaps


@dataclass(frozen=True)
class _GroupWidth:
    """The kernel width for one feature set: fixed, or `AUTO_BANDWIDTH_FRACTION` x the median of the
    sessions' gaps between their closest crystal and non-crystal records (module docstring)."""

    fixed: float | None
    gaps: dict[int, float]

    def value(self, held_out_session: int | None = None) -> float:
        if self.fixed:
            return self.fixed
        return _width_from_gaps([gap for code, gap in self.gaps.items() if code != held_out_session])


@dataclass(frozen=True)
class _Nearest:
    """Per query row and session: the distance to the session's nearest comparable record (inf: none),
    that record's row (-1: none) and the index of its feature set in `groups`."""

    distance: np.ndarray
    record: np.ndarray
    group: np.ndarray
    groups: list[_GroupWidth]

    @classmethod
    def empty(cls, n_query: int, n_sessions: int) -> _Nearest:
        shape = (n_query, n_sessions)
        return cls(np.full(shape, np.inf), np.full(shape, -1, dtype=np.intp), np.zeros(shape, dtype=np.intp), [])

    def take(self, rows: np.ndarray) -> _Nearest:
        return _Nearest(self.distance[rows], self.record[rows], self.group[rows], self.groups)


def local_precision(voters: Sequence[tuple[str, float]], verdicts: dict[str, tuple[bool, bool]], label: bool) -> float:
    """`(right + 1) / (n + 1)` over the held-out verdicts of the records that voted on a cluster (either
    way) whose held-out prediction was `label`, each counted with its vote weight (module docstring)."""
    right = total = 0.0
    for record_id, weight in voters:
        verdict = verdicts.get(record_id)
        if verdict is not None and verdict[0] == label:
            total += weight
            right += weight * verdict[1]
    return (right + 1.0) / (total + 1.0)


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


def trimmed_rms_distance(a: np.ndarray, b: np.ndarray, trim_fraction: float = TRIM_FRACTION) -> np.ndarray:
    """RMS distance between rows of `a` (n, F) and rows of `b` (m, F) leaving out the largest
    `trim_fraction` of the per-feature squared differences; (n, m) float64."""
    squared = (a[:, None, :] - b[None, :, :]) ** 2
    n_features = squared.shape[2]
    keep = n_features - int(trim_fraction * n_features)
    if keep < n_features:
        squared = np.partition(squared, keep - 1, axis=2)[:, :, :keep]
    return np.sqrt(np.mean(squared, axis=2))


def _width_from_gaps(gaps: Sequence[float]) -> float:
    """The adaptive kernel width from per-session gaps (clipped to `BANDWIDTH_LIMITS`); the default without."""
    if not gaps:
        return DEFAULT_BANDWIDTH
    low, high = BANDWIDTH_LIMITS
    return float(np.clip(AUTO_BANDWIDTH_FRACTION * np.median(gaps), low, high))


def _parse_lines(raw: bytes, path: Path) -> tuple[list[LabelRecord], int]:
    lines = raw.split(b"\n")
    records: list[LabelRecord] = []
    skipped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(LabelRecord.model_validate_json(line))
        except ValidationError:
            skipped += 1
            torn = number == len(lines)  # no newline after it: a write cut short by a crash
            logger.warning("label memory %s: skipping %s line %d", path, "torn last" if torn else "unreadable", number)
    return records, skipped


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]
