"""Batched evaluation runners: answers per item (the one generation loop), scored into accuracy rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from vift.data.manifests import Manifest, VQARecord, load_rgb
from vift.fusion.method import FusionSpec, fused_generate
from vift.scoring.answers import score_answer
from vift.scoring.stats import wilson_interval


def load_vqa(path: str | Path, image_root: str | Path, policy: str = "skip", limit: int | None = None) -> list[VQARecord]:
    records = []
    for record in Manifest(path, "vqa", image_root, policy, image_required=True):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def load_images(records: Sequence[VQARecord], image_root: str | Path) -> list[Image.Image]:
    return [load_rgb(Path(image_root) / record.image) for record in records]


def answer_in_batches(
    model,
    processor,
    questions: Sequence[str],
    fusion: FusionSpec | None,
    batch_size: int,
    max_new_tokens: int,
    images: Callable[[list[int]], Sequence[Image.Image | None]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Answers to ``questions`` in order, ``batch_size`` at a time: the evaluation's one generation loop.

    ``images(indices)`` gives one batch's images (None for an item without one), so that only a
    batch of images need be in memory. Items with an image are asked with ``fusion``; items without
    are asked text-only and without fusion (fusion adds text-only states to an image pass; there is
    none). ``images`` None asks every question text-only with ``fusion`` as given, which
    :func:`~vift.fusion.method.fused_generate` refuses unless it is None or neutral.
    ``progress(done, total)`` is called after each batch.
    """
    answers: list[str] = [""] * len(questions)
    for begin in range(0, len(questions), batch_size):
        chunk = list(range(begin, min(begin + batch_size, len(questions))))
        loaded = list(images(chunk)) if images is not None else [None] * len(chunk)
        with_image = [i for i, image in zip(chunk, loaded) if image is not None]
        without = [i for i, image in zip(chunk, loaded) if image is None]
        if with_image:
            out = fused_generate(
                model, processor, [loaded[i - begin] for i in with_image], [questions[i] for i in with_image], fusion,
                batch_size=batch_size, max_new_tokens=max_new_tokens,
            )  # fmt: skip
            for i, answer in zip(with_image, out):
                answers[i] = answer
        if without:
            out = fused_generate(
                model, processor, None, [questions[i] for i in without], fusion if images is None else None,
                batch_size=batch_size, max_new_tokens=max_new_tokens,
            )  # fmt: skip
            for i, answer in zip(without, out):
                answers[i] = answer
        if progress:
            progress(chunk[-1] + 1, len(questions))
    return answers


def prediction_rows(
    records: Sequence[VQARecord],
    answers: Sequence[str],
    scorer: Callable[[VQARecord, str], dict] | None = None,
    workers: int = 1,
) -> list[dict]:
    """Per-item predictions: id, question, type, prediction, extracted answer, gold, correct.

    ``scorer(record, answer)`` replaces the rule-based extraction and scoring: it returns at least
    ``extracted`` and ``correct``; its other keys are added to the row (a benchmark's rules, the LLM
    judge: :func:`vift.benchmarks.scoring.make_scorer`). ``workers`` > 1 scores in that many threads
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
    batch_images = None if images is None else (lambda indices: [images[i] for i in indices])
    answers = answer_in_batches(model, processor, asked, fusion, batch_size, max_new_tokens, batch_images)
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
