"""Stage ``train_caption`` (ViFT stage 1): captions only, language model frozen; base -> caption."""

from __future__ import annotations

from vift.config.schema import Params
from vift.train.stage import CAPTION_STAGE, train_stage


def run(params: Params) -> None:
    train_stage(CAPTION_STAGE, params)
