"""Manifest formats and streaming, validating loaders.

Training manifests use the LLaVA conversation format of the reference data::

    {"id": "...", "image": "rel/path.png"?, "conversations": [
        {"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

Evaluation manifests are VQA records::

    {"id": "...", "image": "rel/path.png", "question": "...", "answer": "...", "choices"?: [...], "type"?: "..."}

Both may be JSONL (one record a line) or one JSON array. Loaders stream: memory stays flat in the
number of records. Bad records are reported as ``file:line: problem``; ``policy`` decides whether
they are skipped and counted or fail the load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vift.errors import UserError

IMAGE_TOKEN = "<image>"
Policy = Literal["skip", "fail"]
# Pixels one image may have. Real VQA images are a few megapixels; a larger header is a
# decompression bomb until proven otherwise (PIL's own limit, ~89 MP, only warns below 179 MP).
MAX_IMAGE_PIXELS = 40_000_000


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class ConversationRecord(BaseModel):
    """One training sample in LLaVA conversation format."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    image: str | None = None
    type: str | None = None
    conversations: list[Turn] = Field(min_length=2)

    @model_validator(mode="after")
    def _well_formed(self) -> ConversationRecord:
        for index, turn in enumerate(self.conversations):
            expected = "human" if index % 2 == 0 else "gpt"
            if turn.speaker != expected:
                raise ValueError(f"conversations[{index}].from must be {expected!r} (turns alternate, human first)")
        tokens = sum(turn.value.count(IMAGE_TOKEN) for turn in self.conversations)
        if self.image is not None and (tokens != 1 or IMAGE_TOKEN not in self.conversations[0].value):
            raise ValueError(f"a record with an image needs exactly one {IMAGE_TOKEN} token, in the first human turn")
        if self.image is None and tokens:
            raise ValueError(f"{IMAGE_TOKEN} token in a record without an image")
        return self

    @property
    def has_image(self) -> bool:
        return self.image is not None


class VQARecord(BaseModel):
    """One evaluation item."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    image: str | None = None
    question: str = Field(min_length=1)
    answer: str
    choices: list[str] | None = None
    type: str | None = None

    @field_validator("answer", "id", mode="before")
    @classmethod
    def _scalars_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


REFERENCE_FIELDS = ("reference", "scene")  # "scene": ShapeTally's name, accepted for compatibility


def reference_of(record: VQARecord) -> str | None:
    """The record's reference description of its image (optional field), or None."""
    extra = record.model_extra or {}
    for name in REFERENCE_FIELDS:
        value = extra.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


Record = TypeVar("Record", ConversationRecord, VQARecord)
RECORD_TYPES: dict[str, type[BaseModel]] = {"conversation": ConversationRecord, "vqa": VQARecord}


@dataclass
class LoadReport:
    """What a load skipped and why."""

    path: Path
    loaded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.problems)


def _decode_problem(error: Exception) -> str:
    """A JSON value the standard library refuses, in words."""
    if isinstance(error, json.JSONDecodeError):
        return f"malformed JSON: {error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    return f"unreadable JSON value: {error}"  # ValueError: e.g. an integer over 4,300 digits


def _iter_jsonl(handle, path: Path) -> Iterator[tuple[int, Any, str | None]]:
    for line_no, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line), None
        except (ValueError, RecursionError) as error:
            yield line_no, None, _decode_problem(error)


def _iter_json_array(handle, path: Path, chunk_size: int = 1 << 16) -> Iterator[tuple[int, Any, str | None]]:
    """Stream the elements of a top-level JSON array with their starting line numbers.

    Written by hand because the standard library only parses whole documents and the streaming
    parsers on PyPI do not report line numbers, which our error messages need.
    """
    decoder = json.JSONDecoder()
    buffer, line, eof = "", 1, False

    def fill() -> bool:
        nonlocal buffer, eof
        chunk = handle.read(chunk_size)
        eof = not chunk
        buffer += chunk
        return bool(chunk)

    def skip(chars: str) -> None:
        nonlocal buffer, line
        while True:
            stripped = buffer.lstrip(chars)
            line += buffer[: len(buffer) - len(stripped)].count("\n")
            buffer = stripped
            if buffer or not fill():
                return

    fill()
    skip(" \t\r\n")
    if not buffer.startswith("["):
        yield line, None, "expected a JSON array or JSON lines"
        return
    buffer = buffer[1:]
    while True:
        skip(" \t\r\n,")
        if not buffer or buffer.startswith("]"):
            return
        while True:
            try:
                value, end = decoder.raw_decode(buffer)
                break
            except json.JSONDecodeError as error:
                if not fill():
                    yield line, None, f"malformed JSON: {error.msg}; the records after it were not read"
                    return
            except (ValueError, RecursionError) as error:
                yield line, None, f"{_decode_problem(error)}; the records after it were not read"
                return
        yield line, value, None
        line += buffer[:end].count("\n")
        buffer = buffer[end:]


def iter_raw_records(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line, value, problem)`` for every record of a JSONL or JSON-array file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found (or not a regular file)", exit_code=2)
    with open(path, encoding="utf-8") as handle:
        try:
            first = ""
            while not first:
                char = handle.read(1)
                if not char:
                    return
                first = char.strip()
            handle.seek(0)
            reader = _iter_json_array if first == "[" else _iter_jsonl
            yield from reader(handle, path)
        except UnicodeDecodeError as error:
            raise UserError(
                f"{path}: not UTF-8 text (a byte at or after offset {error.start} of a read chunk): save manifests as UTF-8",
                exit_code=2,
            ) from None


def resolve_image(image_root: Path, relative: str) -> Path:
    """The image's path under ``image_root``; raises ValueError if it escapes the root.

    The check is lexical (``..`` and absolute paths), so a root that links its image folders in
    from elsewhere (a common dataset layout) still works.
    """
    root = Path(os.path.normpath(Path(image_root).absolute()))
    candidate = Path(os.path.normpath(root / relative))
    if not candidate.is_relative_to(root):
        raise ValueError(f"image path {relative!r} escapes the image root {root}")
    return candidate


def _is_regular_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def image_problem(image: Image.Image) -> str | None:
    """None if an opened (not yet decoded) image is small enough to decode, else why not."""
    width, height = image.size
    if width < 1 or height < 1:
        return f"image has no pixels ({width}x{height})"
    if width * height > MAX_IMAGE_PIXELS:
        return f"image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb?)"
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path``, decoded, as RGB: the one way training, evaluation and the tools read images."""
    with Image.open(path) as image:
        return image.convert("RGB")


def check_image(path: Path) -> str | None:
    """None if ``path`` is a readable image, else the problem in words.

    The pixels are decoded, not only the header: a valid header over corrupt or truncated data
    must fail here, at validation, not later inside a training stage.
    """
    try:
        if not _is_regular_file(path):
            return f"image not found (or not a regular file): {path}"
        with Image.open(path) as image:
            if problem := image_problem(image):
                return f"{path}: {problem}"
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"image unreadable or corrupt: {path} ({error})"
    return None


def _describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)


class Manifest:
    """A manifest file read lazily; iterate it (again and again) for validated records.

    ``problems`` collects ``file:line: problem`` strings of the last full iteration.
    """

    def __init__(
        self,
        path: str | Path,
        kind: Literal["conversation", "vqa"],
        image_root: str | Path | None = None,
        policy: Policy = "skip",
        check_images: bool = True,
        image_required: bool | None = None,
    ):
        if kind not in RECORD_TYPES:
            raise ValueError(f"unknown manifest kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.policy = policy
        self.check_images = check_images
        self.image_required = image_required  # True: every record has an image; False: none may; None: either
        self.report = LoadReport(self.path)

    def _problem(self, line: int, message: str) -> None:
        text = f"{self.path}:{line}: {message}"
        if self.policy == "fail":
            raise UserError(f"{text}\n(set data.bad_records: skip to skip bad records and count them)", exit_code=2)
        self.report.problems.append(text)

    def __iter__(self) -> Iterator[ConversationRecord | VQARecord]:
        self.report = LoadReport(self.path)
        model = RECORD_TYPES[self.kind]
        for line, raw, problem in iter_raw_records(self.path):
            if problem:
                self._problem(line, problem)
                continue
            if not isinstance(raw, dict):
                self._problem(line, f"expected a JSON object, got {type(raw).__name__}")
                continue
            try:
                record = model.model_validate(raw)
            except ValidationError as error:
                self._problem(line, f"invalid record: {_describe_validation_error(error)}")
                continue
            if self.image_required is not None and (record.image is not None) != self.image_required:
                role = "needs an image" if self.image_required else "must not have an image"
                self._problem(line, f"record {record.id!r}: every record of this split {role}")
                continue
            if record.image is not None:
                try:
                    image_path = resolve_image(self.image_root, record.image)
                except ValueError as error:
                    self._problem(line, str(error))
                    continue
                if self.check_images and (issue := check_image(image_path)):
                    self._problem(line, issue)
                    continue
            self.report.loaded += 1
            yield record

    def image_path(self, record: ConversationRecord | VQARecord) -> Path:
        if record.image is None:
            raise ValueError(f"record {record.id} has no image")
        return resolve_image(self.image_root, record.image)


def referenced_files(directory: Path, manifests: list[str]) -> tuple[list[str], list[str]]:
    """What a folder of manifests really consists of: ``(files, problems)``.

    ``files`` are the relative paths of ``manifests`` and of every image their records name that
    exists as a regular file. ``problems`` name each of them whose *resolved* path (symlinks
    followed) leaves ``directory``: a link out of the folder is refused, however the lexical
    path looks, because copying it would carry a file of this host into the data and its remote.
    """
    root = Path(directory).resolve()
    files: list[str] = []
    problems: list[str] = []

    seen: set[str] = set()

    def admit(relative: str, where: str) -> bool:
        path = root / relative
        try:
            real = path.resolve()
        except (OSError, RuntimeError, ValueError) as error:  # RuntimeError: a symlink loop; ValueError: a NUL byte
            problems.append(f"{where}: {relative}: cannot be resolved ({error})")
            return False
        if not real.is_relative_to(root):
            problems.append(f"{where}: {relative} links outside {directory}: copy the file into the folder")
            return False
        if _is_regular_file(path) and relative not in seen:
            seen.add(relative)
            files.append(relative)
        return True

    for name in manifests:
        if not admit(name, str(directory)):
            continue
        for line, raw, _ in iter_raw_records(root / name):
            image = raw.get("image") if isinstance(raw, dict) else None
            if not isinstance(image, str):
                continue
            try:
                relative = resolve_image(root, image).relative_to(root).as_posix()
            except (ValueError, OSError):
                continue  # validation reports paths that escape lexically
            admit(relative, f"{Path(directory) / name}:{line}")
    return files, problems


def caption_instruction(captions_manifest: str | Path) -> str:
    """The instruction the first caption record asks with, without the image token."""
    for record in Manifest(captions_manifest, "conversation", check_images=False):
        return record.conversations[0].value.replace(IMAGE_TOKEN, "", 1).strip()
    raise UserError(f"{captions_manifest}: no caption records", exit_code=2)
