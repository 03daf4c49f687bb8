"""The training mixture and its modality-grouped batch sampler.

A stage trains on a mixture of source splits (captions + text-only instructions, or captions +
visual instructions for the baseline) at fixed shares. As in the reference code, every batch is
drawn from one source, so it is all-image or all-text: text-only batches then carry no pixel
values and no image tokens, and padding stays short because samples of one source have similar
lengths.

How the global batch is formed. Let B be the per-device batch size, W the number of processes
and G the gradient accumulation steps. The sampler emits *global micro-batches* of B·W samples,
each from one source; rank r trains on the r-th slice of B samples of each. So at every
micro-step all ranks see the same source (and modality), and an optimizer step averages G
consecutive global micro-batches, which may come from different sources. A one-process run with
batch B·W therefore sees exactly the samples a W-process run sees, step for step.

The shares hold at every scale: the schedule is cut into blocks of ``BLOCK`` global micro-batches;
each block's source counts follow the cumulative target (largest remainder), and the order inside
a block is shuffled. Samples of a source are drawn without replacement from a fresh permutation
per pass over it; as in the reference's length-grouped sampler, each run of ``MEGABATCH`` global
micro-batches of a pass is sorted by length and cut into micro-batches whose order is shuffled,
so that a micro-batch pads little. Everything is a function of the seed: a resumed run draws the
same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vift.errors import UserError
from vift.train.collate import ConversationDataset

BLOCK = 16  # global micro-batches per shuffled block of the source schedule
MEGABATCH = 16  # global micro-batches sorted by length together
_SCHEDULE_STREAM = 1 << 20  # keeps the block-order random stream apart from the per-source ones


@dataclass(frozen=True)
class Source:
    """One split of the mixture: its records occupy ``[start, start + size)`` of the mixture."""

    name: str
    modality: str
    start: int
    size: int
    share: float
    lengths: tuple[int, ...]  # text length of each record, for length grouping


class Mixture(torch.utils.data.Dataset):
    """The concatenation of source datasets, with their target shares (which sum to 1)."""

    def __init__(self, datasets: dict[str, ConversationDataset], shares: dict[str, float]):
        self.datasets = {name: dataset for name, dataset in datasets.items() if shares.get(name, 0) > 0}
        total = sum(shares[name] for name in self.datasets)
        if not self.datasets or total <= 0:
            raise UserError("the training mixture is empty: every source has share 0")
        self.sources: list[Source] = []
        start = 0
        for name, dataset in self.datasets.items():
            if len(dataset) == 0:
                raise UserError(f"split {name!r} has no usable records but its share in the mixture is {shares[name]}")
            modalities = set(dataset.modality)
            if len(modalities) != 1:
                raise UserError(f"split {name!r} mixes samples with and without images; a source must be one modality")
            self.sources.append(Source(name, modalities.pop(), start, len(dataset), shares[name] / total, tuple(dataset.lengths)))
            start += len(dataset)
        self._ends = np.cumsum([s.size for s in self.sources])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def source_of(self, index: int) -> Source:
        return self.sources[int(np.searchsorted(self._ends, index, side="right"))]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source = self.source_of(index)
        return self.datasets[source.name][index - source.start]

    def epoch_samples(self) -> int:
        return epoch_samples({s.name: s.size for s in self.sources}, {s.name: s.share for s in self.sources})


def epoch_samples(sizes: dict[str, int], shares: dict[str, float]) -> int:
    """Samples in one epoch: the fewest in which every source is seen whole at its share."""
    total = sum(shares[name] for name in sizes)
    return max(int(np.ceil(size * total / shares[name])) for name, size in sizes.items())


def block_counts(shares: Sequence[float], block: int, index: int) -> list[int]:
    """Global micro-batches per source in block ``index``: cumulative largest-remainder rounding.

    Summed over blocks 0..k the counts are the rounded cumulative targets, so the realised share of
    every source stays within one micro-batch per source of its target after every block.
    """

    def cumulative(n: int) -> np.ndarray:
        exact = np.asarray(shares) * n
        counts = np.floor(exact).astype(int)
        remainder = n - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
        return counts

    return (cumulative(block * (index + 1)) - cumulative(block * index)).tolist()


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Per-device batches of mixture indices; each global micro-batch comes from one source.

    Yields ``num_micro_batches * world_size`` lists of ``batch_size`` indices, in the order
    (micro-batch 0: rank 0, rank 1, ...; micro-batch 1: rank 0, ...). Accelerate's batch-sampler
    shard hands batch ``i`` to rank ``i % world_size``, which gives each rank its slice; in one
    process the batches are used as they come.

    The sampler covers the whole run (``num_micro_batches`` = steps x accumulation), passing over
    each source as often as needed, so the Trainer sees one epoch and never depends on
    ``set_epoch`` reaching a wrapped sampler; a resume skips the batches already trained.
    """

    def __init__(self, mixture: Mixture, batch_size: int, world_size: int, num_micro_batches: int, seed: int):
        self.mixture = mixture
        self.batch_size = batch_size
        self.world_size = world_size
        self.num_micro_batches = num_micro_batches
        self.seed = seed

    def __len__(self) -> int:
        return self.num_micro_batches * self.world_size

    def source_schedule(self) -> list[int]:
        """Source index of every global micro-batch."""
        shares = [s.share for s in self.mixture.sources]
        schedule: list[int] = []
        block = 0
        while len(schedule) < self.num_micro_batches:
            counts = block_counts(shares, BLOCK, block)
            labels = np.repeat(np.arange(len(shares)), counts)
            np.random.default_rng((self.seed, _SCHEDULE_STREAM, block)).shuffle(labels)
            schedule.extend(labels.tolist())
            block += 1
        return schedule[: self.num_micro_batches]

    def global_micro_batches(self) -> Iterator[tuple[Source, list[int]]]:
        """``(source, indices)`` of every global micro-batch, ``batch_size * world_size`` indices each."""
        size = self.batch_size * self.world_size
        pools = [_Pool(source, self.seed, number, size) for number, source in enumerate(self.mixture.sources)]
        for number in self.source_schedule():
            yield self.mixture.sources[number], pools[number].take(size)

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.global_micro_batches():
            for rank in range(self.world_size):
                yield indices[rank * self.batch_size : (rank + 1) * self.batch_size]


class _Pool:
    """Draws a source's mixture indices without replacement, a fresh length-grouped order per pass."""

    def __init__(self, source: Source, seed: int, number: int, micro_batch: int):
        self.source = source
        self.seed = seed
        self.number = number
        self.micro_batch = micro_batch
        self.passes = 0
        self.queue: list[int] = []

    def next_pass(self) -> list[int]:
        """A permutation of the source, sorted by length within megabatches, micro-batches shuffled."""
        rng = np.random.default_rng((self.seed, self.number, self.passes))
        order = rng.permutation(self.source.size)
        lengths = np.asarray(self.source.lengths)
        span = self.micro_batch * MEGABATCH
        drawn: list[int] = []
        for begin in range(0, len(order), span):
            mega = order[begin : begin + span]
            mega = mega[np.argsort(-lengths[mega], kind="stable")]
            chunks = [mega[i : i + self.micro_batch] for i in range(0, len(mega), self.micro_batch)]
            for chunk in (chunks[i] for i in rng.permutation(len(chunks))):
                drawn.extend((chunk + self.source.start).tolist())
        return drawn

    def take(self, count: int) -> list[int]:
        while len(self.queue) < count:
            self.queue.extend(self.next_pass())
            self.passes += 1
        taken, self.queue = self.queue[:count], self.queue[count:]
        return taken
