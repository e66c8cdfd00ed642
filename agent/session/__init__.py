"""The runner room: the state machine, pause / resume / abort, the error table, the journal and its records,
and the subscribers that write files and publish events. It knows no instrument: the steps do
(`agent.steps`).

- `states`: the states and transitions (the diagram);
- `runner`: `Runner`, which drives a `StepEngine` through them and carries out the error table;
- `policy`: the error table (error class -> retry, skip target, re-calibrate, pause, fail);
- `records`, `journal`: typed journal records, written durably and validated when read;
- `writers`: the journal writer, event publisher, table, calibration and file writers;
- `screening`: `ScreeningSession`, the steps wired to all of the above; `restore`: resume from a journal.
"""
