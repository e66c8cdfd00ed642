"""A microscope that does not exist: procedural specimens with ground truth, or dataset tiles.

Entry point: `create_simulated_microscope(specimen_type="protein-plates", seed=0)` returns a
`SimulatedMicroscope` (a `drivers.base.Microscope`). See `simulator.microscope` for presets and timing,
`simulator.specimen` for the specimen and its ground-truth queries, `simulator.tiles` for serving a
montage of real image tiles.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from simulator.microscope import SimulatedMicroscope

__all__ = ["SPECIMEN_TYPES", "__version__", "create_simulated_microscope"]

SPECIMEN_TYPES: tuple[str, ...] = ("graphite-flakes", "asbestos-fibres", "protein-plates", "polymer-faint")


def create_simulated_microscope(
    specimen_type: str = "protein-plates",
    seed: int = 0,
    tiles: str | os.PathLike[str] | None = None,
    pixel_size_um: float | None = None,
    specimen_options: dict[str, Any] | None = None,
    overlap_fraction: float | None = None,
    instrument_seed: int = 0,
    conditions: str | None = None,
    **kwargs: Any,
) -> SimulatedMicroscope:
    """A `SimulatedMicroscope` over a generated specimen, or over dataset tiles when `tiles` is given.

    `specimen_type` is one of `SPECIMEN_TYPES`; `seed` seeds the specimen, the stage and the noise;
    `instrument_seed` the instrument: its camera rotation and scale errors, and its name
    (`simulated-tem`, or `simulated-tem-<n>`), so that one stored calibration serves many grids.
    `tiles` is a folder of tiles / a layout file / a SerialEM `.mdoc` (see `drivers.formats.montage.open_montage`)
    with `pixel_size_um` (um per mosaic pixel) if the files do not say, and `overlap_fraction` for tiles
    placed by their row/column names. `specimen_options` go to `simulator.specimen.generate_specimen`; other
    keyword arguments (camera_shape_px, presets, faults, realtime, stage_limits, stage_model, optics_errors,
    camera_noise, beam_drift_fraction, and where a restarted simulator starts: initial_preset, start_time_s,
    start_stage) go to `SimulatedMicroscope`. `conditions` names a set of `simulator.conditions.CONDITION_SETS`
    (`none`, the default, or `realistic`): its specimen options and microscope options are added (what
    `specimen_options` and the keyword arguments give explicitly wins); tiles get its microscope options only.
    """
    from simulator.conditions import condition_kwargs
    from simulator.microscope import SimulatedMicroscope

    extra = condition_kwargs(conditions)
    specimen_options = {**extra.pop("specimen_options", {}), **(specimen_options or {})}
    kwargs = {**extra, **kwargs}

    if tiles is not None:
        from simulator.tiles import TileScene

        scene: Any = TileScene.open(tiles, pixel_size_um=pixel_size_um, overlap_fraction=overlap_fraction)
        if "stage_limits" not in kwargs:
            kwargs["stage_limits"] = scene.stage_limits()
    else:
        from simulator.specimen import generate_specimen

        scene = generate_specimen(specimen_type, seed, **specimen_options)
    return SimulatedMicroscope(scene, seed=seed, instrument_seed=instrument_seed, **kwargs)
