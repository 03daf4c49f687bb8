"""Per-family knowledge: how to build left-padded image+question and text-only inputs.

Everything model-family specific that fusion and evaluation need lives here. The engine itself only
needs two batches of model inputs whose real tokens are right-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vift.errors import UserError


def _user_message(question: str, with_image: bool) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


@dataclass(frozen=True)
class FamilyAdapter:
    """Chat-template families: the processor renders prompts and expands image tokens."""

    name: str
    model_types: tuple[str, ...]

    def prompt(self, processor, question: str, with_image: bool) -> str:
        return processor.apply_chat_template(_user_message(question, with_image), add_generation_prompt=True, tokenize=False)

    def _left_padded(self, processor, **kwargs) -> dict:
        tokenizer = getattr(processor, "tokenizer", processor)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            return dict(processor(**kwargs, return_tensors="pt", padding=True, add_special_tokens=False))
        finally:
            tokenizer.padding_side = side

    def image_inputs(self, processor, images: Sequence, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        prompts = [self.prompt(processor, q, with_image=True) for q in questions]
        batch = self._left_padded(processor, text=prompts, images=[[image] for image in images])
        return {k: v.to(device) for k, v in batch.items()}

    def text_inputs(self, processor, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        prompts = [self.prompt(processor, q, with_image=False) for q in questions]
        tokenizer = getattr(processor, "tokenizer", processor)
        batch = self._left_padded(tokenizer, text=prompts)
        return {k: v.to(device) for k, v in batch.items()}


FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("llava", ("llava",)),
)


def adapter_for(model_or_type) -> FamilyAdapter:
    """The adapter for a model (or a ``model_type`` string); a clear error for unsupported ones."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UserError(f"unsupported model family {model_type!r}; supported: {supported}", exit_code=2)
