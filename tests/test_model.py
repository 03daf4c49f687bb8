"""The tiny offline LVLM: tokenizer, processor, save/load, mixed text/image batches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vift.data.manifests import ConversationRecord, load_rgb
from vift.errors import UserError
from vift.model.loading import check_checkpoint, decoder_layers, load_model
from vift.train.collate import IGNORE_INDEX, PaddingCollator, encode_conversation


def records(ci_data, split, n):
    return [ConversationRecord.model_validate(json.loads(line)) for line in (ci_data / f"{split}.jsonl").read_text().splitlines()[:n]]


def test_tokenizer_round_trips_the_corpus(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    tokenizer = processor.tokenizer
    for record in records(ci_data, "text_instructions", 20):
        text = record.conversations[0].value
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    # byte-level: nothing is unknown, and reloading keeps the vocabulary size
    assert tokenizer.unk_token_id not in tokenizer("héllo ∑ \x00")["input_ids"]
    assert tokenizer.decode(tokenizer("héllo ∑")["input_ids"]) == "héllo ∑"


def test_save_and_reload_with_auto_classes_gives_identical_outputs(tiny_lvlm, ci_data, tmp_path):
    model, processor = tiny_lvlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    assert len(reprocessor.tokenizer) == len(processor.tokenizer) == reloaded.config.text_config.vocab_size
    record = records(ci_data, "captions", 1)[0]
    image = load_rgb(ci_data / record.image)
    sample = encode_conversation(reprocessor, record, image, max_length=128)
    original = encode_conversation(processor, record, image, max_length=128)
    assert torch.equal(sample["input_ids"], original["input_ids"])
    with torch.no_grad():
        a = model(input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"][None]).logits
        b = reloaded(input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"][None]).logits
    assert torch.equal(a, b)
    assert len(decoder_layers(reloaded)) == model.config.text_config.num_hidden_layers


def test_image_sample_expands_image_tokens_and_masks_all_but_the_reply(tiny_lvlm, ci_data):
    model, processor = tiny_lvlm
    record = records(ci_data, "captions", 1)[0]
    sample = encode_conversation(processor, record, load_rgb(ci_data / record.image), max_length=128)
    ids, labels = sample["input_ids"], sample["labels"]
    patches = (processor.image_processor.size["height"] // processor.patch_size) ** 2
    assert int((ids == processor.image_token_id).sum()) == patches
    target = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert target == record.conversations[1].value + "<|im_end|>\n"
    assert sample["pixel_values"].shape == (3, processor.image_processor.size["height"], processor.image_processor.size["width"])


def test_text_only_sample_has_no_image_tokens_and_no_pixels(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    record = records(ci_data, "text_instructions", 1)[0]
    sample = encode_conversation(processor, record, None, max_length=128)
    assert "pixel_values" not in sample
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 0
    assert (
        processor.tokenizer.decode(sample["input_ids"][sample["labels"] != IGNORE_INDEX]) == record.conversations[1].value + "<|im_end|>\n"
    )


def test_forward_on_a_batch_mixing_text_and_image_samples(tiny_lvlm, ci_data):
    model, processor = tiny_lvlm
    samples = [encode_conversation(processor, r, None, 128) for r in records(ci_data, "text_instructions", 2)]
    samples += [encode_conversation(processor, r, load_rgb(ci_data / r.image), 128) for r in records(ci_data, "captions", 2)]
    batch = PaddingCollator(processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == 2
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    output = model(**batch)
    assert output.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(output.loss) and output.loss.item() > 0


def test_truncation_refuses_to_cut_image_tokens(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    record = records(ci_data, "captions", 1)[0]
    with pytest.raises(UserError, match="would cut image tokens"):
        encode_conversation(processor, record, load_rgb(ci_data / record.image), max_length=4)


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no \\*.safetensors weights.*pytorch_model.bin"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        check_checkpoint(tmp_path / "nowhere")
