"""Reading, validating, overriding and writing parameter files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vift.config.schema import Params
from vift.errors import UserError
from vift.io import atomic_write_text

PRESETS_DIR = Path(__file__).resolve().parents[2] / "params" / "presets"
ACTIVE_PARAMS = Path("params") / "params.yaml"


FIX_HINT = "Fix the fields above (see `vift params show` for a valid file)."


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid parameters:"]
    for item in error.errors():
        # A validator that re-raises an inner report (overrides checked against the schema) keeps
        # its own lines; pydantic's "Value error, " prefix and a second hint only add noise.
        message = item["msg"].removeprefix("Value error, ").replace(f"\n{FIX_HINT}", "")
        field = ".".join(str(part) for part in item["loc"])
        lines.append(f"  {field}: {message}" if field else f"  {message}")
    lines.append(FIX_HINT)
    return "\n".join(lines)


def validate_params(raw: Any, source: str) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level", exit_code=2)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise UserError(format_validation_error(source, error), exit_code=2) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such parameters file (run `vift params use tiny` to create one)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}", exit_code=2) from None


def load_params(path: str | Path = ACTIVE_PARAMS) -> Params:
    path = Path(path)
    return validate_params(_read_yaml(path), str(path))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> Params:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r}; available: {', '.join(available_presets())}", exit_code=2)
    raw = _read_yaml(path) or {}
    raw.setdefault("preset", name)
    return validate_params(raw, str(path))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1e-4", ...]`` -> ``{"a.b": 0.0001}``: values parsed as YAML scalars (see apply_overrides)."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. train.text.learning_rate=1e-4", 2)
        pairs[key.strip()] = yaml.safe_load(value)
    return pairs


def apply_overrides(params: Params, overrides: list[str] | dict[str, Any]) -> Params:
    """Return ``params`` with dotted-key overrides applied (``train.text.learning_rate=1e-4``).

    String values are parsed as YAML scalars, so ``3``, ``1e-4``, ``true`` and ``[0, 4]`` get their
    natural types; the result is validated as a whole.
    """
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
    raw = params.model_dump(mode="json")
    for key, value in pairs.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"override {key!r}: {part!r} is not a parameter section", exit_code=2)
            node = node[part]
        if parts[-1] not in node:
            raise UserError(f"override {key!r}: no such parameter", exit_code=2)
        node[parts[-1]] = value
    return validate_params(raw, "overrides")


def write_params(params: Params, path: str | Path = ACTIVE_PARAMS) -> Path:
    """Write the fully expanded parameters (every key explicit, so DVC tracks each) atomically."""
    path = Path(path)
    text = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
    header = f"# Active vift parameters (preset: {params.preset}). Edit, or `vift params use PRESET`.\n"
    atomic_write_text(path, header + text)
    return path
