"""Where a session's microscope time went: seconds per state, from the stamped `transition` records.

`StateTimes` subscribes to a session's records (and replays a journal on resume). A state's time runs from
the record that entered it to the record that left it; the state the session is in counts up to `now_s`.
The fixed costs of a session are its states before the first target (calibrating, mapping, locating,
labelling, targeting); the per-target cost is the time in the visit's states (moving ... recording) and in
recovering from their faults. Paused time counts nowhere.
"""

from __future__ import annotations

from collections import defaultdict

from agent.session.records import Record, Transition
from agent.session.states import TARGET_STATES

#: States whose time is paid once per session, whatever the number of targets.
FIXED_STATES = ("calibrating", "mapping", "locating", "labelling", "targeting")


class StateTimes:
    """Accumulates microscope seconds per state from `Transition` records (a record subscriber)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._state: str | None = None
        self._since_s: float | None = None
        self._in_target = False

    def __call__(self, record: Record) -> None:
        if not isinstance(record, Transition) or record.microscope_time_s is None:
            return
        now_s = float(record.microscope_time_s)
        if self._state is not None and self._since_s is not None:
            self.seconds[self._key(self._state)] += max(0.0, now_s - self._since_s)
        if record.state in TARGET_STATES:
            self._in_target = True
        elif record.state in FIXED_STATES:
            self._in_target = False
        self._state, self._since_s = record.state, now_s

    def _key(self, state: str) -> str:
        """Faults recovered during a visit are charged to the visit."""
        return "moving" if state == "recovering" and self._in_target else state

    def seconds_now(self, now_s: float) -> dict[str, float]:
        """Seconds per state, the current state counted up to `now_s` (microscope time)."""
        seconds = dict(self.seconds)
        if self._state is not None and self._since_s is not None:
            key = self._key(self._state)
            seconds[key] = seconds.get(key, 0.0) + max(0.0, now_s - self._since_s)
        return seconds

    def fixed_time_s(self, now_s: float) -> dict[str, float]:
        """Seconds per fixed state (calibrating ... targeting), rounded to 0.01 s."""
        seconds = self.seconds_now(now_s)
        return {state: round(seconds.get(state, 0.0), 2) for state in FIXED_STATES}

    def target_time_s(self, now_s: float) -> float:
        """Seconds spent visiting targets (the visit's states and their recoveries)."""
        seconds = self.seconds_now(now_s)
        return sum(seconds.get(state, 0.0) for state in TARGET_STATES)
