"""Label memory's votes: how earlier sessions' labels vote on a new cluster, and how far to trust them.

Records of one specimen type and preset are compared with a new cluster on the features both have
(matched by name), each compressed with a signed log, `sign(x) * log1p(|x|)`; the distance is a trimmed
RMS difference (the worst `TRIM_FRACTION` of the features left out). Each earlier session votes once, with
the label of its record nearest to the new cluster, weighted by a Gaussian kernel of that distance (width:
`AUTO_BANDWIDTH_FRACTION` of the median gap between a session's closest crystal and non-crystal records,
or a fixed `bandwidth`); a session whose nearest record weighs less than `MIN_VOTE_WEIGHT` does not vote.
With `w_c` / `w_n` the summed votes for crystal / not crystal:

    p_crystal  = (w_c + prior/2) / (w_c + w_n + prior)
    confidence = |w_c - w_n| / (w_c + w_n + prior)

A cluster is mixed when sessions voted both ways and one more agreeing answer (`ANSWER_VOTE_WEIGHT`)
could not lift the confidence to the caller's threshold. The held-out check (`LabelVoter.held_out_verdicts`,
`local_precision`) predicts every answered session from the others; a suggestion's confidence is capped
at the weighted precision of the records that voted on it. Why each rule and constant, and the measured
figures: `docs/label-memory.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.prompts.label_records import LabelRecord, LabelSuggestion

#: Suggestions at or above this confidence may be used without asking (the screening loop's default).
DEFAULT_CONFIDENCE_THRESHOLD = 0.8
#: Kernel width (trimmed RMS signed-log feature units) when the memory cannot say (docs/label-memory.md).
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
#: Vote weight of one more answer about a cluster, for deciding whether asking could settle it (mixed
#: clusters, docs/label-memory.md): the answer's own record, at distance 0 from the cluster.
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


def signed_log(values: np.ndarray) -> np.ndarray:
    """`sign(x) * log1p(|x|)`, elementwise, float64: compresses large normalised feature values."""
    array = np.asarray(values, dtype=np.float64)
    return np.sign(array) * np.log1p(np.abs(array))


class LabelVoter:
    """The vote rule with its settings: a fixed kernel width (`bandwidth`, None: adaptive), the pseudo-count
    of "no idea" (`prior_strength`) and each source's weight as evidence (`source_weights`)."""

    def __init__(self, bandwidth: float | None, prior_strength: float, source_weights: dict[str, float]) -> None:
        self.bandwidth = bandwidth
        self.prior_strength = prior_strength
        self.source_weights = source_weights

    def held_out_verdicts(self, records: list[LabelRecord]) -> dict[str, tuple[bool, bool]]:
        """Record id -> (label predicted for it without its session, whether that matched its answer), over
        `records` (all of one specimen and preset).

        Every session with answers that count (source weight > 0) is predicted from the other sessions'
        records; only predictions with a vote confidence of at least `CALIBRATION_CONFIDENCE` get a
        verdict (a memory that said "no idea" was not wrong).

        Cost: each record's nearest record per session is found once for the whole memory (the nearest
        record of another session does not depend on which session is held out); only the kernel width,
        which depends on the sessions left in, is worked out per held-out session.
        """
        verdicts: dict[str, tuple[bool, bool]] = {}
        memory = _Comparable(records, self.source_weights)
        answered = sorted({r.session for r in records if self.source_weights.get(r.source, 0.0) > 0})
        if len(answered) > 1:
            for names, rows in memory.by_names.items():
                rows = rows[memory.source_weight[rows] > 0]
                if not len(rows):
                    continue
                query = memory.vectors(rows)
                nearest = self.nearest_per_session(query, names, memory)
                own = memory.session_code[rows]
                nearest.distance[np.arange(len(rows)), own] = np.inf  # a session does not predict itself
                nearest.record[np.arange(len(rows)), own] = -1
                for code in np.unique(own):
                    mine = np.flatnonzero(own == code)
                    votes, _ = self.votes(nearest.take(mine), memory, held_out_session=int(code), voters=False)
                    for row, vote in zip(rows[mine], votes, strict=True):
                        record = records[row]
                        if vote.n_support and vote.confidence >= CALIBRATION_CONFIDENCE:
                            verdicts[record.id] = (vote.is_crystal, vote.is_crystal == record.is_crystal)
        return verdicts

    def votes_and_voters(
        self,
        query: np.ndarray,
        names: tuple[str, ...],
        records: Sequence[LabelRecord],
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    ) -> tuple[list[LabelSuggestion], list[list[tuple[str, float]]]]:
        """The sessions' votes (module docstring) for each row of `query`, before the held-out check, and
        per row the records that voted: (record id, vote weight)."""
        memory = _Comparable(list(records), self.source_weights)
        nearest = self.nearest_per_session(query, names, memory)
        return self.votes(nearest, memory, confidence_threshold=confidence_threshold)

    def nearest_per_session(self, query: np.ndarray, names: tuple[str, ...], memory: _Comparable) -> _Nearest:
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

    def votes(
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
