"""Batched greedy generation of short answers (the plain, unfused model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def chat_prompt(processor, question: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def encode_prompts(processor, questions: Sequence[str], images: Sequence[Image.Image] | None) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for a batch of questions (with one image each, or none)."""
    prompts = [chat_prompt(processor, q, images is not None) for q in questions]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        if images is None:
            return dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False))
        return dict(processor(text=prompts, images=list(images), return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    questions: Sequence[str],
    images: Sequence[Image.Image] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers, one string per question, special tokens and whitespace stripped."""
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        batch_images = None if images is None else images[start : start + batch_size]
        inputs = encode_prompts(processor, questions[start : start + batch_size], batch_images)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True))
    return answers
