"""The registered model: an MLflow pyfunc that answers questions about images, fusion applied.

Artifacts (copied into the MLflow model, so it is self-contained):

- ``model``: the HF checkpoint directory of the stage-2 model (safetensors; its processor is saved
  beside it by ``save_pretrained``);
- ``processor``: only when the processor lives in another directory;
- ``fusion``: ``fusion.json`` from the ``calibrate`` stage (``{"fusion": {...}, ...}``).

``predict`` takes a DataFrame with columns ``image`` and ``question``; an image is raw bytes, a
base64 string (optionally a ``data:image/...;base64,`` URI) or a PIL image; a file path only under
the server's ``VIFT_SERVE_IMAGE_ROOT`` (requests are data, not paths on the serving host). Limits
per request: rows, image bytes and pixels, question tokens, ``max_new_tokens`` (constants below). Params:
``fusion`` (bool, default true: the calibrated fusion; false: the plain model) and
``max_new_tokens`` (int). It returns one answer string per row, computed by
:func:`vift.fusion.method.fused_generate` — the same function the evaluation uses.

Loading uses safetensors only (:func:`vift.model.load_model`) with ``trust_remote_code`` off. The
model is logged as MLflow "models from code" (``served_model.py``): loading it unpickles nothing,
so ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` works.
The vift package itself travels with the model (``code_paths``), so a process that only has the
pip requirements can load it; with vift installed (``--env-manager local``) nothing changes.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

ARTIFACT_MODEL = "model"
ARTIFACT_PROCESSOR = "processor"
ARTIFACT_FUSION = "fusion"
INPUT_COLUMNS = ("image", "question")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


IMAGE_ROOT_ENV = "VIFT_SERVE_IMAGE_ROOT"
# Limits on one request. A request is data from a client: it must not be able to hold the
# (single-worker) server for minutes or exhaust its memory.
MAX_ROWS = 64
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_QUESTION_TOKENS = 512
MAX_NEW_TOKENS_LIMIT = 256


def _invalid(message: str):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _allowed_file(text: str, root: Path) -> Path | None:
    """``text`` as a regular file whose resolved path lies under ``root``; None otherwise."""
    if len(text) >= 4096 or "\0" in text:
        return None
    try:
        candidate = (root / text).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    except (OSError, ValueError, RuntimeError):
        pass
    return None


def _image_root() -> Path | None:
    root = os.environ.get(IMAGE_ROOT_ENV)
    return Path(root).resolve() if root else None


def decode_image(value: Any, row: int = 0, image_root: Path | None = None):
    """A PIL RGB image from bytes, base64 text (or a data URI) or a PIL image.

    A string is read as a file path only when ``image_root`` is given (the server's
    ``VIFT_SERVE_IMAGE_ROOT``), and only if it resolves to a file under that root: a request is
    data, never a path on the serving host. Absent and not-allowed paths get one and the same
    error, so the server is no oracle for which files exist.
    """
    from PIL import Image, UnidentifiedImageError

    from vift.data.manifests import image_problem

    if isinstance(value, Image.Image):
        if problem := image_problem(value):
            raise _invalid(f"row {row}: {problem}")
        return value.convert("RGB")
    data: bytes | None = None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    described = None
    if data is None and isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise _invalid(f"row {row}: image is over the {MAX_IMAGE_BYTES // (1024 * 1024)} MiB limit")
        described = text[:60]
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            data = None
        if image_root is not None and not _looks_like_image(data):
            path = _allowed_file(text, image_root)
            if path is None:
                raise _invalid(f"row {row}: image {described!r} is not base64 image data nor an image under the allowed root")
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise _invalid(f"row {row}: image is over the {MAX_IMAGE_BYTES // (1024 * 1024)} MiB limit")
            data = path.read_bytes()
    if data is None:
        if isinstance(value, str):
            raise _invalid(
                f"row {row}: image {described!r} is not base64-encoded image data (send the image's bytes as base64 "
                f"or a data: URI; file paths are read only by a server started with {IMAGE_ROOT_ENV})"
            )
        raise _invalid(f"row {row}: image must be bytes or a base64 string, not {type(value).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise _invalid(f"row {row}: image is over the {MAX_IMAGE_BYTES // (1024 * 1024)} MiB limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if problem := image_problem(image):
                raise _invalid(f"row {row}: {problem}")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _invalid(f"row {row}: image data is not a readable image ({type(error).__name__})") from None


def _looks_like_image(data: bytes | None) -> bool:
    from PIL import Image, UnidentifiedImageError

    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def _question(value: Any, row: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise _invalid(f"row {row}: question is missing")
    if not isinstance(value, str):
        raise _invalid(f"row {row}: question must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _invalid(f"row {row}: question is empty")
    return value


def _as_frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, Mapping):
        frame = pd.DataFrame({k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in model_input.items()})
    elif isinstance(model_input, Sequence) and not isinstance(model_input, (str, bytes)):
        frame = pd.DataFrame(list(model_input))
    else:
        raise _invalid(f"input must be a DataFrame with columns {list(INPUT_COLUMNS)}, not {type(model_input).__name__}")
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise _invalid(f"input is missing column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    return frame


SETTINGS = ("dtype", "batch_size", "max_new_tokens", "device")  # the model_config keys ViftModel reads


class ViftModel(mlflow.pyfunc.PythonModel):
    """Ability-fused answers from the ViFT model; see the module docstring for inputs and params."""

    def __init__(self, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 8, device: str = "auto"):
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device

    def load_context(self, context) -> None:
        import torch

        from vift.model.loading import load_model, load_processor

        for key, value in (getattr(context, "model_config", None) or {}).items():
            if key in SETTINGS:
                setattr(self, key, value)
        model_dir = context.artifacts[ARTIFACT_MODEL]
        processor_dir = context.artifacts.get(ARTIFACT_PROCESSOR, model_dir)
        self.model = load_model(model_dir, self.dtype, trust_remote_code=False)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device).eval()
        self.processor = load_processor(processor_dir, trust_remote_code=False)
        from vift.fusion.modes import FusionFile

        fusion_file = FusionFile.read(context.artifacts[ARTIFACT_FUSION])
        self.fusion, self.mode, self.prompts = fusion_file.spec, fusion_file.mode, fusion_file.prompts
        self._lock = threading.Lock()  # fusion hooks live on the shared model: one generation at a time

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

        try:
            return self._predict(model_input, dict(params or {}))
        except MlflowException:
            raise
        except Exception as error:  # noqa: BLE001 - a client gets a message, never a stack trace
            raise MlflowException(f"prediction failed ({type(error).__name__}); see the server's log", INTERNAL_ERROR) from error

    def _predict(self, model_input, params: dict) -> list[str]:
        from vift.fusion.modes import DEFAULT_MODE, MODES, Prompts, answer

        frame = _as_frame(model_input)
        if len(frame) > MAX_ROWS:
            raise _invalid(f"{len(frame)} rows in one request; at most {MAX_ROWS} (split the request)")
        questions = [_question(q, row) for row, q in enumerate(frame["question"])]
        self._check_question_lengths(questions)
        root = _image_root()
        images = [decode_image(value, row, root) for row, value in enumerate(frame["image"])]
        served = getattr(self, "mode", DEFAULT_MODE)
        mode = params.get("mode") or served
        if mode not in MODES:
            raise _invalid(f"mode must be one of {', '.join(MODES)} (or empty: the calibrated {served}), not {str(mode)[:40]!r}")
        if not _truthy(params.get("fusion", True)):
            mode = "plain"  # fusion: false, the switch older clients use
        max_new_tokens = _max_new_tokens(params.get("max_new_tokens"), self.max_new_tokens)
        lock = getattr(self, "_lock", None) or threading.Lock()
        with lock:
            answers = answer(
                self.model, self.processor, images, questions, mode, self.fusion, self.batch_size, max_new_tokens,
                getattr(self, "prompts", None) or Prompts(),
            )  # fmt: skip
        return [final_answer(text) for text in answers]

    def _check_question_lengths(self, questions: list[str]) -> None:
        for row, question in enumerate(questions):
            # Tokens are at least one character each in practice; refuse absurd text before tokenizing it.
            if len(question) > MAX_QUESTION_TOKENS * 16:
                raise _invalid(f"row {row}: question has {len(question):,} characters; at most {MAX_QUESTION_TOKENS} tokens")
            tokens = len(self.processor.tokenizer(question, add_special_tokens=False)["input_ids"])
            if tokens > MAX_QUESTION_TOKENS:
                raise _invalid(f"row {row}: question has {tokens} tokens; at most {MAX_QUESTION_TOKENS}")


def final_answer(text: str) -> str:
    """The answer a client gets: the first non-empty line, stripped (a model may run on after it)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _max_new_tokens(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise _invalid(f"max_new_tokens must be an integer, not {value!r}")
    if not 1 <= int(value) <= MAX_NEW_TOKENS_LIMIT:
        raise _invalid(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, not {int(value)}")
    return int(value)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def signature(max_new_tokens: int = 8):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # ``image`` is a string column: paths and base64 travel as JSON strings over REST; Python
    # callers may also pass bytes (an object column passes the string check unchanged).
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("fusion", "boolean", True),
                ParamSpec("max_new_tokens", "long", int(max_new_tokens)),
                ParamSpec("mode", "string", ""),  # empty: the mode calibration chose
            ]
        ),
    )


def image_to_base64(image_or_path) -> str:
    from PIL import Image

    if isinstance(image_or_path, Image.Image):
        buffer = io.BytesIO()
        image_or_path.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = Path(image_or_path).read_bytes()
    return base64.b64encode(data).decode("ascii")


def input_example(image=None, question: str = "How many shapes are there?", size: int = 32):
    """One row: a base64 PNG (``image``: PIL image or path; default a blank picture) and a question."""
    from PIL import Image

    if image is None:
        image = Image.new("RGB", (size, size), "white")
    return pd.DataFrame({"image": [image_to_base64(image)], "question": [question]})


def pip_requirements() -> list[str]:
    """What the model needs at load time, pinned to the versions that logged it."""
    from importlib.metadata import PackageNotFoundError, version

    wanted = ["mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas", "numpy"]
    out = []
    for name in wanted:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _has_processor(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _PROCESSOR_FILES)


def _vift_code(tmp: Path) -> str:
    """A copy of the vift package (no caches) to ship as the model's code."""
    import vift

    source = Path(vift.__file__).resolve().parent
    target = tmp / "vift"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def log_pyfunc(
    model_dir: str | Path,
    fusion_file: str | Path,
    *,
    name: str = "model",
    processor_dir: str | Path | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    max_new_tokens: int = 8,
    example_image=None,
    example_question: str = "How many shapes are there?",
    tags: Mapping[str, str] | None = None,
):
    """Log the ViFT pyfunc into the active run; returns MLflow's ``ModelInfo``."""
    model_dir = Path(model_dir)
    artifacts = {ARTIFACT_MODEL: str(model_dir), ARTIFACT_FUSION: str(fusion_file)}
    if processor_dir is not None and Path(processor_dir).resolve() != model_dir.resolve():
        artifacts[ARTIFACT_PROCESSOR] = str(processor_dir)
    elif not _has_processor(model_dir):
        from vift.errors import UserError

        raise UserError(f"{model_dir}: no processor files ({', '.join(_PROCESSOR_FILES)}); save the processor beside the model")
    example = input_example(example_image, example_question)
    with tempfile.TemporaryDirectory(prefix="vift-code-") as tmp:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("served_model.py")),  # models from code: no pickle
            model_config={"dtype": dtype, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "device": "auto"},
            artifacts=artifacts,
            code_paths=[_vift_code(Path(tmp))],
            signature=signature(max_new_tokens),
            input_example=example,
            pip_requirements=pip_requirements(),
            tags=dict(tags or {}),
        )
