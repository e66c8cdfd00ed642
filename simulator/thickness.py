"""How thick the simulated crystals are, and what that does to their diffraction.

At low magnification a crystal darkens the image by scattering electrons outside the objective aperture:
its optical density OD = -ln(transmission) grows with its thickness, OD ~ t / `IMAGE_NM_PER_OD`. MicroED
needs thin crystals: Martynowycz et al. (2021, PNAS 118, e2108884118; proteinase K lamellae at 120, 200
and 300 kV) determined structures reliably up to twice the inelastic mean free path, saw only lower
resolution diffraction at three times it, and no coherent diffraction beyond four times it.

So that the thickness a locator can see decides part of what diffracts, as on a real grid:
- a share `thick_fraction` of each type's crystals (blocks and stacks that grew thick) gets an OD drawn
  log-uniformly from `THICK_OD_RANGE` instead of the type's usual contrast;
- every crystal's thickness is OD x `IMAGE_NM_PER_OD`; beyond 2 mean free paths its diffraction quality is
  cut (`LOW_RESOLUTION_QUALITY` up to 3, `WEAK_QUALITY` up to 4), beyond 4 it does not diffract.
Crystals that are thin enough still diffract only if ordered (the type's `diffracting_fraction`, which
nothing in the image shows).
"""

from __future__ import annotations

import numpy as np

#: Inelastic mean free path of electrons in a protein crystal at 200 kV (nm). Martynowycz et al. 2021 give the
#: path per voltage; 280 nm is a guess within the range such estimates span at 200 kV (about 250-350 nm),
#: not the paper's table value.
MEAN_FREE_PATH_NM = 280.0
#: Thickness (nm) that gives one unit of optical density in a low-magnification image with an objective
#: aperture. A guess (no published figure for this project's presets): contrast at low magnification comes
#: from elastic scattering outside the aperture and inelastic scattering, so it is of the order of, and
#: longer than, the inelastic mean free path.
IMAGE_NM_PER_OD = 350.0
#: OD range of the thick crystals (log-uniform): visibly dark to nearly opaque at low magnification. A guess.
THICK_OD_RANGE = (1.2, 5.0)
#: Quality factor between 2 and 3 mean free paths ("lower resolution diffraction").
LOW_RESOLUTION_QUALITY = 0.35
#: Quality factor between 3 and 4 mean free paths (a few low-angle spots at most).
WEAK_QUALITY = 0.1


def thickness_nm(contrast: np.ndarray) -> np.ndarray:
    """Crystal thickness (nm) from its bright-field contrast (the fraction of intensity it removes)."""
    return -np.log1p(-np.clip(np.asarray(contrast, dtype=np.float64), 0.0, 0.999)) * IMAGE_NM_PER_OD


def apply_thickness(crystals: dict[str, np.ndarray], thick_fraction: float, rng: np.random.Generator) -> None:
    """Make a share `thick_fraction` of `crystals` thick and cut the diffraction of every crystal by its
    thickness (see module docstring); changes `contrast`, `diffracts` and `quality` in place. `rng` is a
    stream of its own, so the crystals' other draws stay as they were."""
    n = crystals["contrast"].shape[0]
    thick = rng.uniform(size=n) < thick_fraction
    od = np.exp(rng.uniform(np.log(THICK_OD_RANGE[0]), np.log(THICK_OD_RANGE[1]), size=n))
    crystals["contrast"] = np.where(thick, 1.0 - np.exp(-od), crystals["contrast"])
    paths = thickness_nm(crystals["contrast"]) / MEAN_FREE_PATH_NM
    factor = np.select([paths <= 2.0, paths <= 3.0, paths <= 4.0], [1.0, LOW_RESOLUTION_QUALITY, WEAK_QUALITY], 0.0)
    crystals["quality"] = crystals["quality"] * factor
    crystals["diffracts"] = crystals["diffracts"] & (factor > 0)
