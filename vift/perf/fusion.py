"""Fused generation cost: fused vs plain, and batched vs the reference's per-sample three prefills.

Builds the tiny default architecture (random weights: speed does not depend on them) and ShapeTally
questions in a temporary directory; every figure is a ratio of timings taken in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="architecture and data shape to use (default tiny)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions; medians are reported")


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reference_fused_generate(model, adapter, processor, image, question, spec, generate_kwargs):
    """The reference's way for one sample: text-only prefill and image prefill with every layer's
    hidden states, then a steered generate that adds on the last L positions."""
    import torch

    from vift.model.loading import decoder_layers

    image_inputs = adapter.image_inputs(processor, [image], [question], model.device)
    text_inputs = adapter.text_inputs(processor, [question], model.device)
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
    import torch

    from vift.config import load_preset
    from vift.data.generate import generate_shapetally, training_corpus
    from vift.data.manifests import Manifest
    from vift.eval.runner import load_images
    from vift.fusion.families import adapter_for
    from vift.fusion.method import FusionSpec, fused_generate
    from vift.model.loading import decoder_layers
    from vift.model.tiny import build_tiny_lvlm

    params = load_preset(args.preset)
    data = params.data.model_copy(
        update={
            "backbone_text": 200,
            "captions": 50,
            "text_instructions": 50,
            "visual_instructions": 10,
            "calibration": 0,
            "test": args.batch_size,
        }
    )
    with tempfile.TemporaryDirectory(prefix="vift-bench-") as scratch:
        root = Path(scratch) / "data"
        generate_shapetally(data, root)
        model, processor = build_tiny_lvlm(params.model.tiny, data.image_size, training_corpus(root))
        records = list(Manifest(root / "test.jsonl", "vqa"))
        images = load_images(records, root)
    model.eval()
    questions = [r.question for r in records]
    n = len(questions)
    generate_kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    layers = len(decoder_layers(model))
    full = FusionSpec(a=0.5, b=0.5, positions="text_prompt")
    upper = FusionSpec(a=0.5, b=0.5, positions="text_prompt", layer_start=layers // 2)
    adapter = adapter_for(model)

    def batched(spec):
        return lambda: fused_generate(model, processor, images, questions, spec, batch_size=args.batch_size, **generate_kwargs)

    def per_sample_reference():
        for image, question in zip(images, questions):
            reference_fused_generate(model, adapter, processor, image, question, full, generate_kwargs)

    plain = _median_seconds(batched(None), args.repeats)
    fused_full = _median_seconds(batched(full), args.repeats)
    fused_upper = _median_seconds(batched(upper), args.repeats)
    reference = _median_seconds(per_sample_reference, max(1, args.repeats // 2))
    return {
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "decoder_layers": layers,
        "threads": torch.get_num_threads(),
        "plain_seconds_per_sample": plain / n,
        "fused_seconds_per_sample": fused_full / n,
        "fused_over_plain": fused_full / plain,
        "fused_upper_half_over_plain": fused_upper / plain,
        "reference_seconds_per_sample": reference / n,
        "batched_over_per_sample": reference / fused_full,
    }
