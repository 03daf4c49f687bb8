"""Stage ``train_vit`` (baseline): visual instructions mixed with captions at the text stage's
compute (same optimizer steps, batch size and mix ratio); caption -> vit. For comparison only."""

from __future__ import annotations

from vift.config.schema import Params
from vift.train.stage import VIT_STAGE, run_stage


def run(params: Params) -> None:
    run_stage(VIT_STAGE, params)
