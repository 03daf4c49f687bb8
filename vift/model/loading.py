"""Load any HF LVLM checkpoint directory (the tiny default or a real one) the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vift.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_checkpoint(path: str | Path) -> Path:
    """A local HF checkpoint with safetensors weights, or a UserError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model.base: {path} is not a directory; point it at a local HF checkpoint (no hub access)")
    if not (path / "config.json").is_file():
        raise UserError(f"model.base: {path} has no config.json; is it a transformers checkpoint?")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle weights {', '.join(pickled)}: convert them to safetensors first)" if pickled else ""
        raise UserError(f"model.base: {path} has no *.safetensors weights{hint}")
    return path


def load_model(path: str | Path, dtype: str = "auto", trust_remote_code: bool = False) -> PreTrainedModel:
    path = check_checkpoint(path)
    return AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=DTYPES.get(dtype, "auto"),
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )


def load_processor(path: str | Path, trust_remote_code: bool = False) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The language model's decoder layers (never the vision tower's, whichever is deeper)."""
    return model.get_decoder().layers


def snapshot_checkpoint(source: str | Path, destination: Path, trust_remote_code: bool = False) -> None:
    """Copy a validated local checkpoint into ``destination`` (which the caller makes atomic)."""
    source = check_checkpoint(source)
    try:
        load_processor(source, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
        raise UserError(f"model.base: {source}: the processor does not load ({error})") from None
    shutil.copytree(source, destination, dirs_exist_ok=True)
