"""Benchmark: a multi-grid run against single-grid sessions and a naive run, on the same simulated cassette.

Run by hand: `.venv/bin/python benchmarks/bench_multigrid.py [--budget-s 7200] [--grid-budget-s 2400]
[--camera-px 2048] [--seed 0] [--json FILE]`.

The cassette: three grids (protein plates, a sparse protein grid, graphite flakes: crystals that mostly do not
diffract), on one simulated instrument and clock (`thermo-serialem`; exchange 60 s unload + 120 s load, a guess
labelled in `simulator.cassette`). One calibration is measured first and stored for every search below.

- **run**: `crystal-locator screen --simulated --grids 1-3` with the budget: atlas pass over all three grids,
  ranking, the best screened with `--grid-budget-s` each while the budget lasts;
- **single**: one `screen` session per grid with `--grid-budget-s`, the grid loaded before the session starts
  (its load is not in the session's time; `single+exchange` adds one exchange to each);
- **naive**: what a run without an atlas pass does: the grids in slot order, each loaded and screened with
  `--grid-budget-s`, until the budget is spent.

Prints diffracting crystals per hour of each, and the ratios the issue asks for: the run against the mean of
the single-grid sessions of the grids it screened (with and without counting exchanges), against the best two
single-grid sessions (an oracle ranking), and against the naive run.

Measured 2026-12-07 (camera 1024 px, seed 0, two runs; the second with the instrument calibrated first, as
now): the atlas pass assessed all three grids both times and both best grids were screened.
- run 1 (its first atlas pass paid the calibration, 350 s): graphite then protein screened; 198 diffracting in
  6167 s, 115.6/h (133.8/h without the 840 s of exchanges); 0.85x the single-grid sessions of those grids with
  exchanges counted on both sides, 0.91x without; 0.79x the oracle; 1.93x the naive slot-order run (60.0/h).
- run 2: every grid's 6 probes missed, so targets per square ranked graphite, sparse protein, protein; the yield
  guard left the sparse grid after 39 visits (1 diffracting, 229 s) for protein; 221 diffracting in 6290 s,
  126.5/h (151.0/h without the 1020 s of exchanges); 1.17x the mean of the single-grid sessions of the three
  screened grids (0.79x the two best, no exchange); 1.85x the naive run (68.3/h). Time-weighted, the single
  sessions' rates over the run's own screening time (2404 s graphite at 119.7/h, 229 s sparse at 27.0/h, 2403 s
  protein at 202.0/h) give 216 crystals against the run's 221.
