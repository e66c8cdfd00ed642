"""Evaluation: score the locator (and two textbook baselines) against ground truth.

- `truth`: ground truth in an image's pixel frame (from a simulated specimen or a user's labels);
- `scoring`: the matching rule, precision / recall / localisation error / bar IoU;
- `baselines`: threshold + connected components, and scikit-image LoG blobs;
- `runner`: simulated images, methods, rows, target checks;
- `labelled`: a user's labelled images (CSV of crystal positions).

`agent.evaluation` does not import `simulator`; `agent.commands.evaluate` wires a simulator in.
"""
