"""The records a training stage reads: nested data fractions, the caption/instruction mixture, steps."""

from __future__ import annotations

import math

from vift import paths
from vift.config.schema import StageTrainParams
from vift.data.manifests import Manifest
from vift.errors import UserError
from vift.train.collate import ConversationDataset
from vift.train.sampler import Mixture


def resolve_steps(stage_params: StageTrainParams, samples_per_epoch: int, processes: int) -> int:
    """Optimizer steps: ``max_steps`` if set, else ``num_train_epochs`` over the mixture."""
    if stage_params.max_steps > 0:
        return stage_params.max_steps
    global_batch = stage_params.per_device_train_batch_size * processes * stage_params.gradient_accumulation_steps
    return max(1, math.ceil(stage_params.num_train_epochs * samples_per_epoch / global_batch))


def fraction_size(records: int, fraction: float) -> int:
    """Records kept of ``records`` at ``train.data_fraction``: ceil(fraction * n), at least one.

    Rounded before the ceiling so that 0.1 * 120 keeps 12 records, not 13 (binary fractions).
    """
    if records == 0:
        return 0
    return max(1, min(records, math.ceil(round(fraction * records, 9))))


def load_records(split: str, policy: str, fraction: float = 1.0) -> list:
    """The split's usable records; the first ``fraction`` of them (nested: 25 % is a subset of 50 %)."""
    path = paths.manifest(split)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found; run `vift stage data` first")
    records = list(Manifest(path, "conversation", paths.DATA_DIR, policy=policy))
    return records[: fraction_size(len(records), fraction)]


def build_mixture(processor, shares: dict[str, float], max_length: int, policy: str, fraction: float = 1.0) -> Mixture:
    datasets = {
        split: ConversationDataset(load_records(split, policy, fraction), processor, paths.DATA_DIR, max_length)
        for split, share in shares.items()
        if share > 0
    }
    return Mixture(datasets, shares)


def count_records(split: str, policy: str, fraction: float = 1.0) -> int:
    usable = sum(1 for _ in Manifest(paths.manifest(split), "conversation", paths.DATA_DIR, policy=policy))
    return fraction_size(usable, fraction)
