"""One thin module per DVC stage: read params, call the library, write outs.

A stage is a module here with ``run(params)``; its name is the module's name.
"""

from __future__ import annotations

import importlib

from vift.errors import UserError
from vift.paths import STAGES


def run_stage(name: str, params) -> None:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", exit_code=2)
    importlib.import_module(f"vift.stages.{name}").run(params)
