"""Stage ``train_vit`` (baseline): visual instructions mixed with captions at the text stage's
compute (same optimizer steps, batch size and mix ratio); caption -> vit. For comparison only.

Without a ``visual_instructions`` split (ViFT's whole point is not needing one) the stage records
that it was skipped instead of failing: ``models/vit`` then holds only ``SKIPPED.json``, and the
evaluate stage leaves the ``vit_baseline`` row out of the table.
"""

from __future__ import annotations

from vift import paths
from vift.config.schema import Params
from vift.io import atomic_directory, atomic_write_json
from vift.train.report import write_stage_report
from vift.train.stage import VIT_STAGE, train_stage

SKIPPED_FILE = "SKIPPED.json"


def run(params: Params) -> None:
    manifest = paths.manifest("visual_instructions")
    if manifest.exists():
        train_stage(VIT_STAGE, params)
        return
    reason = f"{manifest} does not exist: no visual instructions, so no baseline (the vit_baseline row is left out)"
    with atomic_directory(paths.VIT_MODEL) as out:
        atomic_write_json(out / SKIPPED_FILE, {"stage": VIT_STAGE.name, "skipped": reason})
    write_stage_report(VIT_STAGE.name, {"skipped": reason}, [], {}, {"skipped": reason})
    print(f"train_vit: skipped: {reason}", flush=True)
