"""The offline default LVLM: LLaVA architecture (SigLIP vision tower + MLP projector + Qwen2 LM).

Built from configs, so no machine needs a model hub; saved and reloaded like any HF checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vift.config.schema import TinyModelParams
from vift.data.manifests import IMAGE_TOKEN
from vift.model.tokenizer import CHAT_TEMPLATE, train_tokenizer


def siglip_config(arch: TinyModelParams, image_size: int) -> SiglipVisionConfig:
    """The SigLIP vision tower of ``model.tiny`` (also the ``small`` preset's tower from scratch)."""
    return SiglipVisionConfig(
        hidden_size=arch.vision_hidden_size,
        intermediate_size=arch.vision_intermediate_size,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=image_size,
        patch_size=arch.patch_size,
    )


def siglip_image_processor(image_size: int) -> SiglipImageProcessorPil:
    """The PIL image processor (torchvision is not required by vift), square at ``image_size``."""
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def build_tiny_lvlm(
    arch: TinyModelParams, image_size: int, corpus: Iterable[str], seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor, with a tokenizer trained on ``corpus``.

    The PIL image processor is used because torchvision is not required by vift.
    """
    tokenizer = train_tokenizer(corpus, arch.vocab_size)
    image_processor = siglip_image_processor(image_size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=arch.patch_size,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    vision = siglip_config(arch, image_size)
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
