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


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key; the base class raises its own error for it
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first.line + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


MAX_YAML_DEPTH = 32  # parameters nest four levels; anything far deeper is not a parameters file


def _depth(value: Any, limit: int = MAX_YAML_DEPTH) -> int:
    # Each container once: YAML aliases share objects, and expanding them is the "billion laughs".
    stack, deepest, seen = [(value, 1)], 0, set()
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if id(node) in seen:
            continue
        seen.add(id(node))
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed with the strict safe loader; every failure is a UserError naming ``source``."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}", exit_code=2) from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a parameters file", exit_code=2) from None
    except ValueError as error:  # e.g. an integer over Python's 4,300-digit conversion limit
        raise UserError(f"{source}: unreadable value: {error}", exit_code=2) from None
    if _depth(value) > MAX_YAML_DEPTH:
        raise UserError(f"{source}: nested more than {MAX_YAML_DEPTH} levels deep: not a parameters file", exit_code=2)
    return value


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: no such parameters file (run `vift params use tiny` to create one)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}): save it as UTF-8", exit_code=2) from None
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror or error}") from None
    return parse_yaml(text, str(path))


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
        pairs[key.strip()] = parse_yaml(value, f"override {item[:80]!r}")
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
