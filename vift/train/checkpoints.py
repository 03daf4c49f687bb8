"""Training checkpoints under ``.vift/checkpoints/<stage>/``: kept only for the very same run, whole or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vift.io import atomic_write_json

CHECKPOINTS_DIR = Path(".vift") / "checkpoints"


def files_signature(path: Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of the files under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path) if f != path else f.name): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def is_complete_checkpoint(directory: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last, so a checkpoint with a valid one is whole."""
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
        return state.get("global_step") == int(directory.name.rpartition("-")[2])
    except (OSError, ValueError):
        return False


def latest_checkpoint(directory: Path) -> Path | None:
    complete = [c for c in directory.glob("checkpoint-*") if c.is_dir() and is_complete_checkpoint(c)]
    return max(complete, key=lambda c: int(c.name.rpartition("-")[2]), default=None)


def prepare_checkpoints(directory: Path, fingerprint: dict, is_main: bool) -> Path | None:
    """Keep the checkpoints of this very run (and only whole ones); return the one to resume from."""
    marker = directory / "run.json"
    if is_main:
        try:
            same_run = json.loads(marker.read_text()) == fingerprint
        except (OSError, ValueError):
            same_run = False
        if not same_run:
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        for checkpoint in directory.glob("checkpoint-*"):
            if not is_complete_checkpoint(checkpoint):
                shutil.rmtree(checkpoint, ignore_errors=True)
        atomic_write_json(marker, fingerprint)
    return latest_checkpoint(directory)


def checkpoint_state(checkpoint: Path | None) -> dict:
    if checkpoint is None:
        return {"global_step": 0, "num_input_tokens_seen": 0}
    return json.loads((checkpoint / "trainer_state.json").read_text())
