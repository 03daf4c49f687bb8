"""Pretraining the tiny default's language model on text: the stand-in for an instruct LLM.

The paper starts from Qwen2.5-7B-Instruct, a language model that already solves text tasks. Our
offline default has no such checkpoint, so the ``base`` stage teaches the tiny Qwen2 LM the
``backbone_text`` split (scene descriptions, arithmetic, composed questions over descriptions)
before any image is seen. Only the language model trains; vision tower and projector stay as built.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from vift.config.schema import PretrainParams
from vift.data.manifests import ConversationRecord
from vift.train.collate import ConversationDataset, PaddingCollator


def pretrain_language_model(model, processor, records: list[ConversationRecord], params: PretrainParams, seed: int) -> list[dict]:
    """Train ``model.language_model`` (+ LM head) in place; return the Trainer's log history."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "language_model" in name or name.startswith("lm_head")
    dataset = ConversationDataset(records, processor, image_root=Path("."), max_length=params.max_length)
    with tempfile.TemporaryDirectory(prefix="vift-pretrain-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=params.max_steps,
            per_device_train_batch_size=params.batch_size,
            learning_rate=params.learning_rate,
            warmup_steps=params.warmup_ratio,  # a float < 1 is a ratio of the total steps
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            logging_steps=max(1, params.max_steps // 20),
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=PaddingCollator(processor.tokenizer.pad_token_id),
        )
        trainer.train()
    for parameter in model.parameters():
        parameter.requires_grad = True
    return trainer.state.log_history
