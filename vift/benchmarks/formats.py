"""Loading the real benchmarks from local files in their public layouts: MathVista, MathVerse, MathVision testmini.

Each loader turns one benchmark's annotation file into :class:`~vift.data.manifests.VQARecord` s:
``id``; ``image`` relative to the data directory (it may not escape it); ``question`` = the prompt
the model is asked (the benchmark's question and choices, then its answer-format rule as the last
line, or a prompt field of the file itself with ``prompt_field``); ``answer`` = the gold answer;
``choices`` for multiple choice; ``type`` = the breakdown key (MathVista ``category``: the paper's
MVQA / GVQA columns; MathVerse ``problem_version``; MathVision ``subject``). Scoring facts travel as
extra fields: ``benchmark``, ``question_type`` (multi_choice / free_form), ``answer_type``,
``precision``, ``judge_question`` (what the LLM judge is shown); :mod:`vift.benchmarks.scoring` reads them.

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
- The dataset hub's parquet copies of all three (:mod:`vift.benchmarks.hub`): MathVista
  ``data/testmini-00000-of-00001-*.parquet``, MathVerse ``testmini.parquet`` (and
  ``testmini_text_only.parquet`` with ``--file``), MathVision ``data/testmini-*.parquet`` /
  ``data/test-*.parquet``; the same fields as the JSON, one record per row, every shard of a split
  read in order. Embedded images (``decoded_image`` / ``image`` as ``{bytes, path}``) are written
  into the ``image_dir`` the caller gives (by content hash, decoded first), and records point there;
  a row with only a relative ``image`` path is looked up as for the JSON layouts and copied in.
- ``vqa``: this project's VQA manifests (``test.jsonl`` of the data stage), scored as the ablation is.

Images are looked up relative to the annotation file's folder, then its ``images/`` subfolder, then
the data directory and its ``images/`` subfolder. Any problem (unreadable JSON, a missing field, an
answer that is not among the choices, a missing or corrupt image, a path escaping the data
directory, a duplicate id) raises :class:`~vift.errors.UserError` naming the file, the record and
the problem: benchmark numbers over silently skipped items would not be comparable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vift.benchmarks.hub import ImageStore, rows, shards
from vift.benchmarks.specs import (
    FREE_FORM,
    FREE_FORM_INSTRUCTION,
    IMAGE_QUESTION,
    INTEGER_INSTRUCTION,
    LETTERS,
    LIST_INSTRUCTION,
    MC_INSTRUCTION,
    MULTI_CHOICE,
    find_annotation,
    float_instruction,
    spec_of,
)
from vift.data.manifests import VQARecord, check_image
from vift.errors import UserError


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


class _HubSource(_Source):
    """Rows of hub parquet shards: every image ends up in ``store`` (embedded bytes written there,
    a relative path looked up in the data folder and copied there), so one folder serves them all."""

    def __init__(self, path: Path, data_dir: Path, store: ImageStore, check_images: bool):
        super().__init__(path, data_dir, check_images)
        self.store = store

    def image(self, raw: Any, where: str, optional: bool = False) -> str | None:
        if not isinstance(raw, bytes):
            found = super().image(raw, where, optional)
            if found is None:
                return None
            raw = (self.data_dir / found).read_bytes()
        name, problem = self.store.put(raw)
        if problem:
            raise self.fail(where, problem)
        return name


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno})", exit_code=2) from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason})", exit_code=2) from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    line_no = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{line_no}: malformed JSON: {error.msg} (column {error.colno})", exit_code=2) from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}:{line_no + 1}: not UTF-8 text ({error.reason})", exit_code=2) from None


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
    if len(answer) == 1 and answer.upper() in LETTERS[:n]:
        return LETTERS.index(answer.upper())
    return None


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
        if found and found.group(1) == LETTERS[len(options)]:
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
        choices = parsed or list(LETTERS[: max(4, index + 1)])
        answer = LETTERS[index]
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
        choices, answer = options, LETTERS[index]
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
    image_dir: Path | None = None,
) -> tuple[list[VQARecord], Path, Path]:
    """``(records, annotation file, image folder)``: the first ``limit`` records, in file order.

    The image folder is the data directory, or for the hub's parquet files ``image_dir``, where
    their embedded images are written (required then; the caller owns and removes it).
    """
    spec = spec_of(benchmark)
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
    records: list[VQARecord] = []
    builders = {"mathvista": lambda src, raw, where: _mathvista(src, None, raw, where, breakdown, prompt_field),
                "mathverse": lambda src, raw, where: _mathverse(src, raw, where, breakdown, prompt_field),
                "mathvision": lambda src, raw, where: _mathvision(src, raw, where, breakdown, prompt_field)}  # fmt: skip
    if path.suffix == ".parquet":
        if image_dir is None:
            raise TypeError("load_benchmark: parquet files need an image_dir to write their embedded images to")
        hub = _HubSource(path, data_dir, ImageStore(Path(image_dir)), check_images)
        for where, raw in rows(shards(path), limit):
            records.append(builders[benchmark](hub, raw, where))
        if not records:
            raise UserError(f"{path}: no records", exit_code=2)
        return records, path, hub.store.folder
    source = _Source(path, data_dir, check_images)

    def full() -> bool:
        return limit is not None and len(records) >= limit

    def record_object(raw: Any, where: str) -> dict:
        if not isinstance(raw, dict):
            raise source.fail(where, f"expected a JSON object, got {type(raw).__name__}")
        return raw

    if benchmark == "mathvision":
        for line, raw in _read_jsonl(path):
            records.append(builders[benchmark](source, record_object(raw, f"line {line}"), f"line {line}"))
            if full():
                break
    elif benchmark == "mathvista":
        content = _read_json(path)
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
        content = _read_json(path)
        if not isinstance(content, list):
            raise UserError(f"{path}: expected a JSON list of MathVerse records", exit_code=2)
        for index, raw in enumerate(content):
            where = f"record {index}"
            records.append(builders[benchmark](source, record_object(raw, where), where))
            if full():
                break
    if not records:
        raise UserError(f"{path}: no records", exit_code=2)
    return records, path, data_dir
