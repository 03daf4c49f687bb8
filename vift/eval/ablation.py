"""The ablation table: what fusion adds, against the baselines and the controls that expose text priors.

Rows (each: accuracy, Wilson 95 % interval, n, per question type):
- ``caption_only``: the stage-1 model, plain.
- ``vift_unfused``: the stage-2 model, plain.
- ``vift_fused``: the stage-2 model with the calibrated fusion.
- ``vit_baseline``: visual instruction tuning at equal compute, plain.
- ``describe_then_answer``: the stage-2 model captions the image, then answers over its caption as text.
- ``question_only`` (control): the stage-2 model, the question without the image.
- ``fused_wrong_image`` (control): the calibrated fusion with every question paired with another
  item's image; a gain this row also gets is a text prior, not perception.
- ``fused_blank_image`` (control): the calibrated fusion over a black image of the same size (the
  reference code's commented-out variant subtracts a black-image pass): what fusion gives with no
  visual content at all.
- ``majority_per_type`` (control): the most common gold answer of each question type (in the
  evaluated split itself: an upper bound for any answer prior per type).
- ``oracle_description`` (ceiling, when test records carry a reference description): the stage-2
  model answering over the true description as text: what perfect perception would give its text skill.

With reference descriptions, :func:`perception` also reports how often each model's caption states
the reference content (metrics.json ``perception``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from vift.data.manifests import reference_of
from vift.eval.runner import predict, prediction_rows, score
from vift.fusion.method import FusionSpec
from vift.fusion.modes import CAPTION_TOKENS, Prompts, describe_then_answer
from vift.scoring.stats import paired_comparison

CONTROLS = ("vift_unfused", "question_only", "fused_wrong_image", "fused_blank_image")
COMPARED_WITH_FUSED = (*CONTROLS, "describe_then_answer", "vit_baseline", "caption_only")
# What any servable row must beat to count as using the image at all: the question alone and the
# best answer prior per type. The registry's gate reads these (metrics.json "evidence").
PRIOR_CONTROLS = ("question_only", "majority_per_type")
SERVABLE_ROWS = ("vift_fused", "vift_unfused", "describe_then_answer", "vit_baseline", "caption_only")


def wrong_image_order(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point: item i gets the image of item order[i] != i."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    return [int(order[(np.where(order == i)[0][0] + 1) % n]) for i in range(n)] if n > 1 else list(range(n))


def majority_rows(records) -> list[dict]:
    by_type: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        by_type[record.type or "untyped"][record.answer] += 1
    guesses = {t: counts.most_common(1)[0][0] for t, counts in by_type.items()}
    return prediction_rows(records, [guesses[r.type or "untyped"] for r in records])


def run_ablation(
    models: dict[str, Callable[[], tuple]],
    records: Sequence,
    images: Sequence,
    fusion: FusionSpec,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
    caption_tokens: int = CAPTION_TOKENS,
    progress: Callable[[str], None] | None = None,
    prompts: Prompts = Prompts(),
) -> dict[str, list[dict]]:
    """Per-row predictions. ``models`` maps caption / vift / vit to loaders of (model, processor)."""
    rows: dict[str, list[dict]] = {}

    def step(name: str) -> None:
        if progress:
            progress(name)

    run = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    if "caption" in models:
        step("caption_only")
        model, processor = models["caption"]()
        rows["caption_only"] = predict(model, processor, records, images, None, **run)
    model, processor = models["vift"]()
    step("vift_unfused")
    rows["vift_unfused"] = predict(model, processor, records, images, None, **run)
    step("vift_fused")
    rows["vift_fused"] = predict(model, processor, records, images, fusion, **run)
    step("question_only")
    rows["question_only"] = predict(model, processor, records, None, None, **run)
    step("fused_wrong_image")
    shuffled = [images[i] for i in wrong_image_order(len(images), seed)]
    rows["fused_wrong_image"] = predict(model, processor, records, shuffled, fusion, **run)
    step("fused_blank_image")
    blank = [Image.new("RGB", image.size, "black") for image in images]
    rows["fused_blank_image"] = predict(model, processor, records, blank, fusion, **run)
    step("describe_then_answer")
    answers, captions = describe_then_answer(
        model, processor, images, [r.question for r in records], batch_size, max_new_tokens, prompts, caption_tokens
    )
    rows["describe_then_answer"] = prediction_rows(records, answers)
    for row, caption in zip(rows["describe_then_answer"], captions):
        row["caption"] = caption
    scenes = [reference_of(r) for r in records]
    if all(scenes):
        step("oracle_description")
        rows["oracle_description"] = predict(
            model, processor, records, None, None, questions=[prompts.over(s, r.question) for s, r in zip(scenes, records)], **run
        )
    if "vit" in models:
        step("vit_baseline")
        model, processor = models["vit"]()
        rows["vit_baseline"] = predict(model, processor, records, images, None, **run)
    rows["majority_per_type"] = majority_rows(records)
    return rows


def summarise(rows: dict[str, list[dict]], bootstrap_samples: int, seed: int) -> dict:
    """metrics.json: scored rows, paired comparisons of vift_fused, and the verdict on fusion."""
    ids = [r["id"] for r in rows["vift_fused"]]
    for name, items in rows.items():
        if [r["id"] for r in items] != ids:  # paired statistics need the same items in the same order
            raise ValueError(f"row {name} does not cover the same items as vift_fused")
    scored = {name: score(items) for name, items in rows.items()}
    fused = [r["correct"] for r in rows["vift_fused"]]
    paired = {
        f"vift_fused_vs_{other}": paired_comparison(fused, [r["correct"] for r in rows[other]], bootstrap_samples, seed)
        for other in COMPARED_WITH_FUSED
        if other in rows
    }
    beats = {other: paired[f"vift_fused_vs_{other}"]["ci95"][0] > 0 for other in CONTROLS if other in rows}
    evidence = {
        row: {
            control: paired_comparison([r["correct"] for r in rows[row]], [r["correct"] for r in rows[control]], bootstrap_samples, seed)
            for control in PRIOR_CONTROLS
            if control in rows
        }
        for row in SERVABLE_ROWS
        if row in rows
    }
    return {
        "rows": scored,
        "paired": paired,
        "evidence": evidence,
        "verdict": {
            "fusion_beats_controls": all(beats.values()),
            "beats": beats,
            "rule": "vift_fused must beat vift_unfused, question_only, fused_wrong_image and fused_blank_image (those present) with the paired "
            "bootstrap 95 % CI of the accuracy difference above 0",
        },
    }


def perception(
    models: dict[str, Callable[[], tuple]], records: Sequence, images: Sequence, prompt: str, batch_size: int,
    caption_tokens: int = CAPTION_TOKENS,
) -> dict | None:  # fmt: skip
    """Per model (caption / vift / vit): how often its caption of a test image states exactly the
    reference content (Wilson 95 % interval), and phrase-level F1. None without references."""
    from vift.fusion.method import fused_generate
    from vift.scoring.stats import wilson_interval
    from vift.train.caption_check import caption_states_reference, score_captions

    references = [reference_of(r) for r in records]
    if not records or not all(references):
        return None
    out = {}
    for name, load in models.items():
        model, processor = load()
        captions = fused_generate(
            model, processor, images, [prompt] * len(records), None, batch_size=batch_size, max_new_tokens=caption_tokens
        )
        correct = sum(caption_states_reference(c, r) for c, r in zip(captions, references))
        scores = score_captions(captions, references)
        out[name] = {
            "accuracy": correct / len(records),
            "ci95": list(wilson_interval(correct, len(records))),
            "n": len(records),
            "phrase_f1": scores["phrase_f1"],
            "examples": [{"reference": r, "caption": c} for r, c in zip(references[:2], captions[:2])],
        }
    return out
