"""Multi-grid runs from an autoloader cassette: an atlas pass over every grid, the grids ranked, the best
screened within the time budget (`agent.grids.run`).

- `plan`: `GridRunPlan` (slots, atlas squares, each grid's screening budget) and `parse_slots("1-12")`;
- `assess`: what a grid's atlas pass found and the ranking rule;
- `records`: the run journal (`grids.jsonl`);
- `run`: `MultiGridRun`, the run itself (and its resume);
- `summary`: the run's numbers (`run_summary.json`) and overview page (`index.html`).
"""
