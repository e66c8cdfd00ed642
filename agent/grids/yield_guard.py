"""Leaving a grid that yields less than its atlas pass promised, for the next grid (`agent.grids.run`).

A handful of probe visits cannot tell a grid whose best-looking objects diffract one time in three from one
where they diffract one time in thirty (6 probes find at least one crystal on the poorer grid one time in nine).
The screening session goes on measuring: `YieldGuard` subscribes to it, counts its visits' outcomes on top of
the probes', and once `min_visits` have been made re-estimates the grid's expected rate (`assess.hit_rate`,
`assess.expected_per_hour`). When that falls below `margin` x the score of the best grid not screened yet, it
asks the session to stop (`request_abort`, at the next step boundary), and the run goes on with that grid. The
margin leaves room for the exchange the switch costs and for the next grid's own uncertainty.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.grids.assess import GridAssessment, expected_per_hour, hit_rate
from agent.session.records import Record, TargetFinished

#: Visits of the screening session before its grid may be left (on top of the atlas pass's probes).
DEFAULT_MIN_VISITS = 12

#: Leave a grid whose re-estimated rate is below this fraction of the next grid's score.
DEFAULT_MARGIN = 0.5


class YieldGuard:
    """Watches a grid's screening session (a record subscriber); `stop()` is called once when the grid should be
    left, and `reason` then says why."""

    def __init__(
        self,
        assessment: GridAssessment,
        next_score: float,
        stop: Callable[[], None],
        min_visits: int = DEFAULT_MIN_VISITS,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        self.assessment = assessment
        self.next_score = next_score
        self.min_visits = min_visits
        self.margin = margin
        self._stop = stop
        self.visits = 0
        self.diffracting = 0
        self.reason: str | None = None

    def __call__(self, record: Record) -> None:
        """Count a visit's outcome (a failed visit says nothing of the grid) and stop the session if it is time."""
        if self.reason is not None or not isinstance(record, TargetFinished) or record.outcome == "failed":
            return
        self.visits += 1
        self.diffracting += int(record.outcome == "recorded")
        if self.visits < self.min_visits:
            return
        a = self.assessment
        hit = hit_rate(a.probe_diffracting + self.diffracting, a.probed + self.visits, a.prior)
        rate = expected_per_hour(a, hit)
        if rate < self.margin * self.next_score:
            self.reason = (
                f"left for the next grid: {self.diffracting} of {self.visits} visits diffracted (hit rate now "
                f"{hit:.2f}), {rate:.0f}/h expected against {self.next_score:.0f}/h for the next grid"
            )
            self._stop()
