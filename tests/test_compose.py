"""Composing a LLaVA model from separate local SigLIP and causal-LM checkpoints (the paper's setup)."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vift.model.compose import compose_llava


def test_composed_model_keeps_both_checkpoints_weights(tiny_lvlm, tmp_path):
    _, processor = tiny_lvlm
    tokenizer = processor.tokenizer
    vision = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=16)
    )
    vision.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    language = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    language.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")

    model, composed_processor = compose_llava(tmp_path / "siglip", tmp_path / "qwen", vision_feature_layer=-2)
    model.save_pretrained(tmp_path / "llava")
    composed_processor.save_pretrained(tmp_path / "llava")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "llava")

    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, language(input_ids=ids).logits)
    tower = reloaded.model.vision_tower.state_dict()
    for name, tensor in vision.state_dict().items():
        assert torch.equal(tower[name], tensor), name
    assert reloaded.config.vision_feature_layer == -2
    assert reprocessor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    prompt = reprocessor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    from PIL import Image

    inputs = reprocessor(text=[prompt], images=[Image.new("RGB", (32, 32), (200, 10, 10))], return_tensors="pt")
    assert int((inputs["input_ids"] == reprocessor.image_token_id).sum()) == 4
    with torch.no_grad():
        assert torch.isfinite(reloaded(**inputs).logits).all()
