"""How rendered chat prompts are tokenized: one rule for training and inference."""

from __future__ import annotations


def adds_special_tokens(tokenizer, prompt: str) -> bool:
    """Whether a rendered chat prompt is tokenized with the tokenizer's special tokens (its BOS).

    The rule of transformers' own ``ProcessorMixin.apply_chat_template(tokenize=True)``: add them
    unless the rendered prompt already starts with the BOS token. Llama-tokenizer families whose
    templates write no BOS (LLaVA-1.5, LLaVA-NeXT, Idefics2) thus get their BOS, as they were trained
    with; ChatML templates that start with the BOS text (SmolLM2) and tokenizers that add nothing
    (Qwen) are tokenized as written. Training (:mod:`vift.train.collate`) and inference (:mod:`vift.fusion.families`) use this one rule.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos is not None and prompt.startswith(bos))
