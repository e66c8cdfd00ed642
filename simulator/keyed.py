"""Random draws keyed by what happened, so that a simulator restarted mid-session draws what the first one did.

The simulator's randomness after the specimen is made (a frame's shot and read noise, the stage's repeat
error per move) used to come from generators that count calls: the n-th frame of a simulator's life had
noise `rng([seed, 1, n])`, the stage drew its errors one after another from one generator. A session that
is killed and resumed runs on a new simulator, whose counters start again at zero, so every later frame
was a new noise realisation: the resumed atlas differed, and so did everything decided from it.

Two ways out were possible: journal the generators' state and restore it, or key every draw by what was
acquired. Keys are what survive a kill at *any* moment. The agent's journal is written before each step,
not after each exposure, so a kill can fall between an exposure and its journal line; a journalled
generator state would then be one exposure behind, and the redone exposure would draw different noise
(the generator state also belongs to the simulator, which the agent's journal cannot see without a
back door in the `Microscope` protocol). A keyed draw needs nothing saved: the resumed session redoes
the cut step from its start (see `agent.session.restore`), on a simulator told the microscope time, stage
position and preset of that start, and every exposure and move of the redo happens at the same stage
position and the same microscope time as the first time, so it draws the same numbers.

A draw is keyed by the simulator's seed, a stream name, and the quantities that make it unique:

- a frame: its kind (image or diffraction), preset, exposure (us), reported stage position (nm, 1e-4 deg)
  and the microscope time at the start of the exposure (us). The time tells apart two frames taken at
  the same place with the same settings (two reference frames of a calibration, say), where a count of
  frames per place would restart at zero after a restart and repeat the earlier frame's noise;
- a stage move's repeat error: the move's target (nm) and its start time (us).

Quantising to the stage's resolution (1 nm) and the clock to 1 us keeps a key equal when the same
numbers are reached by a different rounding path. A `realtime` simulator's clock follows the wall clock,
so its draws (like its stage positions during moves) differ from run to run.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: Stage resolution of the keys (um) and of the clock (s).
POSITION_QUANTUM_UM = 1e-3
ANGLE_QUANTUM_DEG = 1e-4
TIME_QUANTUM_S = 1e-6


def quantise(value: float, quantum: float) -> int:
    """`value` in whole `quantum`s (an integer key part)."""
    return round(float(value) / quantum)


def keyed_rng(seed: int, stream: str, *parts: int | str) -> np.random.Generator:
    """A generator determined by `seed`, a `stream` name and integer or text `parts` (nothing else)."""
    text = "|".join([str(int(seed)), stream, *(str(part) for part in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    words = np.frombuffer(digest, dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))
