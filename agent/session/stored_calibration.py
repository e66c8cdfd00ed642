"""A session and its instrument's calibration store: what the session starts from, and keeping the store
current.

`starting_calibration` picks the stored calibration a session checks (`agent.steps.calibrate`): one given
by the caller (`--calibration FILE`), else the instrument's file in the store, else none (every preset is
measured). `StoreWriter` subscribes to the session's records and stores every preset the session measures
in the instrument's file, so the next session on the instrument only checks it.
"""

from __future__ import annotations

import logging

from agent.session.records import CalibrationMeasured, Record
from agent.steps.calibration_store import CalibrationStore, CalibrationStoreError
from agent.steps.stage_calibration import CalibrationSet, PresetCalibration

logger = logging.getLogger(__name__)


class StoredCalibrationError(ValueError):
    """The stored calibration cannot be used for this microscope (the message says why and what to do)."""


def starting_calibration(
    instrument: str,
    store: CalibrationStore | None,
    given: CalibrationSet | None,
    recalibrate: bool,
) -> CalibrationSet | None:
    """The calibration the session checks: `given`, else `store`'s file of `instrument`, else None.

    With `recalibrate` nothing is read (every preset is measured). Raises `StoredCalibrationError` for a
    calibration of another instrument, and for a store file that is corrupt, of an unknown version or
    another instrument's (the file is kept)."""
    if recalibrate:
        return None
    if given is not None:
        if given.instrument != instrument:
            raise StoredCalibrationError(
                f"the calibration given was measured on instrument {given.instrument!r}, not on this microscope "
                f"{instrument!r}; refused (leave it out to use this instrument's stored calibration, or "
                "measure again with --recalibrate)"
            )
        return given
    if store is None:
        return None
    try:
        return store.load(instrument)
    except CalibrationStoreError as exc:
        raise StoredCalibrationError(str(exc)) from exc


class StoreWriter:
    """Stores each preset the session measures in the instrument's file of `store` (a subscriber).

    A store that cannot be written is logged, not fatal: the session's own `calibration.json` has it."""

    def __init__(self, store: CalibrationStore, instrument: str) -> None:
        self.store = store
        self.instrument = instrument

    def __call__(self, record: Record) -> None:
        if not isinstance(record, CalibrationMeasured):
            return
        preset = PresetCalibration.model_validate(record.model_dump(include=set(PresetCalibration.model_fields)))
        try:
            self.store.save(CalibrationSet(instrument=self.instrument, presets={preset.preset: preset}))
        except (OSError, CalibrationStoreError) as exc:
            logger.warning("could not store the calibration of %r in %s: %s", preset.preset, self.store.folder, exc)
