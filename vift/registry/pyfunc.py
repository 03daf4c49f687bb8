"""The registered model: an MLflow pyfunc that answers questions about images, fusion applied.

Artifacts (copied into the MLflow model, so it is self-contained):

- ``model``: the HF checkpoint directory of the stage-2 model (safetensors; its processor is saved
  beside it by ``save_pretrained``);
- ``processor``: only when the processor lives in another directory;
- ``fusion``: ``fusion.json`` from the ``calibrate`` stage (``{"fusion": {...}, ...}``).

``predict`` takes a DataFrame with columns ``image`` and ``question``; an image is a file path, raw
bytes, a base64 string (optionally a ``data:image/...;base64,`` URI) or a PIL image. Params:
``fusion`` (bool, default true: the calibrated fusion; false: the plain model) and
``max_new_tokens`` (int). It returns one answer string per row, computed by
:func:`vift.fusion.method.fused_generate` — the same function the evaluation uses.

Loading uses safetensors only (:func:`vift.model.load_model`) with ``trust_remote_code`` off.
The vift package itself travels with the model (``code_paths``), so a process that only has the
pip requirements can load it; with vift installed (``--env-manager local``) nothing changes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
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


def _invalid(message: str):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _is_file(text: str) -> bool:
    if len(text) >= 4096:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a base64 string can be "a file name too long"
        return False


def decode_image(value: Any, row: int = 0):
    """A PIL RGB image from a path, bytes, base64 text (or data URI) or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data: bytes | None = None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    described = None
    if data is None and isinstance(value, str):
        text = value.strip()
        described = text[:60]
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        elif _is_file(text):
            data = Path(text).read_bytes()
            described = None
        if data is None:
            try:
                data = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                data = b""
    if data is None:
        raise _invalid(f"row {row}: image must be a path, bytes or a base64 string, not {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        if described is not None:
            raise _invalid(
                f"row {row}: image {described!r} is neither an existing file nor base64-encoded image data"
            ) from None
        raise _invalid(f"row {row}: image data is not a readable image ({error})") from None


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


def read_fusion(path: str | Path):
    """The FusionSpec in ``fusion.json`` (the calibrate stage's file, or a bare spec dict)."""
    from vift.fusion.method import FusionSpec

    content = json.loads(Path(path).read_text())
    spec = content.get("fusion", content) if isinstance(content, Mapping) else None
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: no 'fusion' object")
    return FusionSpec.from_dict(spec)


class ViftModel(mlflow.pyfunc.PythonModel):
    """Ability-fused answers from the ViFT model; see the module docstring for inputs and params."""

    def __init__(self, dtype: str = "auto", batch_size: int = 16, max_new_tokens: int = 8, device: str = "auto"):
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = device

    def __getstate__(self) -> dict:
        # Only the settings are pickled into the MLflow model; weights travel as artifacts.
        return {k: getattr(self, k) for k in ("dtype", "batch_size", "max_new_tokens", "device")}

    def load_context(self, context) -> None:
        import torch

        from vift.model.loading import load_model, load_processor

        model_dir = context.artifacts[ARTIFACT_MODEL]
        processor_dir = context.artifacts.get(ARTIFACT_PROCESSOR, model_dir)
        self.model = load_model(model_dir, self.dtype, trust_remote_code=False)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device).eval()
        self.processor = load_processor(processor_dir, trust_remote_code=False)
        self.fusion = read_fusion(context.artifacts[ARTIFACT_FUSION])
        self._lock = threading.Lock()  # fusion hooks live on the shared model: one generation at a time

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from vift.fusion.method import fused_generate

        params = dict(params or {})
        frame = _as_frame(model_input)
        images = [decode_image(value, row) for row, value in enumerate(frame["image"])]
        questions = [str(q) for q in frame["question"]]
        fusion = self.fusion if _truthy(params.get("fusion", True)) else None
        max_new_tokens = int(params.get("max_new_tokens") or self.max_new_tokens)
        if max_new_tokens < 1:
            raise _invalid("max_new_tokens must be at least 1")
        lock = getattr(self, "_lock", None) or threading.Lock()
        with lock:
            return fused_generate(
                self.model, self.processor, images, questions, fusion, batch_size=self.batch_size, max_new_tokens=max_new_tokens
            )


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
        params=ParamSchema([ParamSpec("fusion", "boolean", True), ParamSpec("max_new_tokens", "long", int(max_new_tokens))]),
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
            python_model=ViftModel(dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens),
            artifacts=artifacts,
            code_paths=[_vift_code(Path(tmp))],
            signature=signature(max_new_tokens),
            input_example=example,
            pip_requirements=pip_requirements(),
            tags=dict(tags or {}),
        )
