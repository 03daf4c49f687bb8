"""Prompts are tokenized as transformers' own chat templates tokenize them, in training and inference.

A Llama-style tokenizer adds its BOS when asked for special tokens, and LLaVA-1.5's template (like
LLaVA-NeXT's and Idefics2's) writes none: ``processor.apply_chat_template(..., tokenize=True)`` then
adds it. The adapters and the training collator must do the same, and must not add a second one
where a template already starts with the BOS text (SmolLM2's ChatML). Neutral fusion compares the
adapter with itself, so only a comparison with transformers' own tokenization can catch this.
"""

from __future__ import annotations

import copy

import pytest
from PIL import Image
from tokenizers import processors

from vift.data.manifests import ConversationRecord
from vift.fusion.families import adapter_for
from vift.model.chat import adds_special_tokens
from vift.train.collate import encode_conversation

QUESTIONS = ["how many red circles are there", "what colour is the square"]


def with_bos(processor, bos: str):
    """A copy of ``processor`` whose tokenizer adds ``bos`` with special tokens, as Llama tokenizers do."""
    processor = copy.deepcopy(processor)
    tokenizer = processor.tokenizer
    if bos not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [bos]})
    tokenizer.bos_token = bos
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    assert tokenizer("x")["input_ids"][0] == bos_id and tokenizer("x", add_special_tokens=False)["input_ids"][0] != bos_id
    return processor


def reference_ids(processor, question: str, image=None) -> list[int]:
    """What transformers' processor.apply_chat_template(tokenize=True) gives for one user turn."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    encoded = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    ids = encoded["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def unpadded(batch, row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (16, 16), (200, 30, 30))


@pytest.mark.parametrize("bos", ["<s>", "<|im_start|>"], ids=["template-without-bos", "template-starting-with-bos"])
def test_adapter_inputs_match_transformers_chat_template_tokenization(tiny_lvlm, image, bos):
    model, processor = tiny_lvlm
    processor = with_bos(processor, bos)
    adapter = adapter_for(model)
    image_batch = adapter.image_inputs(processor, [image, image], QUESTIONS, "cpu")
    text_batch = adapter.text_inputs(processor, QUESTIONS, "cpu")
    bos_id = processor.tokenizer.convert_tokens_to_ids(bos)
    for row, question in enumerate(QUESTIONS):
        assert unpadded(image_batch, row) == reference_ids(processor, question, image)
        assert unpadded(text_batch, row) == reference_ids(processor, question)
        assert unpadded(image_batch, row)[0] == bos_id and unpadded(image_batch, row)[1] != bos_id  # one BOS, first


def test_training_ids_start_as_the_inference_prompt_does(tiny_lvlm, image, tmp_path):
    model, processor = tiny_lvlm
    processor = with_bos(processor, "<s>")
    record = ConversationRecord.model_validate(
        {"id": "r1", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour is the square"},
                                                          {"from": "gpt", "value": "red"}]}
    )  # fmt: skip
    sample = encode_conversation(processor, record, image, max_length=512)
    prompt = adapter_for(model).image_inputs(processor, [image], ["what colour is the square"], "cpu")
    prompt_ids = unpadded(prompt, 0)
    assert sample["input_ids"][: len(prompt_ids)].tolist() == prompt_ids
    assert sample["input_ids"][0].item() == processor.tokenizer.convert_tokens_to_ids("<s>")  # trained with its BOS
    assert sample["labels"][0].item() == -100


def test_the_rule_is_transformers_own():
    class Tok:
        bos_token = "<s>"

    assert adds_special_tokens(Tok(), "USER: hi") and not adds_special_tokens(Tok(), "<s>USER: hi")
    Tok.bos_token = None
    assert adds_special_tokens(Tok(), "<s>USER: hi")


def test_mllama_cross_attention_is_a_clear_error_before_anything_runs():
    """Mllama reads images through cross-attention layers: fusion has nothing to fuse, and used to
    fail deep inside with "capture hooks on decoder layers [1] never fired"."""
    import torch
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    from vift.errors import UserError
    from vift.fusion.method import FusionSpec, fused_generate

    config = MllamaConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           image_size=16, patch_size=8, vision_output_dim=32, intermediate_layers_indices=[0]),
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2),
    )  # fmt: skip
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    spec = FusionSpec(mode="additive", w_vis=1.0, w_text=0.5)
    with pytest.raises(UserError, match=r"'mllama' cannot be fused: .*cross-attention") as error:
        fused_generate(model, None, [Image.new("RGB", (16, 16))], ["how many?"], spec)
    assert error.value.exit_code == 2 and "never fired" not in str(error.value)
