"""Ability-fused inference on every supported family, each as a tiny random model built from configs.

Every family's model is float64 with a wide init (so greedy outputs vary and never tie), and its
vision tower is deeper than its language model (the trap of guessing the decoder layers by the
longest numbered module list). Inputs come from the family adapter and a real processor built
offline: a byte-level BPE tokenizer trained here plus the family's PIL image processor. Processors
that declare a video processor (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL) cannot
type-check a missing one without torchvision, which is not installed; they are built with
``video_processor=None`` with that one check skipped (see ``_without_video_processor``), the image
path being the real one. SmolVLM's processor needs ``num2words`` (not installed): its inputs come
from the Idefics3 processor, which writes the same image-token layout, and its adapter's prompt
building is tested with the tokenizer alone. Mistral3 (Pixtral) is not supported: its processor's
module imports torchvision at import time, so no real processor can be built here.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from vift.errors import UserError
from vift.fusion import method as fusion_method
from vift.fusion.families import FAMILIES, adapter_for
from vift.fusion.method import FusionSpec, align_right, fused_generate, fused_positions, steered_generate

GENERATE = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
QUESTIONS = [
    "how many red circles are there",
    "what colour is the square",
    "is there a blue triangle left of the big green circle",
    "how many squares",
]
IMAGE_SIZES = [(16, 24), (24, 16), (32, 32), (16, 16)]  # (height, width): image token counts differ for some families

SPECIAL_TOKENS = [
    "<|pad|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    "<bos>", "<eos>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # fmt: skip

# Simplified versions of each family's published chat template (same placement of image and text).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}\n{{ part['text'] }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3 = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAVA_NEXT = (  # llava-v1.6-mistral: images first, then the text, inside [INST] ... [/INST] (plain text, as in Mistral v0.2)
    "{% for message in messages %}[INST] "
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    " [/INST]{% endfor %}"
)
AYA = (
    "<BOS_TOKEN>{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% else %}<|CHATBOT_TOKEN|>{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}<|END_OF_TURN_TOKEN|>{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)
INTERNVL = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS2 = IDEFICS3.removeprefix("<|im_start|>")  # Idefics2's template writes no start token (its tokenizer adds <s>)
GEMMA3 = (
    "<bos>{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN3 = QWEN.removeprefix("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")  # no default system prompt
CORPUS = QUESTIONS + ["system user assistant You are a helpful assistant. User: Assistant: answer the question"]


def _tokenizer(template: str | None, eos: str = "<|im_end|>", specials: tuple[str, ...] = (), **extra) -> PreTrainedTokenizerFast:
    """``specials``: the family's own special tokens, after the shared ones (whose ids stay the same)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420 + len(specials),
        special_tokens=SPECIAL_TOKENS + list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token=eos,
        bos_token="<bos>",
        chat_template=template,
        padding_side="right",
        **extra,
    )


@contextlib.contextmanager
def _without_video_processor():
    """Let a processor be built with ``video_processor=None``: its class check imports torchvision."""
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None if arg is None else check(self, name, arg)
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def _text_config(tokenizer, **kwargs) -> dict:
    return {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None, "tie_word_embeddings": True, **kwargs,
    }  # fmt: skip


SIGLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 8}


def build_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = _tokenizer(CHATML, extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 16, "width": 16}), tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="full", chat_template=CHATML, image_token="<image>",
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**SIGLIP, image_size=16), text_config=Qwen2Config(**_text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config), processor


def build_llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tokenizer = _tokenizer(ONEVISION, extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[16, 16], [16, 32], [32, 16]]
    with _without_video_processor():
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints),
            tokenizer=tokenizer, video_processor=None, num_image_tokens=4, vision_feature_select_strategy="full",
            chat_template=ONEVISION,
        )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**SIGLIP, image_size=16, vision_use_head=False), text_config=Qwen2Config(**_text_config(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config), processor


def _build_qwen(version: str):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(QWEN)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)
    processor_class = Qwen2VLProcessor if version == "2" else Qwen2_5_VLProcessor
    with _without_video_processor():
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN)
    tokens = {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    }  # fmt: skip
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in tokens.items()}
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = _text_config(tokenizer, rope_parameters=rope)
    common = {"depth": 4, "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if version == "2":
        vision = {**common, "embed_dim": 16, "hidden_size": 32, "mlp_ratio": 2}
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids)), processor
    vision = {
        **common,
        "hidden_size": 16,
        "intermediate_size": 32,
        "out_hidden_size": 32,
        "window_size": 16,
        "fullatt_block_indexes": [1, 3],
    }
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)), processor


def _build_idefics3(family: str):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tokenizer(IDEFICS3, eos="<end_of_utterance>")
    # images are split into 16-pixel tiles plus a global view: 1 to 5 tiles of image_seq_len tokens each
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3)
    config_class, model_class = (
        (Idefics3Config, Idefics3ForConditionalGeneration) if family == "idefics3" else (SmolVLMConfig, SmolVLMForConditionalGeneration)
    )
    config = config_class(
        text_config=LlamaConfig(**_text_config(tokenizer)), vision_config={**SIGLIP, "image_size": 16, "patch_size": 4},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return model_class(config), processor


def build_paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = _tokenizer(None, eos="<eos>", extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    image_processor.image_seq_length = 4  # (16 // 8) ** 2, as the hub's preprocessor config sets it
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc>/<seg> tokens
    text = GemmaConfig(**{**_text_config(tokenizer), "bos_token_id": tokenizer.bos_token_id}, head_dim=16)
    config = PaliGemmaConfig(
        text_config=text, vision_config=SiglipVisionConfig(**SIGLIP, image_size=16, vision_use_head=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=32, hidden_size=32, vocab_size=len(tokenizer),
    )  # fmt: skip
    return PaliGemmaForConditionalGeneration(config), processor


def build_llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, MistralConfig, SiglipVisionConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = _tokenizer(LLAVA_NEXT, eos="<eos>", extra_special_tokens={"image_token": "<image>"})
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full", chat_template=LLAVA_NEXT,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=SiglipVisionConfig(**SIGLIP, image_size=16, vision_use_head=False), text_config=MistralConfig(**_text_config(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    return LlavaNextForConditionalGeneration(config), processor


GOT_OCR2 = {"size": {"height": 16, "width": 16}, "crop_to_patches": True, "min_patches": 1, "max_patches": 4}


def build_aya_vision():
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, Cohere2Config, SiglipVisionConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")
    specials += ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")
    tokenizer = _tokenizer(AYA, eos="<|END_OF_TURN_TOKEN|>", specials=specials)
    # 16-pixel tiles (1 to 4 by aspect ratio, plus the global one when there are several); a 2x2 pixel
    # shuffle of the 4x4 patches leaves (16 // (4 * 2)) ** 2 = 4 tokens per tile
    processor = AyaVisionProcessor(
        image_processor=GotOcr2ImageProcessorPil(**GOT_OCR2), tokenizer=tokenizer, patch_size=4, img_size=16, downsample_factor=2,
        chat_template=AYA,
    )  # fmt: skip
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(**{**SIGLIP, "patch_size": 4}, image_size=16, vision_use_head=False),
        text_config=Cohere2Config(**_text_config(tokenizer), layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=16),
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    return AyaVisionForConditionalGeneration(config), processor


def build_internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    tokenizer = _tokenizer(INTERNVL, specials=tuple(image_tokens.values()), extra_special_tokens={**image_tokens, "video_token": "<video>"})
    # 16-pixel tiles as for Aya Vision; the 0.5 pixel shuffle of 4x4 patches leaves 4 tokens per tile
    with _without_video_processor():
        processor = InternVLProcessor(
            image_processor=GotOcr2ImageProcessorPil(**GOT_OCR2), tokenizer=tokenizer, video_processor=None, image_seq_length=4,
            chat_template=INTERNVL,
        )  # fmt: skip
    vision = InternVLVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=16, patch_size=4
    )
    config = InternVLConfig(
        vision_config=vision, text_config=Qwen2Config(**_text_config(tokenizer)), image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4, downsample_ratio=0.5,
    )  # fmt: skip
    return InternVLForConditionalGeneration(config), processor


def build_idefics2():
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, MistralConfig
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = _tokenizer(IDEFICS2, eos="<end_of_utterance>")
    # one image per prompt, resized to 16..32 pixels a side, padded to the batch's largest (pixel_attention_mask)
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 32}, do_image_splitting=False)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS2)
    perceiver = {
        "hidden_size": 32, "resampler_n_latents": 4, "resampler_depth": 2, "resampler_n_heads": 2, "resampler_head_dim": 8,
        "num_key_value_heads": 1,
    }  # fmt: skip
    config = Idefics2Config(
        text_config=MistralConfig(**_text_config(tokenizer)), vision_config={**SIGLIP, "image_size": 32, "patch_size": 4},
        perceiver_config=perceiver, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    return Idefics2ForConditionalGeneration(config), processor


def build_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    specials = ("<start_of_turn>", "<end_of_turn>", *image_tokens.values())
    tokenizer = _tokenizer(GEMMA3, eos="<end_of_turn>", specials=specials, extra_special_tokens=image_tokens)
    # 16x16 images, 4x4 patches average-pooled to mm_tokens_per_image = 4 soft tokens
    image_processor = Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3, image_seq_length=4)
    text = Gemma3TextConfig(
        **{**_text_config(tokenizer), "bos_token_id": tokenizer.bos_token_id}, head_dim=16, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=16,
    )  # fmt: skip
    ids = {
        f"{name}_index": tokenizer.convert_tokens_to_ids(token)
        for name, token in [("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"), ("image_token", "<image_soft_token>")]
    }
    config = Gemma3Config(
        text_config=text, vision_config=SiglipVisionConfig(**{**SIGLIP, "patch_size": 4}, image_size=16, vision_use_head=False),
        mm_tokens_per_image=4, **ids,
    )  # fmt: skip
    return Gemma3ForConditionalGeneration(config), processor


def build_qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(QWEN3)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=4, merge_size=2, temporal_patch_size=2)
    with _without_video_processor():
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN3)
    tokens = {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    }  # fmt: skip
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in tokens.items()}
    # interleaved M-RoPE over head_dim / 2 = 8 frequencies: H on 1 and 4, W on 2 and 5, T on the rest (as [24, 20, 20] of 64)
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 10000.0}
    text = _text_config(tokenizer, head_dim=16, rope_parameters=rope)
    # deepstack: the outputs of vision blocks 1 and 2 are added to the image positions after LM layers 0 and 1
    vision = {
        "depth": 4, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": 32, "num_position_embeddings": 16, "deepstack_visual_indexes": [1, 2],
    }  # fmt: skip
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids)), processor


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable
    adapter: str
    lm_layers: Callable  # the language model's decoder layers, by their explicit path
    vision_layers: Callable
    bidirectional_prefix: bool = False


def _siglip_layers(model):
    return model.model.vision_tower.encoder.layers


FAMILY_TABLE = {
    f.name: f
    for f in [
        Family("llava", build_llava, "llava", lambda m: m.model.language_model.layers, _siglip_layers),
        Family("llava_onevision", build_llava_onevision, "llava_onevision", lambda m: m.model.language_model.layers, _siglip_layers),
        Family("qwen2_vl", lambda: _build_qwen("2"), "qwen2_vl", lambda m: m.model.language_model.layers, lambda m: m.model.visual.blocks),
        Family("qwen2_5_vl", lambda: _build_qwen("2.5"), "qwen2_vl", lambda m: m.model.language_model.layers, lambda m: m.model.visual.blocks),
        Family("idefics3", lambda: _build_idefics3("idefics3"), "idefics3", lambda m: m.model.text_model.layers, lambda m: m.model.vision_model.encoder.layers),
        Family("smolvlm", lambda: _build_idefics3("smolvlm"), "idefics3", lambda m: m.model.text_model.layers, lambda m: m.model.vision_model.encoder.layers),
        Family("paligemma", build_paligemma, "paligemma", lambda m: m.model.language_model.layers, _siglip_layers, bidirectional_prefix=True),
        Family("llava_next", build_llava_next, "llava_next", lambda m: m.model.language_model.layers, _siglip_layers),
        Family("aya_vision", build_aya_vision, "aya_vision", lambda m: m.model.language_model.layers, _siglip_layers),
        Family("internvl", build_internvl, "internvl", lambda m: m.model.language_model.layers, lambda m: m.model.vision_tower.encoder.layer),
        Family("idefics2", build_idefics2, "idefics2", lambda m: m.model.text_model.layers, lambda m: m.model.vision_model.encoder.layers),
        Family("gemma3", build_gemma3, "gemma3", lambda m: m.model.language_model.layers, _siglip_layers),
        Family("qwen3_vl", build_qwen3_vl, "qwen3_vl", lambda m: m.model.language_model.layers, lambda m: m.model.visual.blocks),
    ]
}  # fmt: skip


# What each family's batches carry besides input_ids and attention_mask: (image+question, text-only).
MM_TYPES = {"pixel_values", "image_grid_thw", "mm_token_type_ids"}
EXTRA_KEYS = {
    "llava": ({"pixel_values"}, set()),
    "llava_onevision": ({"pixel_values", "image_sizes", "batch_num_images"}, set()),
    "qwen2_vl": (MM_TYPES, {"mm_token_type_ids"}),
    "qwen2_5_vl": (MM_TYPES, {"mm_token_type_ids"}),
    "idefics3": ({"pixel_values", "pixel_attention_mask"}, set()),
    "smolvlm": ({"pixel_values", "pixel_attention_mask"}, set()),
    "paligemma": ({"pixel_values", "token_type_ids"}, {"token_type_ids"}),
    "llava_next": ({"pixel_values", "image_sizes"}, set()),
    "aya_vision": ({"pixel_values"}, set()),  # tiles of all images along dim 0
    "internvl": ({"pixel_values"}, set()),  # tiles of all images along dim 0
    "idefics2": ({"pixel_values", "pixel_attention_mask"}, set()),
    "gemma3": ({"pixel_values", "token_type_ids"}, set()),  # none needed for text-only: see its test
    "qwen3_vl": (MM_TYPES, {"mm_token_type_ids"}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads only cost time on models this small (and on a shared CPU, a lot of it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILY_TABLE))
def family(request):
    """(Family, model, processor): float64, wide init, vision tower deeper than the language model."""
    spec = FAMILY_TABLE[request.param]
    torch.manual_seed(0)
    model, processor = spec.build()
    model = model.double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    tokenizer = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return spec, model, processor


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]


def inputs_for(model, processor, images, questions):
    adapter = adapter_for(model)
    return adapter.image_inputs(processor, images, questions, model.device), adapter.text_inputs(processor, questions, model.device)


def question_positions(image_inputs, text_inputs):
    return fused_positions(
        image_inputs["input_ids"], image_inputs["attention_mask"], text_inputs["input_ids"], text_inputs["attention_mask"], "question"
    )


def generate(model, inputs, spec=None, text_inputs=None, **kwargs):
    kwargs = {**GENERATE, "output_logits": True, "return_dict_in_generate": True, **kwargs}
    if spec is None:
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)
    return steered_generate(model, inputs, text_inputs, spec, **kwargs)


@contextlib.contextmanager
def layer_spies(layers):
    """Per layer, the hidden-state input before any other pre-hook (``before``) and as the layer ran (``after``)."""
    before: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    after: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: before[i].append(args[0].clone())))
        handles.append(layer.register_forward_hook(lambda module, args, output, i=i: after[i].append(args[0].clone())))
    try:
        yield before, after
    finally:
        for handle in handles:
            handle.remove()


def test_each_family_has_its_adapter(family):
    spec, model, _ = family
    assert adapter_for(model).name == spec.adapter
    assert model.config.model_type in adapter_for(model).model_types


def test_decoder_layers_are_the_language_models_even_below_a_deeper_vision_tower(family):
    spec, model, _ = family
    layers = model.get_decoder().layers
    assert layers is spec.lm_layers(model)
    assert len(layers) == model.config.get_text_config().num_hidden_layers == 3
    assert len(spec.vision_layers(model)) > len(layers)
    # the guess of generic steering libraries (the longest `X.{n}` module list) is the vision tower here
    numbered = [
        m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and all(n.isdigit() for n, _ in m.named_children())
    ]
    assert max(numbered, key=len) is spec.vision_layers(model)


def test_inputs_are_left_padded_and_share_the_question_suffix(family, images):
    spec, model, processor = family
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    image_keys, text_keys = EXTRA_KEYS[spec.name]
    assert image_inputs.keys() == {"input_ids", "attention_mask"} | image_keys
    assert text_inputs.keys() == {"input_ids", "attention_mask"} | text_keys
    for batch in (image_inputs, text_inputs):
        mask = batch["attention_mask"]
        assert (mask[:, -1] == 1).all() and (mask.diff(dim=1) >= 0).all()  # real tokens right-aligned
        assert len(set(mask.sum(dim=1).tolist())) > 1  # mixed lengths: the batch is padded
    if spec.adapter in ("qwen2_vl", "qwen3_vl"):
        assert image_inputs["mm_token_type_ids"].any() and not text_inputs["mm_token_type_ids"].any()
        # the adapter's own derivation (for processors that do not return them) is the processor's
        derived = adapter_for(model).mm_token_type_ids(image_inputs["input_ids"], processor)
        assert torch.equal(derived, image_inputs["mm_token_type_ids"])
    if spec.adapter == "paligemma":
        assert "labels" not in image_inputs  # the processor's training labels
        assert not image_inputs["token_type_ids"].any() and not text_inputs["token_type_ids"].any()  # all prefix
    if spec.adapter == "gemma3":  # 1 on the soft image tokens only: each image block is bidirectional
        assert torch.equal(image_inputs["token_type_ids"], (image_inputs["input_ids"] == model.config.image_token_id).long())
    fused = question_positions(image_inputs, text_inputs)
    tokenizer = getattr(processor, "tokenizer", processor)
    for row, question in enumerate(QUESTIONS):
        shared = tokenizer.decode(image_inputs["input_ids"][row][fused[row]])
        assert question.split(" ", 1)[1] in shared  # the question (its first word may tokenize differently)
        assert not (image_inputs["input_ids"][row][fused[row]] == model.config.image_token_id).any()


def test_adapter_prompts_need_only_the_tokenizer_for_text(family):
    spec, model, processor = family
    adapter = adapter_for(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    by_processor = adapter.text_inputs(processor, QUESTIONS, model.device)
    by_tokenizer = adapter.text_inputs(tokenizer, QUESTIONS, model.device)
    assert by_processor.keys() == by_tokenizer.keys()
    assert all(torch.equal(by_processor[k], by_tokenizer[k]) for k in by_processor)
    assert tokenizer.padding_side == "right"  # restored


NEUTRAL_SPECS = [FusionSpec(mode="additive", a=0, b=0), FusionSpec(mode="replace", w_vis=1, w_text=0, positions="text_prompt")]


@pytest.mark.parametrize("neutral", NEUTRAL_SPECS)
def test_neutral_fusion_is_exactly_the_plain_model_also_after_other_calls(family, images, neutral):
    """Also pins state kept between calls (Qwen2-VL's rope_deltas): unrelated calls come first."""
    _, model, processor = family
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    plain = generate(model, image_inputs)
    other_images, other_text = inputs_for(model, processor, images[2:][::-1], QUESTIONS[:2])
    generate(model, other_text)
    generate(model, other_images)
    fused = generate(model, image_inputs, neutral, text_inputs)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits, strict=True):
        assert torch.equal(a, b)


def test_fusion_edits_the_prefill_of_the_fused_positions_only(family, images, monkeypatch):
    """The full path's mechanics (every prompt position prefilled); the shared-prefix path is
    compared with it in test_the_shared_prefix_path_answers_exactly_as_the_full_path."""
    monkeypatch.setattr(fusion_method, "reuses_prefix", lambda *args: False)
    spec, model, processor = family
    layers = model.get_decoder().layers
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    fusion = FusionSpec(a=1.0, b=0.5, layer_start=1, layer_end=2)
    mask = question_positions(image_inputs, text_inputs)
    prompt_len, steps = image_inputs["input_ids"].shape[1], GENERATE["max_new_tokens"]
    with layer_spies(layers) as (plain_in, _):
        plain = generate(model, image_inputs)
    with layer_spies(layers) as (before, after):
        fused = generate(model, image_inputs, fusion, text_inputs)
    assert not torch.allclose(fused.logits[0], plain.logits[0])
    for index in range(len(layers)):
        calls = list(zip(before[index][-steps:], after[index][-steps:], strict=True))  # this generate's calls
        assert [given.shape[1] for given, _ in calls] == [prompt_len] + [1] * (steps - 1)
        for given, used in calls[1:]:  # decode steps pass untouched
            assert torch.equal(used, given)
        given, used = calls[0]
        if index == fusion.layer_start:  # the edit, on the fused positions only: H + a·T − b·V, with V = H here
            text_state = align_right(before[index][-steps - 2], prompt_len)  # from the text-only capture
            assert torch.equal(before[index][-steps - 1], given)  # the image capture is this very prefill, unsteered
            assert torch.equal((used != given).any(dim=-1), mask)
            expected = given + mask[..., None] * (fusion.a * text_state - fusion.b * given)
            assert torch.allclose(used, expected, rtol=0, atol=1e-12)
        else:
            assert torch.equal(used, given)
    # One layer later, positions before the first fused one are untouched in a causal LM, but not under
    # PaliGemma's bidirectional prefix (there the image tokens attend to the steered question tokens).
    steered_next, plain_next = before[fusion.layer_end][-steps], plain_in[fusion.layer_end][0]
    earlier = torch.arange(prompt_len)[None, :] < mask.long().argmax(dim=1)[:, None]
    earlier &= image_inputs["attention_mask"].bool()
    changed = not torch.allclose(steered_next[earlier], plain_next[earlier], rtol=0, atol=1e-12)
    assert changed == spec.bidirectional_prefix
    assert not torch.allclose(steered_next[mask], plain_next[mask])


def test_the_variants_edit_the_prefill_as_specified(family, images, monkeypatch):
    """Norm-preserving fusion keeps each fused position's norm; a steered prefix edits every real
    position of the image prompt (image tokens included) and leaves the padding alone. The full
    path's mechanics (the shared-prefix path equals it: the exactness test above)."""
    monkeypatch.setattr(fusion_method, "reuses_prefix", lambda *args: False)
    spec, model, processor = family
    layers = model.get_decoder().layers
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    mask = question_positions(image_inputs, text_inputs)
    real = image_inputs["attention_mask"].bool()
    prompt_len, steps = image_inputs["input_ids"].shape[1], GENERATE["max_new_tokens"]
    outputs = []
    for fusion in (
        FusionSpec(a=1.0, b=0.5, layer_start=1, layer_end=2, preserve_norm=True),
        FusionSpec(a=1.0, b=0.5, layer_start=1, layer_end=2, steer_prefix=True),
    ):
        with layer_spies(layers) as (before, after):
            outputs.append(generate(model, image_inputs, fusion, text_inputs))
        given, used = before[1][-steps], after[1][-steps]  # the steered generate's prefill (a capture stops before `after`)
        assert given.shape[1] == prompt_len
        changed = (used != given).any(dim=-1)
        if fusion.preserve_norm:
            assert torch.equal(changed, mask)
            assert torch.allclose(used.norm(dim=-1)[mask], given.norm(dim=-1)[mask], rtol=1e-5, atol=0)
        else:
            assert torch.equal(changed, real)  # the image tokens too; padding never
    assert not torch.allclose(outputs[0].logits[0], outputs[1].logits[0])


def test_a_batch_equals_the_samples_one_by_one(family, images):
    _, model, processor = family
    fusion = FusionSpec(a=0.8, b=0.4, layer_start=1)
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    batched = generate(model, image_inputs, fusion, text_inputs)
    new = batched.sequences[:, image_inputs["input_ids"].shape[1] :]
    assert len({tuple(row.tolist()) for row in new}) > 1  # outputs vary, so the comparison means something
    for row, (image, question) in enumerate(zip(images, QUESTIONS)):
        single_image, single_text = inputs_for(model, processor, [image], [question])
        single = generate(model, single_image, fusion, single_text)
        assert torch.equal(single.sequences[0, single_image["input_ids"].shape[1] :], new[row])
        assert torch.allclose(single.logits[0][0], batched.logits[0][row], rtol=0, atol=1e-9)


def test_fused_generate_end_to_end(family, images):
    """Adapter + processor + engine: neutral is the plain model, batching changes nothing, text-only works."""
    _, model, processor = family
    fusion = FusionSpec(mode="replace", w_vis=0.5, w_text=0.7, positions="text_prompt", layer_start=1)
    kwargs = {"max_new_tokens": 3}
    plain = fused_generate(model, processor, images, QUESTIONS, None, **kwargs)
    assert fused_generate(model, processor, images, QUESTIONS, FusionSpec(), batch_size=3, **kwargs) == plain
    by_three = fused_generate(model, processor, images, QUESTIONS, fusion, batch_size=3, **kwargs)
    by_one = fused_generate(model, processor, images, QUESTIONS, fusion, batch_size=1, **kwargs)
    assert by_three == by_one and len(by_one) == len(QUESTIONS)
    assert by_one != plain  # the fusion did reach the answers
    text_only = fused_generate(model, processor, None, QUESTIONS, None, batch_size=3, **kwargs)
    assert len(text_only) == len(QUESTIONS) and all(isinstance(answer, str) for answer in text_only)


def test_no_hook_remains_after_fusion_also_after_an_exception(family, images):
    _, model, processor = family
    layers = model.get_decoder().layers
    image_inputs, text_inputs = inputs_for(model, processor, images[:2], QUESTIONS[:2])

    def hooks():  # transformers keeps its own output-recording hooks on some modules: compare with them
        return {name: (list(m._forward_pre_hooks), list(m._forward_hooks)) for name, m in model.named_modules()}

    # transformers installs those on a model's first forward: one plain pass first, so the snapshot
    # has them whichever test ran this model before (the test failed alone, passed after others).
    with torch.inference_mode():
        model.generate(**image_inputs, max_new_tokens=1, do_sample=False)
    installed = hooks()
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    steered_generate(model, image_inputs, text_inputs, FusionSpec(a=0.5), max_new_tokens=2)
    assert hooks() == installed
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)

    def explode(module, args, output):
        raise RuntimeError("boom inside the steered forward")

    failing = layers[-1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            steered_generate(model, image_inputs, text_inputs, FusionSpec(a=0.5, layer_end=2), max_new_tokens=2)
    finally:
        failing.remove()
    assert hooks() == installed


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_gemma3_needs_token_type_ids_for_images_only(family, images):
    """Image tokens attend bidirectionally within their block through ``token_type_ids``; text-only
    prompts need none: absent, the mask is the causal one an all-zero ``token_type_ids`` gives."""
    _, model, processor = family
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    plain = generate(model, text_inputs)
    zeros = generate(model, {**text_inputs, "token_type_ids": torch.zeros_like(text_inputs["input_ids"])})
    assert torch.equal(zeros.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(zeros.logits, plain.logits, strict=True))
    causal = generate(model, {k: v for k, v in image_inputs.items() if k != "token_type_ids"})
    assert not torch.allclose(causal.logits[0], generate(model, image_inputs).logits[0])  # the key is used


def test_an_unknown_family_names_every_supported_one():
    with pytest.raises(UserError) as error:
        adapter_for("mystery")
    message = str(error.value)
    assert message.startswith("unsupported model family 'mystery'; supported: ")
    model_types = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma"]
    model_types += ["llava_next", "aya_vision", "internvl", "idefics2", "gemma3", "qwen3_vl"]
    for model_type in model_types:
        assert re.search(rf"\b{model_type}\b", message)
    assert {f.name for f in FAMILIES} == {
        "llava", "llava_onevision", "qwen2_vl", "idefics3", "paligemma",
        "llava_next", "aya_vision", "internvl", "idefics2", "gemma3", "qwen3_vl",
    }  # fmt: skip
    # every model type a family names is tested above, each on its own tiny model
    assert {t for f in FAMILIES for t in f.model_types} == set(FAMILY_TABLE)
    assert "mistral3" not in message  # its processor imports torchvision: not supported (see the module docstring)


def test_the_family_parameter_names_every_supported_model_type():
    from typing import get_args

    from vift.config.schema import ModelParams

    assert set(get_args(ModelParams.model_fields["family"].annotation)) == {"auto"} | {t for f in FAMILIES for t in f.model_types}


# Families on which steered_generate reuses the shared prefix (test models: sliding windows of 16
# tokens, shorter than their prompts, keep Gemma3 and Aya Vision on the full path here).
REUSES_PREFIX = {"llava", "llava_onevision", "llava_next", "idefics2", "idefics3", "smolvlm", "internvl"}


@pytest.mark.parametrize(
    "fusion",
    [FusionSpec(a=0.7, b=0.3, layer_start=1), FusionSpec(mode="replace", w_vis=0.6, w_text=0.5, layer_start=0, layer_end=2),
     FusionSpec(a=0.9, b=0.0, layer_start=2), FusionSpec(mode="replace", w_vis=0.0, w_text=1.0, layer_start=1),
     FusionSpec(a=0.7, b=0.3, layer_start=1, preserve_norm=True), FusionSpec(a=0.7, b=0.3, layer_start=1, steer_prefix=True)],
    ids=["additive", "replace", "text-only-weight", "image-weight-0", "norm-preserving", "steer-prefix"],
)  # fmt: skip
def test_the_shared_prefix_path_answers_exactly_as_the_full_path(family, images, fusion, monkeypatch):
    spec, model, processor = family
    image_inputs, text_inputs = inputs_for(model, processor, images, QUESTIONS)
    mask = question_positions(image_inputs, text_inputs)
    # b = 0: one prefill anyway; a steered prefix differs between the two passes, so it cannot be shared
    reused = spec.name in REUSES_PREFIX and fusion_method.uses_image(fusion) and not fusion.steer_prefix
    assert fusion_method.reuses_prefix(model, fusion, mask, GENERATE) == reused
    layer = model.get_decoder().layers[0]
    seen: list[int] = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0] * args[0].shape[1]))
    try:
        fast = generate(model, image_inputs, fusion, text_inputs)
        fast_tokens = sum(seen)
        seen.clear()
        with monkeypatch.context() as patch:
            patch.setattr(fusion_method, "reuses_prefix", lambda *args: False)
            full = generate(model, image_inputs, fusion, text_inputs)
        full_tokens = sum(seen)
    finally:
        handle.remove()
    assert torch.equal(fast.sequences, full.sequences)  # in the caller's layout: answers where they expect them
    for a, b in zip(fast.logits, full.logits, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-9)
    if reused:  # the image prompt's prefix ran once: fewer tokens through the decoder
        assert fast_tokens < full_tokens
    else:
        assert fast_tokens == full_tokens


def test_a_zero_weight_skips_its_capture(family, images, monkeypatch):
    _, model, processor = family
    image_inputs, text_inputs = inputs_for(model, processor, images[:2], QUESTIONS[:2])
    captured = []
    real = fusion_method.capture_layer_inputs
    monkeypatch.setattr(
        fusion_method, "capture_layer_inputs", lambda m, layers, inputs, *a: captured.append(inputs) or real(m, layers, inputs, *a)
    )
    generate(model, image_inputs, FusionSpec(a=0.5, b=0.0, layer_start=1), text_inputs)
    assert [c["input_ids"].shape for c in captured] == [text_inputs["input_ids"].shape]  # T only: b = 0 needs no V
    captured.clear()
    generate(model, image_inputs, FusionSpec(mode="replace", w_vis=0.5, w_text=0.0, layer_start=1), text_inputs)
    assert len(captured) == 1 and captured[0]["input_ids"] is not text_inputs["input_ids"]  # V only: w_text = 0 needs no T
