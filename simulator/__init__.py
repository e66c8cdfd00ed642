"""A microscope that does not exist: procedural specimens with ground truth, or dataset tiles.

Entry point: `create_simulated_microscope(specimen_type="protein-plates", seed=0)` returns a
`SimulatedMicroscope` (a `drivers.base.Microscope`). See `simulator.microscope` for presets and timing,
`simulator.specimen` for the specimen and its ground-truth queries, `simulator.tiles` for serving a
montage of real image tiles, `simulator.cassette` for an autoloader cassette of grids
(`create_simulated_microscope(cassette="default")`, `create_cassette_microscope`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from simulator.cassette import CassetteSpec, SimulatedCassetteMicroscope
    from simulator.microscope import SimulatedMicroscope

__all__ = [
    "SPECIMEN_TYPES", "CassetteSpec", "__version__", "create_cassette_microscope", "create_simulated_microscope",
    "default_cassette", "load_cassette_spec",
]

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
    cassette: CassetteSpec | str | os.PathLike[str] | None = None,
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
    camera_noise, beam_drift_fraction, and where a restarted simulator starts: initial_preset,
    initial_diffraction, start_time_s, start_stage) go to `SimulatedMicroscope`. `conditions` names a set of
    `simulator.conditions.CONDITION_SETS` (`none`, the default, or `realistic`): its specimen options and
    microscope options are added (what `specimen_options` and the keyword arguments give explicitly wins); tiles
    get its microscope options only.
    With `cassette` (a `CassetteSpec`, `"default"` or a JSON cassette file) the result is a
    `simulator.cassette.SimulatedCassetteMicroscope` whose grids come from the cassette (`specimen_type` is not
    used; `specimen_options` and the conditions' specimen options go to every grid; `loaded_slot` and
    `load_counts` say what is on the stage at the start, none by default).
    """
    from simulator.conditions import condition_kwargs
    from simulator.microscope import SimulatedMicroscope

    extra = condition_kwargs(conditions)
    specimen_options = {**extra.pop("specimen_options", {}), **(specimen_options or {})}
    kwargs = {**extra, **kwargs}

    if cassette is not None:
        if tiles is not None:
            raise ValueError("give either tiles or a cassette, not both")
        from simulator.cassette import create_cassette_microscope as _create

        return _create(cassette, seed=seed, specimen_options=specimen_options, instrument_seed=instrument_seed,
                       **kwargs)
    if tiles is not None:
        from simulator.tiles import TileScene

        scene: Any = TileScene.open(tiles, pixel_size_um=pixel_size_um, overlap_fraction=overlap_fraction)
        if "stage_limits" not in kwargs:
            kwargs["stage_limits"] = scene.stage_limits()
    else:
        from simulator.specimen import generate_specimen

        scene = generate_specimen(specimen_type, seed, **specimen_options)
    return SimulatedMicroscope(scene, seed=seed, instrument_seed=instrument_seed, **kwargs)


def create_cassette_microscope(
    cassette: CassetteSpec | str | os.PathLike[str] = "default", seed: int = 0, **kwargs: Any
) -> SimulatedCassetteMicroscope:
    """A simulated microscope with an autoloader cassette (`simulator.cassette.create_cassette_microscope`)."""
    from simulator.cassette import create_cassette_microscope as _create

    return _create(cassette, seed=seed, **kwargs)


def default_cassette(seed: int = 0) -> CassetteSpec:
    """A varied 12-slot cassette seeded by `seed` (`simulator.cassette.default_cassette`)."""
    from simulator.cassette import default_cassette as _default

    return _default(seed)


def load_cassette_spec(path: str | os.PathLike[str]) -> CassetteSpec:
    """A cassette read from a JSON file (`simulator.cassette.load_cassette_spec`)."""
    from simulator.cassette import load_cassette_spec as _load

    return _load(path)


def __getattr__(name: str) -> Any:
    if name == "CassetteSpec":  # imported on first use, like the rest of the simulator
        from simulator.cassette import CassetteSpec

        return CassetteSpec
    raise AttributeError(f"module 'simulator' has no attribute {name!r}")
