"""Turning conversation records into model inputs: chat prompts, assistant-only labels, padding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vift.data.manifests import IMAGE_TOKEN, ConversationRecord, load_rgb
from vift.errors import UserError
from vift.model.chat import adds_special_tokens

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


def to_messages(record: ConversationRecord) -> list[dict[str, Any]]:
    """HF chat messages; the image becomes an ``{"type": "image"}`` part of the first user turn."""
    messages = []
    for turn in record.conversations:
        text = turn.value
        if IMAGE_TOKEN in text:
            rest = text.replace(IMAGE_TOKEN, "", 1).lstrip("\n")
            content = [{"type": "image"}, {"type": "text", "text": rest}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": ROLES[turn.speaker], "content": content})
    return messages


def prompt_pieces(processor, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Split the rendered chat into ``(text, is_target)`` pieces; targets are assistant replies.

    Relies on the chat template being prefix-consistent (rendering the first k turns yields a
    prefix of rendering all of them), which holds for ChatML and the LVLM templates we support.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(messages[: index + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError("the model's chat template is not prefix-consistent; assistant-only labels need it")
        pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    return pieces


def encode_conversation(processor, record: ConversationRecord, image: Image.Image | None, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (both of shape (tokens,)), plus ``pixel_values`` of shape
    (channels, height, width) for an image sample.

    Labels are -100 everywhere but on assistant replies (content and end-of-turn token).
    Truncation cuts from the end; it refuses to cut into image tokens or to cut off every reply.
    """
    ids: list[int] = []
    labels: list[int] = []
    pixel_values = None
    for position, (text, is_target) in enumerate(prompt_pieces(processor, to_messages(record))):
        # the conversation's start gets the special tokens (BOS) exactly when inference's prompt does
        special = position == 0 and adds_special_tokens(processor.tokenizer, text)
        if position == 0 and image is not None:
            encoded = processor(text=text, images=[image], add_special_tokens=special, return_tensors="pt")
            pixel_values = encoded["pixel_values"][0]
            piece_ids = encoded["input_ids"][0].tolist()
        else:
            piece_ids = processor.tokenizer(text, add_special_tokens=special)["input_ids"]
        ids.extend(piece_ids)
        labels.extend(piece_ids if is_target else [IGNORE_INDEX] * len(piece_ids))
    if len(ids) > max_length:
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is not None and image_token_id in ids[max_length:]:
            raise UserError(f"record {record.id}: max_length {max_length} would cut image tokens; raise max_length")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            # Nothing left to learn from; a batch of such samples would have a 0/0 loss.
            raise UserError(f"record {record.id}: max_length {max_length} cuts off the whole reply; raise max_length")
    sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixel_values is not None:
        sample["pixel_values"] = pixel_values
    return sample


class ConversationDataset(torch.utils.data.Dataset):
    """Records of one manifest, encoded on access.

    ``modality[i]`` is "image" or "text"; ``lengths[i]`` is the record's text length in characters,
    a free stand-in for its token count (image tokens are the same for every record of a source),
    used to batch samples of similar length together.
    """

    def __init__(self, records: list[ConversationRecord], processor, image_root: Path, max_length: int):
        self.records = records
        self.processor = processor
        self.image_root = Path(image_root)
        self.max_length = max_length
        self.modality = ["image" if r.has_image else "text" for r in records]
        self.lengths = [sum(len(turn.value) for turn in r.conversations) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image = load_rgb(self.image_root / record.image) if record.has_image else None
        return encode_conversation(self.processor, record, image, self.max_length)


@dataclass
class PaddingCollator:
    """Right padding to the longest sample in the batch; stacks pixel values if any.

    Returns ``input_ids``, ``labels``, ``attention_mask`` of shape (batch, length) and, when some
    samples have an image, ``pixel_values`` of shape (images, channels, height, width).
    ``pad_to`` pads every batch to that fixed length instead (the fixed-shape baseline that
    ``vift bench train`` compares dynamic padding against).
    """

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        if self.pad_to is not None:
            longest = max(longest, self.pad_to)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch
