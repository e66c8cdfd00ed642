"""Typed errors of the locator (`agent.locate`).

Every error is a `ValueError` subclass so that callers that only know "bad input" still catch it; the
message says what was wrong and what to do.
"""

from __future__ import annotations


class LocateError(ValueError):
    """Base class of every error raised by `agent.locate`."""


class ImageInputError(LocateError):
    """The image cannot be analysed: not 2-D, unsupported dtype, non-finite values, too small."""


class SettingsError(LocateError):
    """Locator settings do not fit the image: grid finer than the image, window larger than the image,
    k larger than the number of patches, unknown cluster ids, bad reference cells."""
