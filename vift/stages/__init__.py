"""One thin module per DVC stage: read params, call the library, write outs."""

from __future__ import annotations

import importlib

STAGES = ("data", "base")


def run_stage(name: str, params) -> None:
    if name not in STAGES:
        from vift.errors import UserError

        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", exit_code=2)
    importlib.import_module(f"vift.stages.{name}").run(params)
