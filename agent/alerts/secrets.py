"""Secrets of the alert channels (a webhook URL, an SMTP user and password): read from a file or an
environment variable named in the plan, and kept out of every text that is written or sent on.

A secret file should be readable by its owner alone: one that its group or others may read gets a warning
in the log (naming the file and its mode, never its content). Errors name the file or the variable, never
the value.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

REDACTED = "[secret]"


class AlertConfigError(ValueError):
    """An alert channel cannot be set up: a secret file or variable is missing, empty or malformed."""


def read_secret(file: str | None, env: str | None, what: str) -> str:
    """The secret in `file` (first line, whitespace stripped; `~` expanded) or in the environment variable
    named `env`; `what` says what it is in messages (e.g. "the webhook URL"). `AlertConfigError` when it is
    missing or empty."""
    if file is not None:
        path = Path(file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AlertConfigError(f"{what}: the file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AlertConfigError(f"{what}: cannot read {path} ({type(exc).__name__})") from None
        warn_if_readable_by_others(path)
        value = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise AlertConfigError(f"{what}: the file {path} is empty")
        return value
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise AlertConfigError(f"{what}: the environment variable {env} is not set (or empty)")
        return value
    raise AlertConfigError(f"{what}: the plan names neither a file nor an environment variable")


def warn_if_readable_by_others(path: Path) -> bool:
    """Log a warning (and return True) if the group or others may read `path` (POSIX permissions only)."""
    if os.name != "posix":
        return False
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("%s holds a secret but its group or others may read it (mode %03o): chmod 600 it", path, mode)
        return True
    return False


def split_credentials(value: str, where: str) -> tuple[str, str]:
    """`user:password` -> (user, password), split at the first colon; `where` names the file or variable."""
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise AlertConfigError(f"SMTP credentials in {where}: expected one line user:password")
    return user, password


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret (of 4 characters or more) replaced by `REDACTED`."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
