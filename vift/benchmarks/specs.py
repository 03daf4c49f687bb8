"""The real benchmarks: their names, the answer-format rules their prompts end with, and where their files are.

MathVista, MathVerse and MathVision testmini are read from local files in their public layouts,
the repositories' JSON or the dataset hub's parquet shards (:mod:`vift.benchmarks.formats`); ``vqa`` is this project's VQA manifest. A :class:`BenchmarkSpec`
names the annotation files tried under ``--data`` and the keys results may be broken down by;
:func:`find_annotation` resolves ``--data`` / ``--file`` to the annotation file and data folder.
The instructions are the answer-format rules of the reference prompts (MathVista's per answer type).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vift.data.manifests import resolve_image
from vift.errors import UserError

BENCHMARKS = ("mathvista", "mathverse", "mathvision", "vqa")

MULTI_CHOICE = "multi_choice"
FREE_FORM = "free_form"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters, in order

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
    parquet: tuple[str, ...]  # then the hub's parquet shards (glob patterns), in order
    breakdowns: tuple[str, ...]  # allowed breakdown keys; the first is the default
    title: str


SPECS = {
    "mathvista": BenchmarkSpec(
        "mathvista",
        ("testmini.json", "data/testmini.json", "annot_testmini.json", "data/annot_testmini.json"),
        ("data/testmini-*.parquet", "testmini-*.parquet", "testmini.parquet"),
        ("category", "question_type", "answer_type", "task", "context", "grade", "source", "language"),
        "MathVista testmini",
    ),
    "mathverse": BenchmarkSpec(
        "mathverse",
        ("testmini.json", "data/testmini.json"),
        ("testmini.parquet", "data/testmini.parquet", "testmini-*.parquet", "data/testmini-*.parquet"),
        ("problem_version", "question_type", "subject", "subfield", "source"),
        "MathVerse testmini",
    ),
    "mathvision": BenchmarkSpec(
        "mathvision",
        ("testmini.jsonl", "data/testmini.jsonl", "test.jsonl", "data/test.jsonl"),
        ("data/testmini-*.parquet", "testmini-*.parquet", "data/test-*.parquet", "test-*.parquet"),
        ("subject", "level", "question_type"),
        "MathVision",
    ),
    "vqa": BenchmarkSpec("vqa", ("test.jsonl",), (), ("type",), "VQA manifest"),
}


def spec_of(name: str) -> BenchmarkSpec:
    """The spec of benchmark ``name``; an unknown name is a usage error."""
    if name not in SPECS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}", exit_code=2)
    return SPECS[name]


def find_annotation(benchmark: str, data: str | Path, file: str | None = None) -> tuple[Path, Path]:
    """``(annotation file, data directory)`` for ``--data`` (a folder, or the annotation file itself)."""
    spec = spec_of(benchmark)
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
    for pattern in spec.parquet:  # the hub layout: the first shard stands for its split
        found = sorted(p for p in data.glob(pattern) if p.is_file())
        if found:
            return found[0], data
    raise UserError(
        f"{data}: no {spec.title} annotation file found (tried {', '.join(spec.files + spec.parquet)}); "
        f"pass --file NAME or point --data at the file"
    )
