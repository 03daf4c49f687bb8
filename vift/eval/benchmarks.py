"""Real benchmarks from local files in their public layouts: MathVista, MathVerse, MathVision testmini.

Each loader turns one benchmark's annotation file into :class:`~vift.data.manifests.VQARecord` s:
``id``; ``image`` relative to the data directory (it may not escape it); ``question`` = the prompt
the model is asked (the benchmark's question and choices, then its answer-format rule as the last
line, or a prompt field of the file itself with ``prompt_field``); ``answer`` = the gold answer;
``choices`` for multiple choice; ``type`` = the breakdown key (MathVista ``category``: the paper's
MVQA / GVQA columns; MathVerse ``problem_version``; MathVision ``subject``). Scoring facts travel as
extra fields: ``benchmark``, ``question_type`` (multi_choice / free_form), ``answer_type``,
``precision``, ``judge_question`` (what the LLM judge is shown).

Public layouts read (no network, no ``datasets``):

- MathVista (``testmini.json`` of the MathVista repository): a JSON object keyed by ``pid`` (a JSON
  list of the same records also works), each ``{question, image, choices, unit, precision, answer,
  question_type: multi_choice|free_form, answer_type: integer|float|text|list, pid, metadata:
  {category: math-targeted-vqa|general-vqa, task, context, grade, source, skills, ...}, query}``.
  Multiple-choice gold answers are the option texts.
- MathVerse (``testmini.json``): a JSON list of ``{sample_index, problem_index, problem_version,
  question, image, answer, question_type: multi-choice|free-form, metadata: {split, source, subject,
  subfield}, query_wo, query_cot, question_for_eval}``. Options are written inside ``question``
  ("Choices:\\nA:...\\nB:..."); gold answers of multiple choice are letters; ``image`` may be empty
  (the Text Only version): such items are asked without an image.
- MathVision (``testmini.jsonl`` / ``test.jsonl`` of MATH-V): JSON lines ``{id, question, options,
  image, answer, solution, level, subject}``; ``options`` empty means free form; multiple-choice gold
  answers are letters; ``<image1>`` placeholders in questions are dropped (the image is attached).
- ``vqa``: this project's VQA manifests (``test.jsonl`` of the data stage), scored as the ablation is.

Images are looked up relative to the annotation file's folder, then its ``images/`` subfolder, then
the data directory and its ``images/`` subfolder. Any problem (unreadable JSON, a missing field, an
answer that is not among the choices, a missing or corrupt image, a path escaping the data
directory, a duplicate id) raises :class:`~vift.errors.UserError` naming the file, the record and
the problem: benchmark numbers over silently skipped items would not be comparable.

Scoring (``score_prediction``): the final answer is isolated (the last ``\\boxed{...}``, else what
follows the last "answer is" / "Answer:", else the whole response), then
- multiple choice: the option letter (``(B)``, ``B.``, ``answer is B``, a lone ``B``) or an option's
  text stated as the answer; correct if it is the gold option;
- MathVista free form: exact match after normalising to the answer type, as the MathVista scorer
  does: integers compared as integers, floats rounded to ``precision`` decimals, lists element-wise;
- MathVerse / MathVision free form: the last number, compared with a relative tolerance of 1e-4
  when the gold answer is numeric (``\\frac{a}{b}`` and ``a/b`` count as numbers), else the
  normalised expression (LaTeX spacing, ``$``, ``\\left``/``\\right``, degree signs removed);
- with the LLM judge (:mod:`vift.eval.judge`) the judge extracts the answer instead; MathVista then
  applies the same exact match, MathVerse and MathVision (and ``vqa``) ask the judge whether the
  extraction agrees with the gold answer, as the reference protocol does.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vift.data.manifests import VQARecord, check_image, resolve_image
from vift.errors import UserError

BENCHMARKS = ("mathvista", "mathverse", "mathvision", "vqa")

MULTI_CHOICE = "multi_choice"
FREE_FORM = "free_form"

MC_INSTRUCTION = "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
FREE_FORM_INSTRUCTION = "Please answer the question and provide the final value, e.g., 1, 2.5, 300, at the end."
INTEGER_INSTRUCTION = "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end."
LIST_INSTRUCTION = (
    "Please answer the question requiring a Python list as an answer and provide the final list, "
    "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end."
)
IMAGE_QUESTION = "Answer the question shown in the image."
_DECIMALS = {1: "one decimal place", 2: "two decimal places", 3: "three decimal places"}


def float_instruction(precision: int) -> str:
    """MathVista's rule for a float answer with ``precision`` decimals."""
    if precision == 0:
        return INTEGER_INSTRUCTION
    places = _DECIMALS.get(precision, f"{precision} decimal places")
    example = "1.23, 1.34, 1.45" if precision == 2 else ", ".join(f"{v:.{precision}f}" for v in (1.2, 1.3, 1.4))
    return (
        f"Please answer the question requiring a floating-point number with {places} and provide the final "
        f"value, e.g., {example}, at the end."
    )


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    files: tuple[str, ...]  # annotation files tried under --data, in order
    breakdowns: tuple[str, ...]  # allowed breakdown keys; the first is the default
    title: str


SPECS = {
    "mathvista": BenchmarkSpec(
        "mathvista",
        ("testmini.json", "data/testmini.json", "annot_testmini.json", "data/annot_testmini.json"),
        ("category", "question_type", "answer_type", "task", "context", "grade", "source", "language"),
        "MathVista testmini",
    ),
    "mathverse": BenchmarkSpec(
        "mathverse",
        ("testmini.json", "data/testmini.json"),
        ("problem_version", "question_type", "subject", "subfield", "source"),
        "MathVerse testmini",
    ),
    "mathvision": BenchmarkSpec(
        "mathvision",
        ("testmini.jsonl", "data/testmini.jsonl", "test.jsonl", "data/test.jsonl"),
        ("subject", "level", "question_type"),
        "MathVision",
    ),
    "vqa": BenchmarkSpec("vqa", ("test.jsonl",), ("type",), "VQA manifest"),
}


def _spec(name: str) -> BenchmarkSpec:
    if name not in SPECS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}", exit_code=2)
    return SPECS[name]


def find_annotation(benchmark: str, data: str | Path, file: str | None = None) -> tuple[Path, Path]:
    """``(annotation file, data directory)`` for ``--data`` (a folder, or the annotation file itself)."""
    spec = _spec(benchmark)
    data = Path(data)
    if data.is_file():
        if file:
            raise UserError(f"--data {data} is a file; --file only applies when --data is a folder", exit_code=2)
        return data, data.parent
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder (expected the {spec.title} folder or its annotation file)")
    if file:
        path = data / file
        try:
            resolve_image(data, file)
        except ValueError:
            raise UserError(f"--file {file}: escapes the data folder {data}", exit_code=2) from None
        if not path.is_file():
            raise UserError(f"--file {file}: not found under {data}")
        return path, data
    for name in spec.files:
        if (data / name).is_file():
            return data / name, data
    raise UserError(
        f"{data}: no {spec.title} annotation file found (tried {', '.join(spec.files)}); "
        f"pass --file NAME or point --data at the file"
    )


# ---------------------------------------------------------------------------------------------------
# Loading


class _Source:
    """One annotation file being read: error messages and image lookup."""

    def __init__(self, path: Path, data_dir: Path, check_images: bool):
        self.path = path
        self.data_dir = Path(os.path.normpath(data_dir.absolute()))
        self.check_images = check_images
        folder = Path(os.path.normpath(path.parent.absolute()))
        roots = [folder, folder / "images", self.data_dir, self.data_dir / "images"]
        self.roots = list(dict.fromkeys(r for r in roots if r.is_relative_to(self.data_dir)))
        self.ids: set[str] = set()

    def fail(self, where: str, message: str) -> UserError:
        return UserError(f"{self.path}: {where}: {message}", exit_code=2)

    def image(self, raw: Any, where: str, optional: bool = False) -> str | None:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if optional:
                return None
            raise self.fail(where, "field 'image' is missing or empty")
        if not isinstance(raw, str):
            raise self.fail(where, f"field 'image' must be a relative path, got {type(raw).__name__}")
        tried = []
        for root in self.roots:
            # lexical, as resolve_image: a data folder that links its image folders in still works
            candidate = Path(os.path.normpath(root / raw))
            if Path(raw).is_absolute() or not candidate.is_relative_to(self.data_dir):
                raise self.fail(where, f"image path {raw!r} escapes the data folder {self.data_dir}")
            tried.append(candidate)
            if candidate.is_file():
                if self.check_images and (problem := check_image(candidate)):
                    raise self.fail(where, problem)
                return candidate.relative_to(self.data_dir).as_posix()
        raise self.fail(where, f"image {raw!r} not found (looked for {', '.join(str(t) for t in tried)})")

    def claim(self, record_id: str, where: str) -> str:
        if record_id in self.ids:
            raise self.fail(where, f"duplicate id {record_id!r}")
        self.ids.add(record_id)
        return record_id


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno})", exit_code=2) from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason})", exit_code=2) from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_no}: malformed JSON: {error.msg} (column {error.colno})", exit_code=2) from None


def _text(source: _Source, raw: dict, key: str, where: str, required: bool = True, empty: bool = False) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise source.fail(where, f"field {key!r} is missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise source.fail(where, f"field {key!r} must be text, got {type(value).__name__}")
    value = str(value)
    if required and not empty and not value.strip():
        raise source.fail(where, f"field {key!r} is empty")
    return value


def _metadata(source: _Source, raw: dict, where: str) -> dict:
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise source.fail(where, f"field 'metadata' must be an object, got {type(metadata).__name__}")
    return metadata


def _breakdown(source: _Source, raw: dict, metadata: dict, key: str, derived: dict, where: str) -> str:
    for values in (derived, raw, metadata):
        if key in values and values[key] not in (None, ""):
            return str(values[key])
    raise source.fail(where, f"no {key!r} to break results down by (in the record or its metadata)")


def _choices_block(choices: Sequence[str]) -> str:
    return "Choices:\n" + "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))


def _prompt(source: _Source, raw: dict, prompt_field: str | None, built: str, where: str) -> str:
    if prompt_field is None:
        return built
    value = raw.get(prompt_field)
    if not isinstance(value, str) or not value.strip():
        raise source.fail(where, f"prompt field {prompt_field!r} is missing or empty (drop --prompt-field to build prompts)")
    return value


def _letter_index(answer: str, n: int) -> int | None:
    answer = answer.strip().strip("()").strip()
    if len(answer) == 1 and answer.upper() in _LETTERS[:n]:
        return _LETTERS.index(answer.upper())
    return None


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _mathvista(source: _Source, key: str | None, raw: dict, where: str, breakdown: str, prompt_field: str | None) -> VQARecord:
    pid = _text(source, raw, "pid", where, required=key is None) or str(key)
    where = f"pid {pid}" if key is not None else f"{where} (pid {pid})"
    question = _text(source, raw, "question", where)
    question_type = _text(source, raw, "question_type", where)
    if question_type not in (MULTI_CHOICE, FREE_FORM):
        raise source.fail(where, f"question_type {question_type!r} is neither multi_choice nor free_form")
    answer_type = _text(source, raw, "answer_type", where)
    if answer_type not in ("integer", "float", "text", "list"):
        raise source.fail(where, f"answer_type {answer_type!r} is not one of integer, float, text, list")
    answer = _text(source, raw, "answer", where)
    precision = raw.get("precision")
    if precision is not None:
        if isinstance(precision, bool) or not isinstance(precision, (int, float)) or precision < 0 or precision != int(precision):
            raise source.fail(where, f"precision {precision!r} must be a whole number of decimals")
        precision = int(precision)
    if answer_type == "float" and precision is None:
        raise source.fail(where, "answer_type float needs a precision (decimal places)")
    unit = _text(source, raw, "unit", where, required=False).strip()
    choices = raw.get("choices")
    if question_type == MULTI_CHOICE:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) for c in choices):
            raise source.fail(where, "a multi_choice question needs 'choices': a list of at least two options")
        choices = [str(c) for c in choices]
        if answer not in choices:
            raise source.fail(where, f"answer {answer!r} is not one of the choices {choices}")
    else:
        choices = None
    metadata = _metadata(source, raw, where)
    asked = question + (f" (Unit: {unit})" if unit else "")
    if choices:
        body, rule = f"Question: {asked}\n{_choices_block(choices)}", MC_INSTRUCTION
    else:
        body = f"Question: {asked}"
        rule = {"integer": INTEGER_INSTRUCTION, "list": LIST_INSTRUCTION}.get(answer_type, FREE_FORM_INSTRUCTION)
        if answer_type == "float":
            rule = float_instruction(precision)
    derived = {"question_type": question_type, "answer_type": answer_type}
    return VQARecord(
        id=source.claim(pid, where),
        image=source.image(raw.get("image"), where),
        question=_prompt(source, raw, prompt_field, f"{body}\n{rule}", where),
        answer=answer,
        choices=choices,
        type=_breakdown(source, raw, metadata, breakdown, derived, where),
        benchmark="mathvista",
        question_type=question_type,
        answer_type=answer_type,
        precision=precision,
        judge_question=body,
    )


_CHOICE_LINE = re.compile(r"^\s*\(?([A-H])\s*[):.．：]\s*(.*?)\s*$")


def parse_inline_choices(question: str) -> list[str]:
    """Option texts written in a question after "Choices:" (``A:40°`` / ``(B) 60`` / ``C. 120``)."""
    parts = re.split(r"choices\s*:", question, flags=re.IGNORECASE)
    if len(parts) < 2:
        return []
    options = []
    for line in parts[-1].splitlines():
        found = _CHOICE_LINE.match(line)
        if found and found.group(1) == _LETTERS[len(options)]:
            options.append(found.group(2))
        elif options and line.strip():
            break
    return options if len(options) >= 2 else []


def _mathverse(source: _Source, raw: dict, where: str, breakdown: str, prompt_field: str | None) -> VQARecord:
    sample = _text(source, raw, "sample_index", where)
    where = f"{where} (sample_index {sample})"
    question = _text(source, raw, "question", where, empty=True)
    answer = _text(source, raw, "answer", where)
    raw_type = _text(source, raw, "question_type", where)
    if raw_type not in ("multi-choice", "free-form"):
        raise source.fail(where, f"question_type {raw_type!r} is neither multi-choice nor free-form")
    metadata = _metadata(source, raw, where)
    choices = None
    if raw_type == "multi-choice":
        parsed = parse_inline_choices(question)
        index = _letter_index(answer, len(parsed) if parsed else 26)
        if index is None and answer in parsed:
            index = parsed.index(answer)
        if index is None:
            raise source.fail(where, f"multi-choice answer {answer!r} is not an option letter" + (f" of {parsed}" if parsed else ""))
        # options drawn in the image only (vision versions): the letters stand for the options
        choices = parsed or list(_LETTERS[: max(4, index + 1)])
        answer = _LETTERS[index]
    body = f"Question: {question.strip()}" if question.strip() else IMAGE_QUESTION
    rule = MC_INSTRUCTION if choices else FREE_FORM_INSTRUCTION
    derived = {"question_type": raw_type}
    judge_question = str(raw.get("question_for_eval") or question or raw.get("query_cot") or IMAGE_QUESTION)
    return VQARecord(
        id=source.claim(sample, where),
        image=source.image(raw.get("image"), where, optional=True),
        question=_prompt(source, raw, prompt_field, f"{body}\n{rule}", where),
        answer=answer,
        choices=choices,
        type=_breakdown(source, raw, metadata, breakdown, derived, where),
        benchmark="mathverse",
        question_type=MULTI_CHOICE if choices else FREE_FORM,
        answer_type="text",
        precision=None,
        judge_question=judge_question,
        problem_index=str(raw.get("problem_index", "")),
    )


_IMAGE_PLACEHOLDER = re.compile(r"\s*<image\d*>\s*")


def _mathvision(source: _Source, raw: dict, where: str, breakdown: str, prompt_field: str | None) -> VQARecord:
    record_id = _text(source, raw, "id", where)
    where = f"{where} (id {record_id})"
    question = _IMAGE_PLACEHOLDER.sub("\n", _text(source, raw, "question", where)).strip()
    if not question:
        raise source.fail(where, "field 'question' has nothing but image placeholders")
    answer = _text(source, raw, "answer", where)
    options = raw.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) for o in options):
        raise source.fail(where, "field 'options' must be a list of option texts")
    options = [str(o) for o in options]
    choices = None
    if options:
        index = _letter_index(answer, len(options))
        if index is None and answer in options:
            index = options.index(answer)
        if index is None:
            raise source.fail(where, f"answer {answer!r} is not an option letter of {len(options)} options")
        choices, answer = options, _LETTERS[index]
    metadata = _metadata(source, raw, where)
    body = f"Question: {question}" + (f"\n{_choices_block(choices)}" if choices else "")
    question_type = MULTI_CHOICE if choices else FREE_FORM
    derived = {"question_type": question_type}
    return VQARecord(
        id=source.claim(record_id, where),
        image=source.image(raw.get("image"), where),
        question=_prompt(source, raw, prompt_field, f"{body}\n{MC_INSTRUCTION if choices else FREE_FORM_INSTRUCTION}", where),
        answer=answer,
        choices=choices,
        type=_breakdown(source, raw, metadata, breakdown, derived, where),
        benchmark="mathvision",
        question_type=question_type,
        answer_type="text",
        precision=None,
        judge_question=body,
    )


def load_benchmark(
    benchmark: str,
    data: str | Path,
    file: str | None = None,
    limit: int | None = None,
    breakdown: str | None = None,
    prompt_field: str | None = None,
    check_images: bool = True,
) -> tuple[list[VQARecord], Path, Path]:
    """``(records, annotation file, data directory)``: the first ``limit`` records, in file order."""
    spec = _spec(benchmark)
    breakdown = breakdown or spec.breakdowns[0]
    if breakdown not in spec.breakdowns:
        raise UserError(f"--breakdown {breakdown!r}: {benchmark} breaks down by one of {', '.join(spec.breakdowns)}", exit_code=2)
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1", exit_code=2)
    path, data_dir = find_annotation(benchmark, data, file)
    if benchmark == "vqa":
        if prompt_field:
            raise UserError("--prompt-field does not apply to vqa manifests (their question is the prompt)", exit_code=2)
        from vift.eval.runner import load_vqa

        return load_vqa(path, data_dir, "fail", limit), path, data_dir
    source = _Source(path, data_dir, check_images)
    records: list[VQARecord] = []

    def full() -> bool:
        return limit is not None and len(records) >= limit

    def record_object(raw: Any, where: str) -> dict:
        if not isinstance(raw, dict):
            raise source.fail(where, f"expected a JSON object, got {type(raw).__name__}")
        return raw

    if benchmark == "mathvision":
        for line, raw in _read_jsonl(path):
            records.append(_mathvision(source, record_object(raw, f"line {line}"), f"line {line}", breakdown, prompt_field))
            if full():
                break
        return records, path, data_dir
    content = _read_json(path)
    if benchmark == "mathvista":
        if isinstance(content, dict):
            items = [(str(k), v, f"pid {k}") for k, v in content.items()]
        elif isinstance(content, list):
            items = [(None, v, f"record {i}") for i, v in enumerate(content)]
        else:
            raise UserError(f"{path}: expected a JSON object keyed by pid (or a list of records)", exit_code=2)
        for key, raw, where in items:
            records.append(_mathvista(source, key, record_object(raw, where), where, breakdown, prompt_field))
            if full():
                break
    else:
        if not isinstance(content, list):
            raise UserError(f"{path}: expected a JSON list of MathVerse records", exit_code=2)
        for index, raw in enumerate(content):
            where = f"record {index}"
            records.append(_mathverse(source, record_object(raw, where), where, breakdown, prompt_field))
            if full():
                break
    if not records:
        raise UserError(f"{path}: no records", exit_code=2)
    return records, path, data_dir


# ---------------------------------------------------------------------------------------------------
# Generation


def load_image(record: VQARecord, data_dir: str | Path) -> Image.Image:
    path = Path(data_dir) / str(record.image)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise UserError(f"record {record.id}: image {path} unreadable ({error})") from None


def generate_answers(
    model,
    processor,
    records: Sequence[VQARecord],
    data_dir: str | Path,
    fusion,
    batch_size: int,
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Responses in record order; images are loaded a batch at a time.

    Records without an image (MathVerse Text Only) are asked text-only, without fusion (fusion adds
    text-only states to an image pass; there is none).
    """
    from vift.fusion.method import fused_generate

    answers: list[str] = [""] * len(records)
    for begin in range(0, len(records), batch_size):
        chunk = list(range(begin, min(begin + batch_size, len(records))))
        with_image = [i for i in chunk if records[i].image is not None]
        without = [i for i in chunk if records[i].image is None]
        if with_image:
            images = [load_image(records[i], data_dir) for i in with_image]
            out = fused_generate(
                model, processor, images, [records[i].question for i in with_image], fusion,
                batch_size=batch_size, max_new_tokens=max_new_tokens,
            )  # fmt: skip
            for i, answer in zip(with_image, out):
                answers[i] = answer
        if without:
            out = fused_generate(
                model, processor, None, [records[i].question for i in without], None,
                batch_size=batch_size, max_new_tokens=max_new_tokens,
            )  # fmt: skip
            for i, answer in zip(without, out):
                answers[i] = answer
        if progress:
            progress(chunk[-1] + 1, len(records))
    return answers


# ---------------------------------------------------------------------------------------------------
# Rule-based extraction and scoring

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRACTION = re.compile(r"(-?)\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return text[start:]


def final_segment(response: str) -> str:
    """Where the final answer is: the last ``\\boxed{}``, else after the last "answer is", else all."""
    boxed = _boxed(response)
    if boxed is not None:
        return boxed.strip()
    found = list(_ANSWER_IS.finditer(response))
    if found:
        tail = response[found[-1].end() :].strip()
        if tail:
            return tail.splitlines()[0].strip()
    return response.strip()


_LETTER_PATTERNS = (
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*:?\s*\(?([A-Z])\b(?![-'’])"),
    re.compile(r"(?:^|\n)\s*([A-Z])\s*(?:[.:)]|$)", re.MULTILINE),
    re.compile(r"(?:^|\s)([A-Z])[.)]?\s*$"),
)


def extract_letter(text: str, choices: Sequence[str]) -> str:
    """The option letter ``text`` answers with ("" if none): the last one stated, by position."""
    n = len(choices)
    text = text.strip()
    if len(text) == 1 and text.upper() in _LETTERS[:n]:
        return text.upper()
    best: tuple[int, str] | None = None
    for pattern in _LETTER_PATTERNS:
        for found in pattern.finditer(text):
            letter = found.group(1).upper()
            if letter in _LETTERS[:n] and (best is None or found.start(1) > best[0]):
                best = (found.start(1), letter)
    if best:
        return best[1]
    plain = _normalise_math(text)
    for index, choice in enumerate(choices):
        if _normalise_math(choice) and _normalise_math(choice) == plain:
            return _LETTERS[index]
    return ""


def _normalise_math(text: str) -> str:
    text = text.strip().strip("$").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                     ("^{\\circ}", ""), ("°", ""), ("\\%", "%"), ("\\,", ""), ("\\!", ""), ("\\ ", ""), ("$", ""),
                     ("\\text{", "{"), ("\\mathrm{", "{"), ("√", "\\sqrt")):  # fmt: skip
        text = text.replace(old, new)
    text = re.sub(r"\s+", "", text).lower()
    return text.rstrip(".")


def _value(text: str) -> float | None:
    """The number ``text`` is (decimal, ``a/b``, ``\\frac{a}{b}``, percent stripped), else None."""
    text = _normalise_math(text).replace(",", "").rstrip("%")
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    try:
        return float(text)
    except ValueError:
        pass
    found = _FRACTION.fullmatch(text)
    if found:
        sign, top, bottom = (found.group(1), found.group(2), found.group(3)) if found.group(2) else ("", found.group(4), found.group(5))
        try:
            value = float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            return None
        return -value if sign else value
    return None


def last_number(text: str) -> str:
    """The last number in ``text`` (fractions ``\\frac{a}{b}`` / ``a/b`` kept whole), or ""."""
    candidates = [(m.start(), m.group(0)) for m in _FRACTION.finditer(text)]
    covered = [(m.start(), m.end()) for m in _FRACTION.finditer(text)]
    candidates += [(m.start(), m.group(0)) for m in _NUMBER.finditer(text) if not any(a <= m.start() < b for a, b in covered)]
    return max(candidates)[1].strip() if candidates else ""


def _close(a: float, b: float, tolerance: float = 1e-4) -> bool:
    return abs(a - b) <= tolerance * max(1.0, abs(b))


def _parse_list(text: str) -> list[str] | None:
    found = re.findall(r"\[([^\[\]]*)\]", text)
    if not found:
        return None
    return [item.strip().strip("'\"") for item in found[-1].split(",") if item.strip()]


def _extra(record: VQARecord, key: str, default=None):
    return (record.model_extra or {}).get(key, default)


def extract_final(record: VQARecord, response: str, lenient_choice: bool = False) -> str:
    """The answer ``response`` gives, in the form the record's gold answer takes ("" if none).

    ``lenient_choice``: for multiple choice with no letter or exact option text, take the most
    similar option (the MathVista scorer's rule after its LLM extraction).
    """
    segment = final_segment(response)
    if record.choices:
        letter = extract_letter(segment, record.choices) or (extract_letter(response, record.choices) if segment != response.strip() else "")
        if not letter and lenient_choice and segment:
            scores = [difflib.SequenceMatcher(None, segment.lower(), c.lower()).ratio() for c in record.choices]
            letter = _LETTERS[scores.index(max(scores))]
        return letter
    answer_type = _extra(record, "answer_type", "text")
    if answer_type == "list":
        items = _parse_list(segment) or _parse_list(response)
        return "[" + ", ".join(items) + "]" if items is not None else ""
    if answer_type in ("integer", "float") or _value(record.answer) is not None:
        return last_number(segment) or last_number(response)
    return segment.splitlines()[0].strip() if segment else ""


def rule_correct(record: VQARecord, extracted: str) -> bool:
    """Whether an extracted answer matches the gold one under the benchmark's rules."""
    if not extracted:
        return False
    if record.choices:
        gold = record.answer if record.answer not in record.choices else _LETTERS[record.choices.index(record.answer)]
        return extracted.strip().upper() == gold.strip().upper()
    answer_type = _extra(record, "answer_type", "text")
    benchmark = _extra(record, "benchmark")
    got, gold = _value(extracted), _value(record.answer)
    if benchmark == "mathvista" and answer_type == "integer":
        return got is not None and gold is not None and int(got) == int(gold)
    if benchmark == "mathvista" and answer_type == "float":
        precision = _extra(record, "precision") or 0
        return got is not None and gold is not None and round(got, precision) == round(gold, precision)
    if answer_type == "list":
        ours, theirs = _parse_list(extracted), _parse_list(record.answer)
        if ours is None or theirs is None or len(ours) != len(theirs):
            return False
        precision = _extra(record, "precision")
        for a, b in zip(ours, theirs):
            va, vb = _value(a), _value(b)
            if va is not None and vb is not None:
                if (round(va, precision) != round(vb, precision)) if precision is not None else not _close(va, vb):
                    return False
            elif _normalise_math(a) != _normalise_math(b):
                return False
        return True
    if gold is not None:
        return got is not None and _close(got, gold)
    return same_expression(extracted, record.answer)


def same_expression(extracted: str, gold: str) -> bool:
    """Normalised equality of two answers written as text or LaTeX (``x = 2\\sqrt{3}`` vs ``2√3``)."""
    ours, theirs = _normalise_math(extracted), _normalise_math(gold)
    if "=" in ours and "=" not in theirs:  # "BC = 5 cm" answers "5 cm"
        ours = ours.rsplit("=", 1)[1]

    def bare(text: str) -> str:
        return text.replace("{", "").replace("}", "")

    return bool(ours) and bare(ours) == bare(theirs)


def rule_score(record: VQARecord, response: str) -> dict:
    extracted = extract_final(record, response)
    return {"extracted": extracted, "correct": rule_correct(record, extracted), "scored_by": "rules"}


def make_scorer(benchmark: str, judge=None) -> Callable[[VQARecord, str], dict]:
    """``scorer(record, response) -> {"extracted", "correct", "scored_by", ...}`` for ``prediction_rows``.

    No judge: the rules above (``vqa``: the ablation's rules in :mod:`vift.eval.answers`). With a
    :class:`~vift.eval.judge.Judge`: the judge extracts; MathVista scores by exact match, the others
    by the judge's agreement verdict.
    """
    _spec(benchmark)
    if judge is None:
        if benchmark == "vqa":
            from vift.eval.answers import score_answer

            return lambda record, response: {**score_answer(record, response), "scored_by": "rules"}
        return rule_score

    def judged(record: VQARecord, response: str) -> dict:
        raw = judge.extract(record.question, response)
        if benchmark == "mathvista":
            extracted = extract_final(record, raw, lenient_choice=True) if raw else ""
            return {"extracted": extracted, "correct": rule_correct(record, extracted), "scored_by": "judge-extract", "judge_extracted": raw}
        question = _extra(record, "judge_question") or record.question
        gold = record.answer
        if record.choices and gold in _LETTERS and _extra(record, "benchmark") == "mathvision":
            gold = f"{gold} ({record.choices[_LETTERS.index(gold)]})"
        verdict = judge.agrees(question, gold, raw) if raw else False
        row = {"extracted": raw, "correct": bool(verdict), "scored_by": "judge"}
        if verdict is None:
            row["judge_unparsed"] = True
        return row

    return judged


def no_answer_count(rows: Sequence[dict]) -> int:
    return sum(1 for row in rows if not str(row.get("extracted", "")).strip())
