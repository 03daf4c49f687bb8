"""Shared pieces of the training tests: a base checkpoint of the ci architecture and workspaces.

A workspace is what a pipeline stage sees as its current directory: ``data/benchmark`` (the ci
data), ``models/base`` (the ci tiny LVLM), ``params/params.yaml`` (the ci preset plus overrides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """ci-sized models train fastest on one thread (and the test machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ci_base_model(tiny_checkpoint) -> Path:
    """The ci tiny LVLM saved as an HF checkpoint directory (conftest's, saved once per session)."""
    return tiny_checkpoint


def new_workspace(root: Path, ci_params, ci_data: Path, base_model: Path, overrides: dict | None = None):
    """A workspace at ``root`` -> (root, params): ci data and base model linked in, params written."""
    from vift.config import apply_overrides, write_params

    (root / "data").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "data" / "benchmark").symlink_to(ci_data)
    (root / "models" / "base").symlink_to(base_model)
    params = apply_overrides(ci_params, overrides or {})
    write_params(params, root / "params" / "params.yaml")
    return root, params


@pytest.fixture
def make_workspace(ci_params, ci_data, ci_base_model, tmp_path):
    """``make_workspace(name, overrides)`` -> (workspace path, params)."""
    return lambda name, overrides=None: new_workspace(tmp_path / name, ci_params, ci_data, ci_base_model, overrides)


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (safetensors only)."""
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def stage_report(workspace: Path, stage: str) -> dict:
    return json.loads((workspace / "reports" / f"{stage}.json").read_text())


def vift_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vift.cli", *args]


def subprocess_env() -> dict[str, str]:
    """The environment for a stage run as a real process: the repository importable, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = "1"  # as in-process runs (one_torch_thread): same arithmetic, comparable weights
    return env


def run_vift(workspace: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(vift_command(*args), cwd=workspace, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
