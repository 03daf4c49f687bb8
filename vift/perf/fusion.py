"""Fused generation cost, measured so that it cannot flatter (:mod:`vift.perf.timing`).

Builds the preset's tiny architecture (random weights: speed does not depend on them) and
ShapeTally questions in a temporary directory, at the settings the pipeline uses (the preset's
``eval.batch_size`` and ``eval.max_new_tokens``) unless told otherwise; ``--image-size`` makes
long prompts (384 px at patch 16: 576 image tokens, as LLaVA-1.5). Every candidate runs once per
round, rounds interleaved after a warm-up; each ratio is the median of per-round ratios, with its
range. Baselines: plain generation at the same batch (the cost fusion adds), the reference
algorithm at the same batch (what vift's batching and position handling are worth beyond
batching itself) and at batch 1 (the reference as published). Two reference points, measured in
the same rounds: ``prefill_share_of_plain`` (one image+question pass through the model, vision
tower included, no logits, over plain generation: what any method that re-runs the prompt pays
per pass) and ``plain_plus_two_passes_over_plain`` (plain generation plus that pass plus a
text-only pass: fusion implemented as separate full passes). vift's fused path is below the
latter because it prefills the shared prefix (image included) once and runs only the fused suffix
twice (:mod:`vift.fusion.method`), and stops capturing after the last fused layer.
``compute_floor_over_plain`` is what that path cannot go below: plain generation plus the extra
tokens it prefills (the suffix once more, and the text-only prompt) at the measured prefill cost
per prompt token, ``1 + prefill_share × (suffix + text prompt) / prompt`` (an upper bound of the
floor: both captures stop early).
"""

from __future__ import annotations

import argparse

from vift.perf.timing import interleaved, paired_ratio, spread


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="architecture, data and eval settings to use (default tiny)")
    parser.add_argument("--batch-size", type=int, help="default: the preset's eval.batch_size")
    parser.add_argument("--new-tokens", type=int, help="default: the preset's eval.max_new_tokens")
    parser.add_argument("--image-size", type=int, help="pixels per side (default: the preset's data.image_size)")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (default 7), after one warm-up round")
    parser.add_argument("--no-per-sample", action="store_true", help="skip the reference at batch 1 (slow at long prompts)")


def reference_fused_generate(model, adapter, processor, images, questions, spec, generate_kwargs):
    """The reference's algorithm: a text-only prefill and an image prefill keeping every layer's
    hidden states, then a steered generate that adds on the last L positions. The reference runs
    one sample at a time; batched here (left-padded) it does the same arithmetic, so it is the
    equal-batch baseline (its last-L alignment is exact per sample only: timing, not answers)."""
    import torch

    from vift.model.loading import decoder_layers

    image_inputs = adapter.image_inputs(processor, images, questions, model.device)
    text_inputs = adapter.text_inputs(processor, questions, model.device)
    with torch.inference_mode():
        text_hidden = model(**text_inputs, output_hidden_states=True).hidden_states
        image_hidden = model(**image_inputs, output_hidden_states=True).hidden_states
        length = text_inputs["input_ids"].shape[1]
        layers = decoder_layers(model)
        start, end = spec.layer_range(len(layers))
        done: set[int] = set()

        def hook(index):
            def add(module, args):
                if index not in done:
                    done.add(index)
                    args[0][:, -length:] += spec.a * text_hidden[index] - spec.b * image_hidden[index][:, -length:]

            return add

        handles = [layers[i].register_forward_pre_hook(hook(i)) for i in range(start, end)]
        try:
            return model.generate(**image_inputs, **generate_kwargs)
        finally:
            for handle in handles:
                handle.remove()


def run(args: argparse.Namespace) -> dict:
    # torch loads here, not at import: `vift --help` builds this module's parser.
    import tempfile
    from pathlib import Path

    from vift.config import load_preset
    from vift.data.generate import training_corpus
    from vift.model.tiny import build_tiny_lvlm

    params = load_preset(args.preset)
    batch = args.batch_size or params.eval.batch_size
    new_tokens = args.new_tokens or params.eval.max_new_tokens
    image_size = args.image_size or params.data.image_size
    with tempfile.TemporaryDirectory(prefix="vift-bench-") as scratch:
        root = Path(scratch) / "data"
        records, images = bench_questions(params.data, image_size, batch, root)
        model, processor = build_tiny_lvlm(params.model.tiny, image_size, training_corpus(root))
    model.eval()
    from vift.perf import memory

    result = measure(
        model, processor, images, [r.question for r in records], batch, new_tokens, args.rounds, not args.no_per_sample,
        peak_memory=memory.peak_growth_bytes if memory.available() else None,
    )  # fmt: skip
    result["settings"] = {"preset": args.preset, **result["settings"]}
    if memory.available():
        result["peak_memory_measure"] = memory.CPU_MEASURE
    return result


def bench_questions(data_params, image_size: int, batch: int, root):
    """``batch`` ShapeTally test records and their images, generated under ``root``."""
    from vift.data.generate import generate_shapetally
    from vift.data.manifests import Manifest
    from vift.eval.runner import load_images

    update = {"backbone_text": 200, "captions": 50, "text_instructions": 50, "visual_instructions": 10, "calibration": 0, "test": batch}
    data = data_params.model_copy(update={**update, "image_size": image_size})
    generate_shapetally(data, root)
    records = list(Manifest(root / "test.jsonl", "vqa"))
    return records, load_images(records, root)


def measure(
    model, processor, images, questions, batch: int, new_tokens: int, rounds: int, per_sample: bool, synchronize=None, peak_memory=None
) -> dict:
    """The figures of this module for one model, on its device. ``synchronize``: called after every
    candidate (e.g. ``torch.cuda.synchronize``), so asynchronous devices are timed to completion;
    ``peak_memory(fn)``: the peak bytes ``fn`` needs (CUDA: allocated, weights included; CPU:
    resident growth above the level before the call, :mod:`vift.perf.memory`), measured for plain
    and fused generation after the timed rounds, each after its own warm-up."""
    import torch

    from vift.fusion.families import adapter_for
    from vift.fusion.method import FusionSpec, fused_generate, fused_positions, prefill_prefix, shared_prefix_layout
    from vift.model.loading import decoder_layers

    adapter = adapter_for(model)
    image_inputs = adapter.image_inputs(processor, images, questions, model.device)
    text_inputs = adapter.text_inputs(processor, questions, model.device)
    image_tokens = int((image_inputs["input_ids"][0] == model.config.image_token_id).sum())
    suffix_tokens = int(
        fused_positions(
            image_inputs["input_ids"], image_inputs["attention_mask"], text_inputs["input_ids"], text_inputs["attention_mask"], "question"
        )
        .sum(dim=1)
        .max()
    )
    generate_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    layers = len(decoder_layers(model))
    # The pipeline's calibration searches question positions; additive, a and b non-zero.
    full = FusionSpec(a=0.5, b=0.5, positions="question")
    upper = FusionSpec(a=0.5, b=0.5, positions="question", layer_start=layers // 2)

    def synced(fn):
        if synchronize is None:
            return fn
        return lambda: (fn(), synchronize())

    def generate(spec):
        return lambda: fused_generate(model, processor, images, questions, spec, batch_size=batch, **generate_kwargs)

    def prefill(inputs):
        def run_once():
            with torch.inference_mode():
                model.model(**inputs)  # through the decoder, no logits: what a capture pass must compute

        return run_once

    def fused_layout() -> tuple[dict, int]:
        """The image prompt laid out as the shared-prefix path lays it out ([pad, prefix | pad,
        suffix]), inputs built as fused_generate builds them (inside the timed call, as there), and
        the prefix length."""
        image_batch = adapter.image_inputs(processor, images, questions, model.device)
        text_batch = adapter.text_inputs(processor, questions, model.device)
        mask = fused_positions(
            image_batch["input_ids"], image_batch["attention_mask"], text_batch["input_ids"], text_batch["attention_mask"], "question"
        )
        laid, _, p_len = shared_prefix_layout(image_batch, mask, model.generation_config.pad_token_id or 0)
        return laid, p_len

    def plain_in_fused_layout():
        """Plain generation with the prompt in the fused path's layout: the layout alone can change
        the speed of a forward (masked rows, attention kernels), so this is the plain baseline that
        layout cannot flatter."""
        laid, _ = fused_layout()
        with torch.inference_mode():
            model.generate(**laid, **generate_kwargs)

    def plain_split_prefill():
        """Plain generation the way the fused path prefills: the prompt's prefix (image included; the
        same length in every sample of a batch of one-image questions, so it needs no padding mask)
        in one pass into the KV cache, then the suffix and the answer from it. Any server could
        prefill plain prompts this way, so it is the plain baseline the fused path's prefill
        cannot flatter (a left-padded prompt takes the attention kernel's masked path)."""
        cache, suffix_inputs = prefill_prefix(model, *fused_layout())
        with torch.inference_mode():
            model.generate(**suffix_inputs, cache=cache, **generate_kwargs)

    def reference_batched():
        reference_fused_generate(model, adapter, processor, images, questions, full, generate_kwargs)

    def reference_per_sample():
        for image, question in zip(images, questions):
            reference_fused_generate(model, adapter, processor, [image], [question], full, generate_kwargs)

    candidates = {
        "plain": generate(None),
        "plain_in_fused_layout": plain_in_fused_layout,
        "plain_split_prefill": plain_split_prefill,
        "fused": generate(full),
        "fused_upper_half": generate(upper),
        "reference_same_batch": reference_batched,
        "image_prefill": prefill(image_inputs),
        "text_prefill": prefill(text_inputs),
    }
    if per_sample:
        candidates["reference_batch_1"] = reference_per_sample
    times = interleaved({name: synced(fn) for name, fn in candidates.items()}, rounds)
    two_passes = [p + i + t for p, i, t in zip(times["plain"], times["image_prefill"], times["text_prefill"])]
    prompt_tokens = int(image_inputs["input_ids"].shape[1])
    text_tokens = int(text_inputs["input_ids"].shape[1])
    result = {
        "settings": {
            "batch_size": batch,
            "new_tokens": new_tokens,
            "image_tokens": image_tokens,
            "prompt_tokens": prompt_tokens,
            "text_prompt_tokens": text_tokens,
            "fused_suffix_tokens": suffix_tokens,
            "decoder_layers": layers,
            "fused_layers": [0, layers],
            "upper_half_layers": [layers // 2, layers],
            "threads": torch.get_num_threads(),
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "rounds": rounds,
        },
        "fused_over_plain": paired_ratio(times["fused"], times["plain"]),
        "fused_over_plain_in_fused_layout": paired_ratio(times["fused"], times["plain_in_fused_layout"]),
        "plain_in_fused_layout_over_plain": paired_ratio(times["plain_in_fused_layout"], times["plain"]),
        "fused_over_plain_split_prefill": paired_ratio(times["fused"], times["plain_split_prefill"]),
        "plain_split_prefill_over_plain": paired_ratio(times["plain_split_prefill"], times["plain"]),
        "plain_plus_two_passes_over_plain": paired_ratio(two_passes, times["plain"]),
        "prefill_share_of_plain": paired_ratio(times["image_prefill"], times["plain"]),
        "fused_upper_half_over_plain": paired_ratio(times["fused_upper_half"], times["plain"]),
        "reference_same_batch_over_fused": paired_ratio(times["reference_same_batch"], times["fused"]),
        "seconds_per_sample": {name: spread([t / batch for t in values], 6) for name, values in times.items()},
    }
    share = result["prefill_share_of_plain"]["median"]
    result["compute_floor_over_plain"] = round(1 + share * (suffix_tokens + text_tokens) / prompt_tokens, 4)
    if "reference_batch_1" in times:
        result["reference_batch_1_over_fused"] = paired_ratio(times["reference_batch_1"], times["fused"])
    if peak_memory is not None:
        peaks = {}
        for name in ("plain", "plain_split_prefill", "fused", "fused_upper_half"):
            candidates[name]()  # warm-up: one-time allocations are not the call's
            peaks[name] = peak_memory(candidates[name])
        result["peak_memory_bytes"] = peaks
        result["fused_peak_memory_over_plain"] = round(peaks["fused"] / peaks["plain"], 4)
        result["fused_peak_memory_over_plain_split_prefill"] = round(peaks["fused"] / peaks["plain_split_prefill"], 4)
    return result
