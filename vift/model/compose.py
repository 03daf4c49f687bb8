"""Compose a LLaVA model from a local SigLIP checkpoint and a local causal LM (the paper's setup).

The reference joins SigLIP-so400m (penultimate layer, all patches) and Qwen2.5-7B-Instruct with a
fresh 2-layer GELU projector. Here the same: both checkpoints are loaded with their Auto classes
(safetensors only), their weights copied into a ``LlavaForConditionalGeneration``, the tokenizer
gains an ``<image>`` token, and the processor uses a ChatML template that places the image tokens
(Qwen2.5's own template only renders string content).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vift.config.schema import TinyModelParams
from vift.data.manifests import IMAGE_TOKEN
from vift.errors import UserError
from vift.model.loading import DTYPES, check_checkpoint
from vift.model.tokenizer import CHAT_TEMPLATE


def _vision_config(config):
    return getattr(config, "vision_config", config)


SCRATCH = "scratch"  # model.vision_tower: a SigLIP tower from model.tiny's vision settings, random init


def scratch_vision(arch: TinyModelParams, image_size: int, seed: int):
    """(config, image processor, model) of a randomly initialised SigLIP tower, for when no pretrained
    vision encoder is at hand (none ships offline): the caption stage trains it."""
    from transformers import SiglipVisionModel

    from vift.model.tiny import siglip_config, siglip_image_processor

    config = siglip_config(arch, image_size)
    torch.manual_seed(seed)
    return config, siglip_image_processor(image_size), SiglipVisionModel(config)


def compose_llava(
    vision_path: str | Path,
    language_path: str | Path,
    vision_feature_layer: int = -2,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    scratch: tuple[TinyModelParams, int, int] | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """``vision_path`` ``"scratch"`` builds the tower from ``scratch`` = (model.tiny, image size, seed)."""
    language_path = check_checkpoint(language_path)
    load = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    torch_dtype = DTYPES.get(dtype, torch.float32)
    if str(vision_path) == SCRATCH:
        if scratch is None:
            raise UserError("model.vision_tower: scratch needs the tiny vision settings and the image size")
        vision_config, image_processor, vision_full = scratch_vision(*scratch)
        vision_full = vision_full.to(torch_dtype)
    else:
        vision_path = check_checkpoint(vision_path)
        vision_config = _vision_config(AutoConfig.from_pretrained(vision_path, **load))
        if vision_config.model_type != "siglip_vision_model":
            raise UserError(f"model.vision_tower: {vision_path} is a {vision_config.model_type!r} model; compose expects SigLIP")
        image_processor = AutoImageProcessor.from_pretrained(vision_path, **load)
        vision_full = AutoModel.from_pretrained(vision_path, dtype=torch_dtype, use_safetensors=True, **load)
    tokenizer = AutoTokenizer.from_pretrained(language_path, **load)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: keep every patch
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    language = AutoModelForCausalLM.from_pretrained(language_path, dtype=torch_dtype, use_safetensors=True, **load)
    vision = getattr(vision_full, "vision_model", vision_full)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=language.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=language.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config).to(torch_dtype)
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    tower = model.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(vision.state_dict())
    if len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
