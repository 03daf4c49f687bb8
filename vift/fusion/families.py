"""Per-family knowledge: how to build left-padded image+question and text-only inputs.

Everything model-family specific that fusion and evaluation need lives here. The engine
(:mod:`vift.fusion.method`) only needs two batches of model inputs whose real tokens are right-aligned
(left padding) and ``model.get_decoder().layers``; it drives every family through ``generate`` alone.

Supported families (transformers 5.24, each checked against its source and tested on a tiny random
model in ``tests/test_families.py``):

- ``llava`` and ``llava_onevision``: chat template + processor; decoder layers are
  ``model.model.language_model.layers``. LLaVA-OneVision's processor also returns ``image_sizes`` and
  ``batch_num_images`` (one image per prompt here, so the any-resolution path is used).
- ``qwen2_vl`` (also ``qwen2_5_vl``): chat template + processor; decoder layers are
  ``model.model.language_model.layers``. M-RoPE needs ``mm_token_type_ids`` (0 text, 1 image, 2 video)
  next to ``input_ids``: without it ``generate`` silently falls back to 1-D text positions for an image
  prompt (and a plain forward with ``image_grid_thw`` raises). The adapter fills it when a processor
  does not return it, and adds an all-zero one to text-only inputs, so both batches carry the same keys.
  The model keeps ``model.model.rope_deltas`` between calls; in 5.24 every fresh ``generate`` call
  recomputes it in ``_prepare_position_ids_for_generation`` (the cache is empty, so the stale value is
  never read), and the engine only ever calls ``generate``, so a text-only capture, an image capture and
  the steered generation each get their own, correct positions: no reset is needed (pinned by a test).
- ``idefics3`` (also ``smolvlm``): chat template + processor; decoder layers are
  ``model.model.text_model.layers``. The processor expands ``<image>`` into
  ``<fake_token_around_image>``, row/column tags and ``image_seq_len`` image tokens per tile and returns
  ``pixel_values`` ``(batch, images, 3, H, W)`` padded with all-zero images plus
  ``pixel_attention_mask``. Their chat templates write ``User:<image>question`` with an image but
  ``User: question`` without one, so with real tokenizers the question's first word can tokenize
  differently in the two prompts; ``question`` positions (the longest common suffix) then start at the
  first shared token.
- ``paligemma`` (PaliGemma 1 and 2): no chat template; the prompt is the question itself (add task
  prefixes such as ``"answer en "`` to the questions yourself). The processor writes
  ``<image>×N <bos> question \\n``; the text-only prompt is ``<bos> question \\n``, tokenized directly
  because the processor refuses calls without images. Decoder layers are
  ``model.model.language_model.layers``. See :class:`PaliGemmaAdapter` for the bidirectional prefix.
- ``llava_next``: chat template + processor; decoder layers are ``model.model.language_model.layers``.
  The processor expands ``<image>`` into base + any-resolution + row-newline features, a count that
  depends on the image's size, and returns ``image_sizes``; ``pixel_values`` are
  ``(batch, views, 3, H, W)`` (the base view and the best pinpoint's tiles, zero-padded).
- ``aya_vision``: chat template + processor; decoder layers are ``model.model.language_model.layers``
  (Cohere2). The processor tiles each image (GOT-OCR2 style) and expands ``<image>`` into
  ``<|START_OF_IMG|>``, per tile ``TILE_i`` and ``<|IMG_PATCH|>`` × n, ``TILE_GLOBAL`` and the
  thumbnail's patches, ``<|END_OF_IMG|>``; the model's image token is ``<|IMG_PATCH|>``.
  ``pixel_values`` holds every image's tiles along dim 0 (no extra keys).
- ``internvl``: chat template (``<IMG_CONTEXT>\n`` per image) + processor; decoder layers are
  ``model.model.language_model.layers``. The processor tiles each image and expands it into ``<img>``,
  ``<IMG_CONTEXT>`` × ``image_seq_length`` per tile, ``</img>``; ``pixel_values`` as for Aya Vision.
- ``idefics2``: chat template + processor; decoder layers are ``model.model.text_model.layers``. The
  processor writes ``<fake_token_around_image>`` ``<image>`` × ``image_seq_len`` (the perceiver's
  latents) ``<fake_token_around_image>`` and a space before the text that follows, so
  ``User:<image>question`` and ``User: question`` share `` question``; ``pixel_values``
  ``(batch, images, 3, H, W)`` are zero-padded to the batch's largest image, with
  ``pixel_attention_mask``.
- ``gemma3``: chat template + processor; decoder layers are ``model.model.language_model.layers``. The
  processor replaces ``<start_of_image>`` with ``\n\n<start_of_image>``, ``<image_soft_token>`` ×
  ``mm_tokens_per_image``, ``<end_of_image>\n\n`` and returns ``token_type_ids`` (1 on the soft
  tokens): each image block attends bidirectionally within itself and everything else causally, so,
  unlike PaliGemma, steering the question leaves every earlier position as in the plain model.
  Text-only inputs need no ``token_type_ids``: without them Gemma3 builds exactly the causal mask an
  all-zero one gives (identical outputs, pinned by a test), so the generic adapter serves.
- ``qwen3_vl``: as Qwen2-VL (:class:`QwenVLAdapter`, M-RoPE with ``mm_token_type_ids``, ``rope_deltas``
  recomputed by every ``generate``); decoder layers are ``model.model.language_model.layers``.
  DeepStack adds intermediate vision features to the image positions after each of the first
  decoder layers, outside the layers: the hooks see (and capture) the states with them added, and
  the fused positions are never image positions.

Not supported: ``mistral3`` (Pixtral): its processor's module imports torchvision at import time, so
without torchvision no real processor can be built and the family cannot be tested.

Pitfalls the engine avoids for all of them: decoder layers return a plain tensor (``output[0]`` would
be batch element 0), so hooks read and replace only ``args[0]`` (the layer's keyword names change
between 5.x releases); position ids of a plain forward differ from ``generate``'s for padded batches
(and PaliGemma's plain forward ignores padding entirely), so captures run the prefill through
``generate``; edits clone the hidden states (``output_hidden_states`` returns the same tensors);
masks are built from token ids outside the model; the layer list is ``get_decoder().layers``, never
the longest ``X.{n}`` module list, which is the vision tower whenever it is deeper than the LM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vift.errors import UserError
from vift.model.chat import adds_special_tokens


def _user_message(question: str, with_image: bool) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _to(batch: dict, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class FamilyAdapter:
    """Chat-template families: the processor renders prompts and expands image tokens.

    ``image_inputs`` and ``text_inputs`` return left-padded batches (real tokens right-aligned), as
    ``generate`` takes them; ``processor`` may be a bare tokenizer for ``text_inputs``.
    """

    name: str
    model_types: tuple[str, ...]
    # the shared-prefix path of vift.fusion.method applies (a causal decoder whose cached
    # continuations take their positions from the attention mask)
    reuses_prefix: bool = True

    def prompt(self, processor, question: str, with_image: bool) -> str:
        return processor.apply_chat_template(_user_message(question, with_image), add_generation_prompt=True, tokenize=False)

    def special_tokens(self, processor, prompt: str) -> bool:
        """Whether tokenizing ``prompt`` adds the tokenizer's special tokens: :func:`adds_special_tokens`."""
        return adds_special_tokens(_tokenizer(processor), prompt)

    def _left_padded(self, processor, **kwargs) -> dict:
        tokenizer = _tokenizer(processor)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        special = self.special_tokens(processor, kwargs["text"][0])  # one template: the same for every prompt
        try:
            return dict(processor(**kwargs, return_tensors="pt", padding=True, add_special_tokens=special))
        finally:
            tokenizer.padding_side = side

    def image_inputs(self, processor, images: Sequence, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        prompts = [self.prompt(processor, q, with_image=True) for q in questions]
        batch = self._left_padded(processor, text=prompts, images=[[image] for image in images])
        return _to(batch, device)

    def text_inputs(self, processor, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        prompts = [self.prompt(processor, q, with_image=False) for q in questions]
        batch = self._left_padded(_tokenizer(processor), text=prompts)
        return _to(batch, device)


@dataclass(frozen=True)
class QwenVLAdapter(FamilyAdapter):
    """Qwen2-VL / Qwen2.5-VL: both batches carry ``mm_token_type_ids`` (needed by M-RoPE).

    The type ids are derived from the token ids (outside the model): 1 on the processor's image token,
    2 on its video token, 0 elsewhere, padding included, exactly as the processor computes them.
    """

    reuses_prefix: bool = False  # a cached continuation's M-RoPE positions follow columns, not the mask

    @staticmethod
    def mm_token_type_ids(input_ids: torch.Tensor, processor) -> torch.Tensor:
        types = torch.zeros_like(input_ids)
        types[input_ids == processor.image_token_id] = 1
        if getattr(processor, "video_token_id", None) is not None:
            types[input_ids == processor.video_token_id] = 2
        return types

    def image_inputs(self, processor, images: Sequence, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        batch = super().image_inputs(processor, images, questions, "cpu")
        if batch.get("mm_token_type_ids") is None:  # processors of transformers 5.24 return it; older ones did not
            batch["mm_token_type_ids"] = self.mm_token_type_ids(batch["input_ids"], processor)
        return _to(batch, device)

    def text_inputs(self, processor, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        batch = super().text_inputs(processor, questions, "cpu")
        batch["mm_token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return _to(batch, device)


@dataclass(frozen=True)
class PaliGemmaAdapter(FamilyAdapter):
    """PaliGemma: a prefix-LM without chat template; both prompts are one bidirectional prefix.

    PaliGemma attends bidirectionally over the prefix (``token_type_ids == 0``: image + ``<bos>`` +
    prompt + ``\\n``) and causally over the suffix (generated tokens, type 1). Consequences, and what the
    engine does:

    - Within one layer, steering the question positions also changes the outputs of earlier prefix
      positions (the image tokens attend to the question tokens), so from the first fused layer on the
      image positions drift away from the captured ``V_l`` too; in the causal families every position
      before the first fused one stays exactly as in the plain model. The engine edits only the fused
      (question) positions, with the unsteered captures, as for every family: it neither re-captures
      nor corrects the image positions, and their drift reaches decoding through the KV cache.
    - The text-only prefix has a different block structure: one bidirectional block
      ``<bos> question \\n`` without image tokens, whereas with the image the block is
      ``<image>×N <bos> question \\n``. ``text_inputs`` gives ``token_type_ids`` of 0 over the whole
      text-only prompt, so ``T_l`` is PaliGemma's native (bidirectional-prefix) reading of the question
      alone, and text-only answering (``images=None``) is the model's ordinary prefix-LM use. The two
      prompts share ``<bos> question \\n``, so ``question`` and ``text_prompt`` positions coincide.
    - ``generate`` appends type-1 (causal) ids for new tokens; decode steps are untouched as usual.

    The processor's ``labels`` (a training convenience) are dropped.
    """

    reuses_prefix: bool = False  # the prefix attends bidirectionally: it depends on the steered suffix

    def special_tokens(self, processor, prompt: str) -> bool:
        return False  # the prompts below write <bos> where PaliGemma expects it (after the image tokens)

    def prompt(self, processor, question: str, with_image: bool) -> str:
        if with_image:  # the processor adds <bos> after the image tokens and the final "\n"
            return processor.image_token + question
        return _tokenizer(processor).bos_token + question + "\n"

    def image_inputs(self, processor, images: Sequence, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        batch = super().image_inputs(processor, images, questions, "cpu")
        batch.pop("labels", None)
        return _to(batch, device)

    def text_inputs(self, processor, questions: Sequence[str], device) -> dict[str, torch.Tensor]:
        prompts = [self.prompt(processor, q, with_image=False) for q in questions]
        batch = self._left_padded(_tokenizer(processor), text=prompts)
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # the whole prompt is the prefix
        return _to(batch, device)


FAMILIES: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("llava", ("llava",)),
    FamilyAdapter("llava_onevision", ("llava_onevision",)),
    QwenVLAdapter("qwen2_vl", ("qwen2_vl", "qwen2_5_vl")),
    FamilyAdapter("idefics3", ("idefics3", "smolvlm")),
    PaliGemmaAdapter("paligemma", ("paligemma",)),
    FamilyAdapter("llava_next", ("llava_next",)),
    FamilyAdapter("aya_vision", ("aya_vision",)),
    FamilyAdapter("internvl", ("internvl",)),
    FamilyAdapter("idefics2", ("idefics2",)),
    FamilyAdapter("gemma3", ("gemma3",)),
    QwenVLAdapter("qwen3_vl", ("qwen3_vl",)),
)


# Families whose architecture has no place for ViFT's fusion, and why (checked before anything runs).
UNSUPPORTED = {
    "mllama": "Mllama (Llama 3.2 Vision) reads the image through cross-attention layers, not as image tokens "
    "in the prompt: there are no image-conditioned hidden states of the question for the text-only ones to be "
    "fused with, and its cross-attention layers do not run on a text-only prompt. Use a family that places "
    "image tokens in the sequence (LLaVA, Qwen2-VL, Idefics3, ...)",
}


def adapter_for(model_or_type) -> FamilyAdapter:
    """The adapter for a model (or a ``model_type`` string); a clear error for unsupported ones."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type in UNSUPPORTED:
        raise UserError(f"model family {model_type!r} cannot be fused: {UNSUPPORTED[model_type]}", exit_code=2)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UserError(f"unsupported model family {model_type!r}; supported: {supported}", exit_code=2)
