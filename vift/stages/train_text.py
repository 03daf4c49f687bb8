"""Stage ``train_text`` (ViFT stage 2): text-only instructions mixed with captions; caption -> vift."""

from __future__ import annotations

from vift.config.schema import Params
from vift.train.stage import TEXT_STAGE, train_stage


def run(params: Params) -> None:
    train_stage(TEXT_STAGE, params)
