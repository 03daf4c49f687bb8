"""The GPU check: training MFU of a 0.5B-class LVLM in bf16, fused vs plain generation, peak memory.

One command for a CUDA machine (``vift bench gpu --json``; it runs on CPU too, slowly, and at
``--size tiny`` in the tests). It builds, with random weights (speed does not depend on them):

- ``0.5b``: a LLaVA of a SigLIP-base-sized tower (768 wide, 12 layers, patch 16: 576 image tokens at
  384 px) and a Qwen2.5-0.5B-shaped language model (896 wide, 24 layers, 14 heads, 2 KV heads, MLP
  4864), its vocabulary the tokenizer trained here (so the output layer is smaller than Qwen's);
- ``tiny``: the tiny default's architecture, for a quick run.

and measures, in one run:

- **Training** in the text stage's setting (projector + language model trained, vision tower
  frozen; AdamW; bf16 autocast on CUDA): steps on text-only batches and on image + caption
  batches of ``--max-length`` tokens, after warm-up. MFU = model FLOPs per second / the device's
  peak dense bf16 FLOPs (``--peak-tflops``, or a table of known devices). Model FLOPs per step:
  6 × trainable-and-frozen-LM parameters × tokens + the attention term 12 × layers × width × length
  per token (PaLM's accounting), plus 2 × vision parameters × image tokens for the frozen tower.
- **Generation** (:func:`vift.perf.fusion.measure`): plain and fused (additive, a = b = 0.5,
  question positions, all layers and the upper half) at ``--batch-size`` and ``--new-tokens``,
  interleaved rounds, against the reference algorithm at the same batch, with the compute floor;
  on CUDA also each one's peak memory (``torch.cuda.max_memory_allocated``) and
  ``fused_peak_memory_over_plain``.
"""

from __future__ import annotations

import argparse
import time

# Peak dense bf16 tensor FLOPs per second (no sparsity), by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}

SIZES = {
    "0.5b": {
        "vocab_size": 8192, "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14,
        "num_kv_heads": 2, "vision_hidden_size": 768, "vision_intermediate_size": 3072, "vision_layers": 12,
        "vision_heads": 12, "patch_size": 16, "max_positions": 2048,
    },
    "tiny": {},  # the tiny default's TinyModelParams
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="model size (default 0.5b)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda if available)")
    parser.add_argument("--image-size", type=int, default=384, help="pixels per side (default 384: 576 image tokens at patch 16)")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens (default 32)")
    parser.add_argument("--train-batch-size", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--max-length", type=int, default=768, help="training sequence length (default 768)")
    parser.add_argument("--train-steps", type=int, default=10, help="measured training steps per batch kind (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="training steps before measuring (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved generation rounds (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOPS (default: from the device name)")


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_flops(model, batch: int, length: int, image_tokens: int) -> float:
    """Model FLOPs of one training step (text stage: the vision tower frozen, forward only)."""
    text = model.config.get_text_config()
    language = _parameters(model.model.language_model) + _parameters(model.model.multi_modal_projector)
    attention = 12 * text.num_hidden_layers * text.hidden_size * length
    flops = batch * length * (6 * language + attention)
    if image_tokens:
        flops += 2 * _parameters(model.model.vision_tower) * batch * image_tokens
    return float(flops)


def _train_rate(model, batches, warmup: int, synchronize, autocast) -> float:
    """Seconds per step after ``warmup`` steps."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    started = None
    for index, batch in enumerate(batches):
        if index == warmup:
            synchronize()
            started = time.perf_counter()
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    model.eval()
    return (time.perf_counter() - started) / (len(batches) - warmup)


def run(args: argparse.Namespace) -> dict:
    # torch loads here, not at import: `vift --help` builds this module's parser.
    import contextlib
    import tempfile
    from pathlib import Path

    import torch

    from vift.config.schema import DataParams, TinyModelParams
    from vift.data.generate import training_corpus
    from vift.model.tiny import build_tiny_lvlm
    from vift.perf.fusion import bench_questions, measure

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device
    )
    cuda = device.type == "cuda"
    arch = TinyModelParams(**SIZES[args.size])
    with tempfile.TemporaryDirectory(prefix="vift-bench-gpu-") as scratch:
        root = Path(scratch) / "data"
        records, images = bench_questions(DataParams(), args.image_size, args.batch_size, root)
        model, processor = build_tiny_lvlm(arch, args.image_size, training_corpus(root))
    dtype = torch.bfloat16 if cuda else torch.float32
    model.to(device)
    model.model.vision_tower.requires_grad_(False)  # the text stage trains the projector and the LM
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    # Training: full-length batches (random token ids: speed does not depend on them).
    image_tokens = (args.image_size // arch.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    image_token = model.config.image_token_id

    def batch(with_image: bool) -> dict:
        ids = torch.randint(0, vocab, (args.train_batch_size, args.max_length), generator=generator)
        ids[ids == image_token] = 0
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if with_image:
            ids[:, 1 : 1 + image_tokens] = image_token
            out["labels"][:, : 1 + image_tokens] = -100
            out["pixel_values"] = torch.randn(args.train_batch_size, 3, args.image_size, args.image_size, generator=generator)
        return {k: v.to(device) for k, v in out.items()}

    steps = args.warmup + args.train_steps
    seconds = {
        kind: _train_rate(model, [batch(kind == "image") for _ in range(steps)], args.warmup, synchronize, autocast)
        for kind in ("text", "image")
    }
    peak = peak_tflops(torch.cuda.get_device_name(device) if cuda else "cpu", args.peak_tflops)
    training = {}
    for kind, per_step in seconds.items():
        flops = training_flops(model, args.train_batch_size, args.max_length, image_tokens if kind == "image" else 0)
        training[kind] = {
            "seconds_per_step": round(per_step, 4),
            "tokens_per_second": round(args.train_batch_size * args.max_length / per_step, 1),
            "model_tflops_per_second": round(flops / per_step / 1e12, 3),
            "mfu": None if peak is None else round(flops / per_step / (peak * 1e12), 4),
        }
    if cuda:
        training["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)

    # Generation: the weights in bf16 on CUDA, as served.
    model.to(dtype).eval()

    from vift.perf import memory

    def peak_memory(fn) -> int:
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize()
        return int(torch.cuda.max_memory_allocated(device))

    generation = measure(
        model, processor, images, [r.question for r in records], args.batch_size, args.new_tokens, args.rounds,
        per_sample=False, synchronize=synchronize, peak_memory=peak_memory if cuda else memory.peak_growth_bytes if memory.available() else None,
    )  # fmt: skip
    if "peak_memory_bytes" in generation:
        generation["peak_memory_measure"] = memory.CUDA_MEASURE if cuda else memory.CPU_MEASURE
    return {
        "settings": {
            "size": args.size,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "peak_bf16_tflops": peak,
            "parameters": {
                "total": _parameters(model),
                "language_model": _parameters(model.model.language_model),
                "vision_tower": _parameters(model.model.vision_tower),
            },
            "train_batch_size": args.train_batch_size,
            "max_length": args.max_length,
            "image_tokens": image_tokens,
            "train_steps": args.train_steps,
            "torch": torch.__version__,
        },
        "training": training,
        "generation": generation,
    }
