"""What the vendor adapters' JSON configs share: named presets (unique), lookup by name, loading from a file.

`drivers.temscript_adapter.TemscriptConfig` and `drivers.serialem_adapter.SerialEMConfig` subclass
`AdapterConfig`, each with its own preset model in `presets` and its own `ADAPTER` name for error messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from drivers.base import InvalidParameterError, PresetError

ConfigT = TypeVar("ConfigT", bound="AdapterConfig")


class AdapterConfig(BaseModel):
    """Base of an adapter's config: `presets` (each with a `name`), frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The adapter's name in error messages ("temscript", "SerialEM").
    ADAPTER: ClassVar[str] = "vendor"

    presets: tuple[Any, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> AdapterConfig:
        names = [p.name for p in self.presets]
        if len(set(names)) != len(names):
            raise ValueError(f"preset names must be unique, got {names}")
        return self

    def preset(self, name: str) -> Any:
        """The preset called `name`; `PresetError` listing the known names otherwise."""
        for preset in self.presets:
            if preset.name == name:
                return preset
        raise PresetError(f"unknown optics preset {name!r}; configured: {', '.join(p.name for p in self.presets)}")

    @classmethod
    def from_file(cls: type[ConfigT], path: str | os.PathLike[str]) -> ConfigT:
        """Load a JSON config; `InvalidParameterError` naming the file and the problem (on one line)."""
        file_path = Path(path)
        try:
            return cls.model_validate(json.loads(file_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError) as exc:
            problem = str(exc).replace("\n", " ")
            raise InvalidParameterError(f"{file_path}: not a valid {cls.ADAPTER} adapter config: {problem}") from None
