"""One thin module per DVC stage: read params, call the library, write outs.

A stage is a module here with ``run(params)``; its name is the module's name.
"""

from __future__ import annotations

import importlib
import pkgutil

from vift.errors import UserError

STAGES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def run_stage(name: str, params) -> None:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", exit_code=2)
    importlib.import_module(f"vift.stages.{name}").run(params)
