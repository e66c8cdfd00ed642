r"""The screening loop's states and transitions, as data (`transitions.Machine` is built from them).

```
idle -> calibrating -> mapping -> locating -> labelling -> targeting
      -> [ moving -> zooming -> confirming -> diffraction -> recording ]* -> done
                                     \-> (rejected: next target)
      (a round's targets done, budget left: map_more -> mapping -> locating -> ... the next block of squares)
any working state --fault--> recovering --retry--> (the failed state; a target step from `moving`)
                                        --next_target / finish--> (target skipped)
                                        --give_up--> failed
                                        --pause--> paused (the bridge is gone: wait for it or a person)
any working state --pause--> paused --unpause--> (the paused state);   any state --abort--> aborted
```
"""

from __future__ import annotations

STATES: tuple[str, ...] = (
    "idle",
    "calibrating",
    "mapping",
    "locating",
    "labelling",
    "targeting",
    "moving",
    "zooming",
    "confirming",
    "diffraction",
    "recording",
    "recovering",
    "paused",
    "done",
    "aborted",
    "failed",
)
TERMINAL_STATES = frozenset({"done", "aborted", "failed"})
WORKING_STATES: tuple[str, ...] = tuple(
    s for s in STATES if s not in TERMINAL_STATES and s not in ("paused", "recovering", "idle")
)
#: The steps of one target visit; a fault in any of them concerns that target.
TARGET_STATES = frozenset({"moving", "zooming", "confirming", "diffraction", "recording"})
#: States from which the next target (or the end) is chosen.
CHOOSING_STATES = ["targeting", "confirming", "recording", "recovering"]

#: (trigger, source state(s), destination state) of the forward path.
FORWARD_TRANSITIONS: tuple[tuple[str, str | list[str], str], ...] = (
    ("start", "idle", "calibrating"),
    ("calibrated", "calibrating", "mapping"),
    ("mapped", "mapping", "locating"),
    ("located", "locating", "labelling"),
    ("labelled", "labelling", "targeting"),
    ("next_target", CHOOSING_STATES, "moving"),
    ("arrived", "moving", "zooming"),
    ("zoomed", "zooming", "confirming"),
    ("confirmed", "confirming", "diffraction"),
    ("diffracted", "diffraction", "recording"),
    ("map_more", CHOOSING_STATES, "mapping"),
    ("finish", CHOOSING_STATES, "done"),
    ("fault", list(WORKING_STATES), "recovering"),
    ("give_up", "recovering", "failed"),
    ("pause", [*WORKING_STATES, "recovering"], "paused"),
    ("abort", [s for s in STATES if s not in TERMINAL_STATES], "aborted"),
)
