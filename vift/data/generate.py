"""Write the ShapeTally splits as manifests (LLaVA conversations for training, VQA for evaluation)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vift.config.schema import DataParams
from vift.data.manifests import IMAGE_TOKEN, Manifest
from vift.data.world import (
    DESCRIBE_PROMPT,
    Scene,
    render,
    sample_arithmetic,
    sample_question,
    sample_scene,
    split_rng,
    text_prompt,
)
from vift.io import atomic_directory, atomic_write_json

TRAIN_SPLITS = ("backbone_text", "captions", "text_instructions", "visual_instructions")
EVAL_SPLITS = ("calibration", "test")
SPLITS = TRAIN_SPLITS + EVAL_SPLITS
# Each split's role decides whether its records carry images. Enforced at validation: text
# instructions made of image records would silently turn ViFT into visual instruction tuning.
SPLIT_HAS_IMAGES = {
    "backbone_text": False,
    "captions": True,
    "text_instructions": False,
    "visual_instructions": True,
    "calibration": True,
    "test": True,
}
# The import contract: which stages read each split, and what happens without it. Required
# splits are checked at import; optional ones skip what needs them (README, docs/STORAGE.md).
REQUIRED_SPLITS = ("captions", "text_instructions", "calibration", "test")
SPLIT_READERS = {
    "backbone_text": "base (tiny: pretrains the language model; without it, text_instructions are used)",
    "captions": "train_caption, train_text, train_vit",
    "text_instructions": "train_text (and base, tiny, when backbone_text is absent)",
    "visual_instructions": "train_vit (without it the baseline is skipped and the vit_baseline row left out)",
    "calibration": "calibrate (and the caption check of the training stages)",
    "test": "evaluate",
}


def missing_required(directory: Path) -> list[str]:
    """``file: what reads it`` for every required split that ``directory`` lacks."""
    return [
        f"{directory / f'{s}.jsonl'}: missing; read by {SPLIT_READERS[s]}"
        for s in REQUIRED_SPLITS
        if not (directory / f"{s}.jsonl").exists()
    ]


def training_corpus(root: Path) -> Iterator[str]:
    """Every conversation turn of the training splits under ``root`` (those present): the tokenizer's corpus."""
    for split in TRAIN_SPLITS:
        if not (root / f"{split}.jsonl").exists():
            continue
        for record in Manifest(root / f"{split}.jsonl", "conversation", root, check_images=False):
            yield from (turn.value for turn in record.conversations)


ARITHMETIC_SHARE = 0.3  # share of pure arithmetic among text-only instructions
BOARD_SHARE = 0.25  # share of board -> description records in backbone_text (see Scene.board)


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


class _Generator:
    def __init__(self, params: DataParams, out: Path):
        self.params = params
        self.out = out
        self.held_out: set[str] = set()
        self.type_counts: dict[str, Counter] = {}

    def scenes(self, split: str, count: int, avoid_held_out: bool) -> Iterator[tuple[int, Scene]]:
        p = self.params
        for index in range(count):
            attempt = 0
            while True:
                rng = split_rng(p.seed, f"{split}/{attempt}" if attempt else split, index)
                scene = sample_scene(rng, p.grid, p.min_objects, p.max_objects)
                if not avoid_held_out or scene.signature not in self.held_out:
                    break
                attempt += 1
            yield index, scene

    def save_image(self, scene: Scene, split: str, record_id: str, index: int) -> str:
        relative = f"images/{split}/{record_id}.png"
        image = render(scene, self.params.image_size, split_rng(self.params.seed, f"{split}/render", index))
        image.save(self.out / relative, format="PNG", optimize=False)
        return relative

    def write(self, split: str, records: Iterator[dict]) -> int:
        counts = self.type_counts.setdefault(split, Counter())
        n = 0
        with open(self.out / f"{split}.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
                counts[record.get("type", "caption")] += 1
                n += 1
        return n

    def eval_records(self, split: str, count: int) -> Iterator[dict]:
        for index, scene in self.scenes(split, count, avoid_held_out=False):
            self.held_out.add(scene.signature)
            question = sample_question(split_rng(self.params.seed, f"{split}/question", index), scene)
            record_id = f"{split}-{index:06d}"
            yield {
                "id": record_id,
                "image": self.save_image(scene, split, record_id, index),
                "question": question.text,
                "answer": question.answer,
                "type": question.type,
                "scene": scene.describe(),
            }

    def text_records(self, split: str, count: int) -> Iterator[dict]:
        for index, scene in self.scenes(split, count, avoid_held_out=True):
            rng = split_rng(self.params.seed, f"{split}/question", index)
            if split == "backbone_text" and rng.random() < BOARD_SHARE:
                prompt = f"{scene.board()}\n{DESCRIBE_PROMPT}"
                yield {"id": f"{split}-{index:06d}", "type": "describe_board", "conversations": conversation(prompt, scene.describe())}
                continue
            if rng.random() < ARITHMETIC_SHARE:
                question = sample_arithmetic(rng, max_value=2 * self.params.max_objects + 4)
                prompt = question.text
            else:
                question = sample_question(rng, scene)
                prompt = text_prompt(scene.describe(), question.text)
            # Answer style per split: the text instructions (ViFT's stage-2 data) and the backbone's
            # pretraining text (the stand-in for an instruct LLM) are chosen apart.
            style = self.params.text_answers if split == "text_instructions" else self.params.backbone_answers
            reasoning = style == "reasoning"
            reply = question.reasoning if reasoning else question.answer
            yield {"id": f"{split}-{index:06d}", "type": question.type, "conversations": conversation(prompt, reply)}

    def caption_records(self, count: int) -> Iterator[dict]:
        for index, scene in self.scenes("captions", count, avoid_held_out=True):
            record_id = f"captions-{index:06d}"
            yield {
                "id": record_id,
                "image": self.save_image(scene, "captions", record_id, index),
                "type": "caption",
                "conversations": conversation(f"{IMAGE_TOKEN}\n{DESCRIBE_PROMPT}", scene.describe()),
            }

    def visual_records(self, count: int) -> Iterator[dict]:
        split = "visual_instructions"
        for index, scene in self.scenes(split, count, avoid_held_out=True):
            question = sample_question(split_rng(self.params.seed, f"{split}/question", index), scene)
            record_id = f"{split}-{index:06d}"
            yield {
                "id": record_id,
                "image": self.save_image(scene, split, record_id, index),
                "type": question.type,
                "conversations": conversation(f"{IMAGE_TOKEN}\n{question.text}", question.answer),
            }


def generate_shapetally(params: DataParams, out: str | Path) -> dict:
    """Generate every split into ``out`` (replaced atomically); return the summary written beside."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        gen = _Generator(params, tmp)
        for split in ("captions", "visual_instructions", *EVAL_SPLITS):
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        sizes = {}
        # Evaluation scenes first, so training splits can avoid them (held-out scenes).
        for split in EVAL_SPLITS:
            sizes[split] = gen.write(split, gen.eval_records(split, getattr(params, split)))
        for split in ("backbone_text", "text_instructions"):
            sizes[split] = gen.write(split, gen.text_records(split, getattr(params, split)))
        sizes["captions"] = gen.write("captions", gen.caption_records(params.captions))
        sizes["visual_instructions"] = gen.write("visual_instructions", gen.visual_records(params.visual_instructions))
        summary = {
            "world": "shapetally",
            "seed": params.seed,
            "sizes": sizes,
            "question_types": {split: dict(sorted(c.items())) for split, c in gen.type_counts.items()},
            "sha256": {split: file_sha256(tmp / f"{split}.jsonl") for split in SPLITS},
        }
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
