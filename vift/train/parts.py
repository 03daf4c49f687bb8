"""Which parameters belong to which part of an LVLM, what trains in a stage, and at what rate.

An LVLM has three parts: the vision tower, the projector that maps vision features into the
language model's embedding space, and the language model (with its LM head). Parameter names
differ by family; the patterns below cover the families transformers 5 names in ``vift.model``
(LLaVA, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, PaliGemma).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from vift.config.schema import StageTrainParams
from vift.errors import UserError

if TYPE_CHECKING:  # annotations only: `vift stage --dry-run` plans launches without torch
    import torch

PARTS = ("projector", "vision_tower", "language_model")

# Dotted-name fragments, checked in this order: the projector first, because some families nest it
# inside the vision module (Qwen2-VL's ``visual.merger``).
PART_PATTERNS: dict[str, tuple[str, ...]] = {
    "projector": ("multi_modal_projector.", "visual.merger.", "connector.", "image_newline"),
    "vision_tower": ("vision_tower.", "visual.", "vision_model."),
    "language_model": ("language_model.", "text_model.", "lm_head."),
}


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its name (``model.multi_modal_projector.linear_1.weight``)."""
    dotted = f".{name}"
    for part, fragments in PART_PATTERNS.items():
        if any(f".{fragment}" in dotted for fragment in fragments):
            return part
    raise UserError(
        f"parameter {name!r} belongs to no known part ({', '.join(PARTS)}); this model family's names need a pattern in vift/train/parts.py"
    )


def trainable_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters that train, per part (after LoRA: the adapters, not the frozen weights they adapt)."""
    counts: Counter = Counter()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            counts[part_of(name)] += parameter.numel()
    return dict(counts)


def set_trainable(model: torch.nn.Module, trainable: list[str]) -> dict[str, int]:
    """Freeze every parameter outside ``trainable`` parts; return trainable parameter counts per part."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = part_of(name) in trainable
    counts = Counter(trainable_counts(model))
    missing = [part for part in trainable if not counts[part]]
    if missing:
        raise UserError(f"trainable part(s) {', '.join(missing)} have no parameters in this model")
    return dict(counts)


def part_learning_rates(params: StageTrainParams) -> dict[str, float]:
    """Learning rate per part: the language model's rate unless the part has its own."""
    return {
        "language_model": params.learning_rate,
        "projector": params.projector_learning_rate or params.learning_rate,
        "vision_tower": params.vision_learning_rate or params.learning_rate,
    }


def optimizer_groups(model: torch.nn.Module, params: StageTrainParams, decay_names: set[str]) -> list[dict]:
    """Optimizer parameter groups: one per (part, with or without weight decay) that has parameters.

    ``decay_names`` are the parameters that take weight decay (the Trainer's choice: not biases,
    not norms). Names are matched after stripping a PEFT wrapper's ``base_model.model.`` prefix.
    """
    rates = part_learning_rates(params)
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (part_of(name), name in decay_names)
        groups.setdefault(key, []).append(parameter)
    return [
        {
            "params": members,
            "lr": rates[part],
            "weight_decay": params.weight_decay if decays else 0.0,
            "part": part,
        }
        for (part, decays), members in sorted(groups.items())
    ]


def apply_lora(model: torch.nn.Module, params: StageTrainParams) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters on the language model's ``lora.target_modules``.

    The language model's own weights freeze; the other trainable parts train fully and are saved
    with the adapter (``modules_to_save``), so checkpoints carry everything that changes.
    """
    from peft import LoraConfig, get_peft_model

    lora = params.lora
    module_names = [name for name, _ in model.named_modules()]
    # Whole modules of the other trainable parts, by the name PEFT matches (a suffix of the path).
    to_save = sorted(
        {
            fragment.rstrip(".")
            for part in params.trainable
            if part != "language_model"
            for fragment in PART_PATTERNS[part]
            if any(name == fragment.rstrip(".") or name.endswith("." + fragment.rstrip(".")) for name in module_names)
        }
    )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # A regex, so that same-named projections in the vision tower stay untouched.
        target_modules=rf".*(language_model|text_model)\..*\.({'|'.join(lora.target_modules)})",
        modules_to_save=to_save or None,
        bias="none",
    )
    return get_peft_model(model, config)
