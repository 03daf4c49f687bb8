"""The files a module runs: its static import closure within this repository.

Two things need the exact set of source files behind an entry point: dvc.yaml, whose code deps
must be what each stage runs (tests/test_stage_graph.py checks them against this), and the
registered model, which ships the code it imports and nothing else. Python's own
``modulefinder`` follows every third-party import (minutes over torch and transformers) and is
deprecated for new code; import-linter builds a graph of whole packages, not the file set of one
entry point. The rule here is small: every ``import`` / ``from ... import`` anywhere in a file
(function-level imports included, so lazy imports count), resolved to a file of this repository;
importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository (or install) root holding vift/ and flows/
PACKAGES = ("vift", "flows")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Modules of PACKAGES named by the imports in ``path`` (which is ``module``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in PACKAGES}


def closure(*modules: str, root: Path = ROOT) -> list[Path]:
    """Every file of this repository that importing ``modules`` runs, relative to ``root``, sorted."""
    seen: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in seen or (path := module_file(prefix, root)) is None:
                continue
            seen[prefix] = path
            pending.extend(imported_modules(path, prefix))
    return sorted(path.relative_to(root) for path in seen.values())
