"""Training throughput: the stage trainer vs a hand-written torch loop; grouped vs ordinary batches.

Builds its own tiny LVLM and ShapeTally data in a temporary directory and measures, in one run:

- ``trainer_over_torch_loop``: non-padding tokens/s of ``StageTrainer`` (what the training
  stages run) divided by those of a minimal torch loop (forward, backward, clip, AdamW step) on
  the same model, optimizer, batches and collation: what the Trainer's bookkeeping costs.
- ``grouped_over_dynamic``: useful (non-padding) tokens/s with modality-grouped batches divided by
  those with ordinary shuffled (modality-mixed) batches padded to their own longest sample, the
  strongest honest baseline; ``grouped_over_fixed`` against batches padded to ``max_length``.

Every configuration runs once per round, ``--rounds`` rounds, the order rotating between rounds
(:mod:`vift.perf.timing`); each ratio is taken within a round and reported as the median of the
rounds with its range. A round's throughput counts the steps after ``--warmup``, from the end of
one optimizer step to the end of the next, so data loading and collation are included.
"""

from __future__ import annotations

import argparse
import copy
import resource
import tempfile
import time
from pathlib import Path

from vift.perf.timing import paired_ratio, spread

FLOORS = {"trainer_over_torch_loop": 0.95}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--max-length", type=int, default=128, help="max tokens; the padded baseline's length (default 128)")
    parser.add_argument("--records", type=int, default=512, help="captions and text instructions generated (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every configuration (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")


def _torch_loop(model, loader, optimizer, max_grad_norm: float) -> list[float]:
    """Forward, backward, clip, step: the minimal loop. Returns the time at the end of every step."""
    import torch

    model.train()
    ends = []
    for batch in loader:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


def _batch_sizes(loader) -> list[tuple[int, int, int]]:
    """(useful tokens, padded tokens, samples) of every batch the loader yields."""
    return [(int(b["attention_mask"].sum()), b["attention_mask"].numel(), b["input_ids"].shape[0]) for b in loader]


def _steady_rate(ends: list[float], batches: list[tuple[int, int, int]], warmup: int) -> dict:
    """Useful tokens/s and samples/s of one round over the steps after ``warmup``."""
    measured = batches[warmup:]
    seconds = ends[-1] - ends[warmup - 1]
    return {
        "tokens_per_second": sum(b[0] for b in measured) / seconds,
        "samples_per_second": sum(b[2] for b in measured) / seconds,
        "padding_share": 1 - sum(b[0] for b in measured) / sum(b[1] for b in measured),
    }


def _build(root: Path, records: int, max_length: int):
    from vift.config.schema import DataParams, TinyModelParams
    from vift.data.generate import generate_shapetally, training_corpus
    from vift.data.manifests import Manifest
    from vift.model.tiny import build_tiny_lvlm
    from vift.train.collate import ConversationDataset
    from vift.train.sampler import Mixture

    data = DataParams(backbone_text=records, captions=records, text_instructions=records, visual_instructions=0, calibration=0, test=0)
    generate_shapetally(data, root)

    model, processor = build_tiny_lvlm(TinyModelParams(), data.image_size, training_corpus(root), seed=0)

    def dataset(split):
        return ConversationDataset(list(Manifest(root / f"{split}.jsonl", "conversation", root)), processor, root, max_length)

    mixture = Mixture(
        {"captions": dataset("captions"), "text_instructions": dataset("text_instructions")}, {"captions": 0.5, "text_instructions": 0.5}
    )
    return model, processor, mixture


def run(args: argparse.Namespace) -> dict:
    # torch and transformers load here, not at import: `vift --help` builds this module's parser.
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    from vift.config.schema import StageTrainParams
    from vift.train.collate import PaddingCollator
    from vift.train.sampler import GroupedBatchSampler
    from vift.train.stage import training_arguments
    from vift.train.trainer import StageTrainer

    class StepClock(TrainerCallback):
        """The time at the end of every optimizer step."""

        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 1 or args.steps < 1:
        raise ValueError("--warmup and --steps must be at least 1")
    steps = args.warmup + args.steps
    stage = StageTrainParams(
        trainable=["projector", "language_model"],
        learning_rate=3e-4,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        save_steps=steps,
        logging_steps=10,
    )
    with tempfile.TemporaryDirectory(prefix="vift-bench-train-") as scratch:
        started = time.perf_counter()
        model, processor, mixture = _build(Path(scratch) / "data", args.records, args.max_length)
        # The text stage's setting: the vision tower stays frozen, the rest trains.
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "vision_tower" not in name
        setup_seconds = time.perf_counter() - started
        pad = processor.tokenizer.pad_token_id
        train_args = training_arguments(stage, steps, 1, Path(scratch) / "checkpoints")
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(train_args)

        def grouped_sampler():
            return GroupedBatchSampler(mixture, args.batch_size, 1, steps, seed=0)

        def grouped_loader():
            return torch.utils.data.DataLoader(mixture, batch_sampler=grouped_sampler(), collate_fn=PaddingCollator(pad))

        def loop(loader):
            copied = copy.deepcopy(model)
            optimizer = optimizer_cls([p for p in copied.parameters() if p.requires_grad], **optimizer_kwargs)
            return _torch_loop(copied, loader, optimizer, stage.max_grad_norm)

        def trainer_run():
            clock = StepClock()
            trainer = StageTrainer(
                model=copy.deepcopy(model),
                args=train_args,
                train_dataset=mixture,
                data_collator=PaddingCollator(pad),
                processing_class=processor,
                callbacks=[clock],
                stage_name="bench",
                stage_params=stage,
                batch_sampler=grouped_sampler(),
            )
            trainer.remove_callback(ProgressCallback)
            trainer.train()
            return clock.ends

        def mixed_loader(pad_to: int | None):
            # Uniformly shuffled (modality-mixed) batches: padded to their longest sample, or to max_length.
            order = torch.utils.data.RandomSampler(mixture, num_samples=steps * args.batch_size, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(
                mixture, batch_size=args.batch_size, sampler=order, collate_fn=PaddingCollator(pad, pad_to=pad_to)
            )

        runs = {
            "loop": lambda: loop(grouped_loader()),
            "trainer": trainer_run,
            "dynamic": lambda: loop(mixed_loader(None)),
            "fixed": lambda: loop(mixed_loader(args.max_length)),
        }
        ends: dict[str, list[list[float]]] = {name: [] for name in runs}
        names = list(runs)
        for index in range(args.rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                ends[name].append(runs[name]())
        batches = {
            "loop": _batch_sizes(grouped_loader()),
            "dynamic": _batch_sizes(mixed_loader(None)),
            "fixed": _batch_sizes(mixed_loader(args.max_length)),
        }
        batches["trainer"] = batches["loop"]

    rates = {name: [_steady_rate(e, batches[name], args.warmup) for e in ends[name]] for name in runs}

    def tokens(name):
        return [r["tokens_per_second"] for r in rates[name]]

    result = {
        "trainer_over_torch_loop": paired_ratio(tokens("trainer"), tokens("loop")),
        "grouped_over_dynamic": paired_ratio(tokens("loop"), tokens("dynamic")),
        "grouped_over_fixed": paired_ratio(tokens("loop"), tokens("fixed")),
        "useful_tokens_per_second": {name: spread(tokens(name), 1) for name in runs},
        "padding_share": {name: round(rates[name][0]["padding_share"], 3) for name in ("loop", "dynamic", "fixed")},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "steps_measured": args.steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "torch_threads": torch.get_num_threads(),
        "setup_seconds": round(setup_seconds, 1),
        "floors": FLOORS,
    }
    result["meets_floors"] = {key: result[key]["median"] >= floor for key, floor in FLOORS.items()}
    return result
