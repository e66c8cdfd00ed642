"""The simulated microscope's image shift: a specimen-plane offset of the imaged and illuminated area from the
stage position, limited per axis, with the small gain error of a real instrument's image-shift calibration."""

from __future__ import annotations

import numpy as np

from drivers.base import InvalidParameterError, check_image_shift_um

#: Image-shift range per axis, specimen um. No published figure: a guess at what image shift reaches at the
#: search magnification (~350x) while the beam stays usable; `SimulatedMicroscope(image_shift_limit_um=...)`
#: changes it (0: no image shift).
DEFAULT_IMAGE_SHIFT_LIMIT_UM = 15.0


class ImageShiftModel:
    """The image shift set last (x_um, y_um) and where it puts the view. Not thread-safe by itself: the
    microscope calls it under its state lock."""

    def __init__(self, limit_um: float, instrument_seed: int) -> None:
        valid = isinstance(limit_um, (int, float)) and not isinstance(limit_um, bool)
        if not valid or not 0 <= limit_um < 1000:
            raise InvalidParameterError(f"image_shift_limit_um must be in [0, 1000) um, got {limit_um!r}")
        self.limit_um = float(limit_um)
        self.shift_xy_um = (0.0, 0.0)
        # the instrument's image-shift calibration is good to about 1 % (no published figure; seeded by the instrument)
        self._gain = 1.0 + float(np.random.default_rng([instrument_seed, 11]).uniform(-0.01, 0.01))

    def validate(self, x_um: float, y_um: float) -> tuple[float, float]:
        """(x_um, y_um) as floats; `InvalidParameterError` beyond the limit or without image shift."""
        if self.limit_um <= 0:
            raise InvalidParameterError("this simulated microscope has no image shift (image_shift_limit_um=0)")
        return check_image_shift_um(x_um, y_um, self.limit_um)

    def view_xy_um(self, stage_xy_um: tuple[float, float]) -> tuple[float, float]:
        """Where the view is centred (um) with the stage's specimen at `stage_xy_um`."""
        return (stage_xy_um[0] + self._gain * self.shift_xy_um[0], stage_xy_um[1] + self._gain * self.shift_xy_um[1])
