"""Validated parameters: one pydantic schema, YAML presets, the active parameters file."""

from vift.config.load import (
    ACTIVE_PARAMS,
    PRESETS_DIR,
    apply_overrides,
    available_presets,
    load_params,
    load_preset,
    write_params,
)
from vift.config.schema import Params

__all__ = [
    "ACTIVE_PARAMS",
    "PRESETS_DIR",
    "Params",
    "apply_overrides",
    "available_presets",
    "load_params",
    "load_preset",
    "write_params",
]
