"""Evaluation: score the locator (and two textbook baselines) against ground truth.

- `truth`: ground truth in an image's pixel frame (from a simulated specimen or a user's labels);
- `scoring`: the matching rule, precision / recall / localisation error / bar IoU;
- `baselines`: threshold + connected components, and scikit-image LoG blobs;
- `runner`: simulated images, methods, rows, target checks;
- `labelled`: a user's labelled images (CSV of crystal positions);
- `throughput`: diffracting crystals per microscope hour of a session or a search, scored against ground truth;
- `raster`: the session benchmark's raster baselines (naive threshold search, and the same raster given truth).

`agent.evaluation` does not import `simulator`; `agent.commands.evaluate` wires a simulator in.
"""
