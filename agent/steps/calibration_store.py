"""The calibration store: each instrument's image -> stage matrices, measured once and kept.

SerialEM and Leginon measure these calibrations once per instrument and keep them; so does this store.
One file per instrument, `<folder>/<instrument>.json` (the name `Microscope.info().name` reports, with
characters other than letters, digits, `.`, `_` and `-` replaced by `_`), holding a `CalibrationSet`:
format version, instrument, the date it was saved and, per preset, the matrix with the date it was
measured. The default folder lies beside the label memory: `$CRYSTAL_LOCATOR_CALIBRATIONS`, else
`$XDG_DATA_HOME/crystal-locator/calibrations`, else `~/.local/share/crystal-locator/calibrations`.

Files are written atomically with the mode the umask gives new files (colleagues on the instrument PC
read them). A file this release cannot use is never overwritten:

- unreadable, not a calibration, or of an unknown format version: `load` raises
  `CalibrationStoreError` naming the file; the file is kept where it is;
- holding another instrument's calibration: refused the same way;
- a new calibration of the instrument (`save`, after `--recalibrate` or `crystal-locator calibrate`)
  first moves such a file aside as `<file>.<reason>-<UTC date-time>` (reason `corrupt` or
  `other-instrument`) and says so in the log, then writes the new file.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from agent.config import user_data_dir
from agent.steps.stage_calibration import CalibrationFileError, CalibrationSet

logger = logging.getLogger(__name__)

#: Environment variable that overrides the default store folder.
CALIBRATIONS_ENV_VAR = "CRYSTAL_LOCATOR_CALIBRATIONS"


class CalibrationStoreError(ValueError):
    """The stored calibration of an instrument cannot be used (corrupt, unknown version, another
    instrument's); the message names the file and says what to do. The file is left as it is."""


def default_calibrations_dir() -> Path:
    """The per-user store folder (see the module docstring). Not created here."""
    return user_data_dir("calibrations", CALIBRATIONS_ENV_VAR)


def instrument_file_name(instrument: str) -> str:
    """The store's file name for `instrument` (unsafe characters replaced by `_`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", instrument).lstrip(".") or "instrument"
    return f"{safe}.json"


class CalibrationStore:
    """The calibrations of instruments, one file each, in `folder` (created when first written)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, instrument: str) -> Path:
        """Where the calibration of `instrument` is kept."""
        return self.folder / instrument_file_name(instrument)

    def load(self, instrument: str) -> CalibrationSet | None:
        """The stored calibration of `instrument`, or None when there is none yet. Raises
        `CalibrationStoreError` when the file is corrupt, of an unknown version, or another instrument's."""
        path = self.path(instrument)
        if not path.exists():
            return None
        aside = f"{path.name}.<reason>-<date>"
        try:
            calibration = CalibrationSet.load(path)
        except CalibrationFileError as exc:
            raise CalibrationStoreError(
                f"stored calibration refused: {exc}. The file is kept: move it away, or measure again with "
                f"--recalibrate (which keeps the file as {aside})"
            ) from exc
        if calibration.instrument != instrument:
            raise CalibrationStoreError(
                f"stored calibration refused: {path} holds the calibration of instrument "
                f"{calibration.instrument!r}, not of this microscope {instrument!r}. The file is kept: move it "
                f"away, or measure again with --recalibrate (which keeps the file as {aside})"
            )
        return calibration

    def save(self, calibration: CalibrationSet) -> Path:
        """Store `calibration` for its instrument, merged over the presets already stored (its own win).

        A file there that is not this instrument's usable calibration is moved aside first (see the module
        docstring), never overwritten. Returns the path written."""
        path = self.path(calibration.instrument)
        merged = calibration
        current = self._usable(path, calibration.instrument)
        if current is not None:
            merged = current.model_copy(update={"presets": {**current.presets, **calibration.presets}})
        self.folder.mkdir(parents=True, exist_ok=True)
        written = merged.save(path)
        logger.info("stored the calibration of %s (%s) in %s", merged.instrument, ", ".join(merged.presets), path)
        return written

    def _usable(self, path: Path, instrument: str) -> CalibrationSet | None:
        """The calibration in `path` if it is `instrument`'s and readable; otherwise the file (if any) is
        moved aside and None returned."""
        if not path.exists():
            return None
        try:
            calibration = CalibrationSet.load(path)
        except CalibrationFileError:
            self._set_aside(path, "corrupt")
            return None
        if calibration.instrument != instrument:
            self._set_aside(path, "other-instrument")
            return None
        return calibration

    @staticmethod
    def _set_aside(path: Path, reason: str) -> Path:
        """Rename `path` to `<path>.<reason>-<UTC date-time>[-n]` (never replacing a file); returns it."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        for attempt in range(1000):
            aside = path.with_name(f"{path.name}.{reason}-{stamp}" + (f"-{attempt}" if attempt else ""))
            if aside.exists():
                continue
            try:
                os.link(path, aside)  # fails if `aside` appeared meanwhile: nothing is ever replaced
                path.unlink()
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                os.rename(path, aside)
            logger.warning("kept the unusable calibration file %s as %s (%s)", path, aside, reason)
            return aside
        raise CalibrationStoreError(f"cannot move {path} aside; move it away by hand")
