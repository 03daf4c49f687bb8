"""Inference modes: how the served model answers a question about an image.

- ``plain``: the stage-2 model on image + question;
- ``fused``: the same with the calibrated fusion (:mod:`vift.fusion.method`);
- ``describe_then_answer``: the model captions the image, then answers the question over its own
  caption as text (perception and the text skill joined through tokens).

The calibrate stage measures all three on the calibration split and records the one to serve
(:func:`choose_mode`); evaluation reports each as an ablation row (:data:`MODE_ROWS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vift.data.manifests import caption_instruction
from vift.data.world import DESCRIBE_PROMPT, SCENE_PREFIX
from vift.fusion.method import FusionSpec, fused_generate
from vift.scoring.stats import SIGNIFICANCE, beyond_chance

MODES = ("plain", "fused", "describe_then_answer")
MODE_ROWS = {"plain": "vift_unfused", "fused": "vift_fused", "describe_then_answer": "describe_then_answer"}
DEFAULT_MODE = "fused"  # what a fusion.json without a recorded mode (older calibrations) serves
CAPTION_TOKENS = 64


@dataclass(frozen=True)
class Prompts:
    """The describe instruction and the question-over-a-description template (``params.prompts``)."""

    describe: str = DESCRIBE_PROMPT
    over_description: str = SCENE_PREFIX + "{description}\n{question}"

    def over(self, description: str, question: str) -> str:
        return self.over_description.format(description=description, question=question)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_params(cls, prompts, captions_manifest: str | Path) -> Prompts:
        """``params.prompts`` resolved: a null describe instruction is the captions' own."""
        return cls(prompts.describe or caption_instruction(captions_manifest), prompts.over_description)


def describe_then_answer(
    model, processor, images: Sequence, questions: Sequence[str], batch_size: int, max_new_tokens: int,
    prompts: Prompts = Prompts(), caption_tokens: int = CAPTION_TOKENS,
) -> tuple[list[str], list[str]]:  # fmt: skip
    """(answers, captions): each image captioned, then its question answered over the caption as text."""
    captions = fused_generate(
        model, processor, images, [prompts.describe] * len(questions), None, batch_size=batch_size, max_new_tokens=caption_tokens
    )
    over_captions = [prompts.over(caption, question) for caption, question in zip(captions, questions)]
    answers = fused_generate(model, processor, None, over_captions, None, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return answers, captions


def answer(
    model, processor, images: Sequence, questions: Sequence[str], mode: str, fusion: FusionSpec | None,
    batch_size: int, max_new_tokens: int, prompts: Prompts = Prompts(),
) -> list[str]:  # fmt: skip
    """Answers in ``mode`` (``fusion`` is used by ``fused`` only, ``prompts`` by ``describe_then_answer``)."""
    if mode == "describe_then_answer":
        return describe_then_answer(model, processor, images, questions, batch_size, max_new_tokens, prompts)[0]
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; one of {', '.join(MODES)}")
    spec = fusion if mode == "fused" else None
    return fused_generate(model, processor, images, questions, spec, batch_size=batch_size, max_new_tokens=max_new_tokens)


def choose_mode(correct: dict[str, Sequence[bool]], compare) -> dict:
    """The mode to serve, from per-item correctness on the calibration split.

    ``plain`` unless another mode beats it with the paired 95 % interval of the accuracy difference
    above 0 and the exact McNemar test below 0.05 (``compare(first, second)`` returns
    :func:`vift.scoring.stats.paired_comparison`'s dict); among those, the most accurate. A mode
    that only ties or wins by noise is not served.
    """
    accuracy = {mode: sum(items) / max(1, len(items)) for mode, items in correct.items()}
    versus_plain = {mode: compare(correct[mode], correct["plain"]) for mode in correct if mode != "plain"}
    winners = [mode for mode, comparison in versus_plain.items() if beyond_chance(comparison)]
    mode = max(winners, key=lambda m: (accuracy[m], -MODES.index(m))) if winners else "plain"
    return {
        "mode": mode,
        "accuracy": accuracy,
        "versus_plain": versus_plain,
        "rule": "plain unless a mode beats it on the calibration split with the paired bootstrap 95 % CI above 0 "
        f"and McNemar p < {SIGNIFICANCE}; then the most accurate such mode",
    }
