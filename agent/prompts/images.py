"""A prompt's PNG images: the checks every image passes (name, PNG signature, size) and saving them to disk.

Images travel as raw binary frames after a prompt's JSON header (see `agent.prompts.wire`); they are made
with `drivers.formats.images.encode_png`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from agent.prompts.wire import PromptInfo

#: Largest PNG image a prompt may carry, bytes.
MAX_IMAGE_BYTES = 32 * 1024 * 1024

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_png_images(value: dict[str, bytes]) -> dict[str, bytes]:
    """`value` (image name -> PNG bytes) unchanged if every name and image is acceptable; `ValueError` if not."""
    for name, payload in value.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"image name {name!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
        if not isinstance(payload, (bytes, bytearray)) or not bytes(payload[:8]) == PNG_SIGNATURE:
            raise ValueError(f"image {name!r} must be PNG bytes (use drivers.formats.images.encode_png)")
        if len(payload) > MAX_IMAGE_BYTES:
            raise ValueError(f"image {name!r} is {len(payload)} bytes; the limit is {MAX_IMAGE_BYTES}")
    return value


def save_prompt_images(info: PromptInfo, folder: str | Path) -> list[Path]:
    """Write a received prompt's PNG images to `folder/<prompt id>/<name>.png` (atomically)."""
    from drivers.formats.images import write_atomic

    target = Path(folder) / _safe_component(info.id)
    paths = []
    for name, payload in info.images.items():
        filename = name if name.lower().endswith(".png") else f"{name}.png"
        paths.append(write_atomic(target / _safe_component(filename), payload))
    return paths


def _safe_component(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned[:100] or "unnamed"
