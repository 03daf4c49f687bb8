"""Batched evaluation runners: predictions per item, scored into accuracy rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from vift.data.manifests import Manifest, VQARecord
from vift.eval.answers import score_answer
from vift.eval.stats import wilson_interval
from vift.fusion.method import FusionSpec, fused_generate


def load_vqa(path: str | Path, image_root: str | Path, policy: str = "skip", limit: int | None = None) -> list[VQARecord]:
    records = []
    for record in Manifest(path, "vqa", image_root, policy, image_required=True):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def load_images(records: Sequence[VQARecord], image_root: str | Path) -> list[Image.Image]:
    images = []
    for record in records:
        with Image.open(Path(image_root) / record.image) as image:
            images.append(image.convert("RGB"))
    return images


def prediction_rows(
    records: Sequence[VQARecord],
    answers: Sequence[str],
    scorer: Callable[[VQARecord, str], dict] | None = None,
    workers: int = 1,
) -> list[dict]:
    """Per-item predictions: id, question, type, prediction, extracted answer, gold, correct.

    ``scorer(record, answer)`` replaces the rule-based extraction and scoring: it returns at least
    ``extracted`` and ``correct``; its other keys are added to the row (a benchmark's rules, the LLM
    judge: :func:`vift.eval.benchmarks.make_scorer`). ``workers`` > 1 scores in that many threads
    (for a scorer that waits on a server); rows keep the records' order.
    """

    score_one = scorer or score_answer
    pairs = list(zip(records, answers))
    if workers > 1 and len(pairs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda pair: score_one(*pair), pairs))
    else:
        results = [score_one(record, answer) for record, answer in pairs]
    rows = []
    for (record, answer), result in zip(pairs, results):
        extra = {k: v for k, v in result.items() if k not in ("extracted", "correct")}
        rows.append(
            {
                "id": record.id,
                "question": record.question,
                "type": record.type or "untyped",
                "prediction": answer,
                "extracted": result["extracted"],
                "gold": record.answer,
                "correct": bool(result["correct"]),
                **extra,
            }
        )
    return rows


def predict(
    model,
    processor,
    records: Sequence[VQARecord],
    images: Sequence[Image.Image] | None,
    fusion: FusionSpec | None,
    batch_size: int,
    max_new_tokens: int,
    questions: Sequence[str] | None = None,
    scorer: Callable[[VQARecord, str], dict] | None = None,
) -> list[dict]:
    """Answer ``records`` (``images`` None: text-only; ``questions`` overrides the asked text).

    ``scorer``: see :func:`prediction_rows` (default: the rule-based extraction and scoring)."""
    asked = list(questions) if questions is not None else [r.question for r in records]
    answers = fused_generate(model, processor, images, asked, fusion, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return prediction_rows(records, answers, scorer)


def score(rows: Sequence[dict]) -> dict:
    """Accuracy, Wilson 95 % interval, n, and the same per question type."""

    def summary(items: Sequence[dict]) -> dict:
        correct = sum(r["correct"] for r in items)
        n = len(items)
        low, high = wilson_interval(correct, n)
        return {"accuracy": correct / n if n else 0.0, "ci95": [low, high], "n": n}

    by_type: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row)
    return {**summary(rows), "by_type": {t: summary(items) for t, items in sorted(by_type.items())}}
