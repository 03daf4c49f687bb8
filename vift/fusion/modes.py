"""Inference modes: how the served model answers a question about an image.

- ``plain``: the stage-2 model on image + question;
- ``fused``: the same with the calibrated fusion (:mod:`vift.fusion.method`);
- ``describe_then_answer``: the model captions the image, then answers the question over its own
  caption as text (perception and the text skill joined through tokens).

The calibrate stage measures all three on the calibration split and records the one to serve
(:func:`choose_mode`); evaluation reports each as an ablation row (:data:`MODE_ROWS`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vift.data.manifests import caption_instruction
from vift.data.world import DESCRIBE_PROMPT, SCENE_PREFIX
from vift.errors import UserError
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


@dataclass(frozen=True)
class FusionFile:
    """``models/fusion.json`` (or a bare spec object), read and validated in one place: the fusion to
    apply, and the mode and prompts calibration chose to serve (defaults when not recorded)."""

    spec: FusionSpec
    mode: str = DEFAULT_MODE
    prompts: Prompts = Prompts()
    content: dict = field(default_factory=dict, compare=False)  # the whole file, e.g. its calibration summary

    @classmethod
    def read(cls, path: str | Path) -> FusionFile:
        """Every problem is a UserError naming the file (and the line or field)."""
        from pydantic import ValidationError

        from vift.config.schema import FusionParams

        path = Path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found; the calibrate stage writes models/fusion.json", exit_code=2) from None
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: malformed JSON: {error.msg}", exit_code=2) from None
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: unreadable ({error})", exit_code=2) from None
        spec = content.get("fusion", content) if isinstance(content, dict) else None
        if not isinstance(spec, dict):
            raise UserError(f"{path}: expected a JSON object with a 'fusion' object", exit_code=2)
        fields = set(FusionSpec.__dataclass_fields__)
        if unknown := sorted(set(spec) - fields):
            raise UserError(f"{path}: unknown fusion field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}", exit_code=2)
        try:
            FusionParams.model_validate(spec)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'fusion'}: {e['msg']}" for e in error.errors())
            raise UserError(f"{path}: invalid fusion: {problems}", exit_code=2) from None
        serving = content.get("serving") if spec is not content else None
        serving = serving if isinstance(serving, dict) else {}
        mode = serving.get("mode") if serving.get("mode") in MODES else DEFAULT_MODE
        prompts = serving.get("prompts")
        try:
            prompts = Prompts(**prompts) if isinstance(prompts, dict) else Prompts()
        except TypeError as error:
            raise UserError(f"{path}: serving.prompts: {error}", exit_code=2) from None
        return cls(FusionSpec.from_dict(spec), mode, prompts, content)


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
