"""Shared fixtures: the `ci` preset, its data generated once per session, a tiny model built from it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models are overhead-bound: one thread per process avoids oversubscribing 2 cores when a test
# runs servers or pipeline subprocesses beside itself (measured: a ci base stage took 7 s with one
# thread and 43 s with two on a loaded machine). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ci_params():
    from vift.config import load_preset

    return load_preset("ci")


@pytest.fixture(scope="session")
def ci_data(ci_params, tmp_path_factory) -> Path:
    """The ci preset's ShapeTally splits, generated once."""
    from vift.data.generate import generate_shapetally

    out = tmp_path_factory.mktemp("data") / "benchmark"
    generate_shapetally(ci_params.data, out)
    return out


@pytest.fixture(scope="session")
def tiny_lvlm(ci_params, ci_data):
    """(model, processor) of the ci architecture, tokenizer trained on the ci corpus."""
    from vift.data.generate import training_corpus
    from vift.model.tiny import build_tiny_lvlm

    model, processor = build_tiny_lvlm(ci_params.model.tiny, ci_params.data.image_size, training_corpus(ci_data))
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_lvlm, tmp_path_factory) -> Path:
    """The tiny LVLM saved as a checkpoint directory (what `vift eval --model` reads)."""
    model, processor = tiny_lvlm
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Dummy AWS credentials and an isolated DVC/AWS setup, in os.environ (so subprocesses inherit it)."""
    from storage_support import CLEARED_ENV, isolated_env

    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    bin_dir = Path(sys.executable).parent
    for name, value in isolated_env(tmp_path / "env", bin_dir).items():
        monkeypatch.setenv(name, value)
    return os.environ


@pytest.fixture
def ci_workspace(tmp_path, monkeypatch) -> Path:
    """An empty workspace (the current directory) with the ci preset active and tracking off."""
    from vift.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIFT_TRACKING", "off")
    assert main(["params", "use", "ci"]) == 0
    return tmp_path


def widened(model, seed: int, dtype=None):
    """A fresh copy of ``model``'s architecture with weights drawn from N(0, 0.3) under ``seed``:
    the untrained tiny LLaVA answers almost alike everywhere; a wider init makes fused and plain
    answers, layers and samples differ clearly. ``dtype``: e.g. torch.float64 (no greedy ties)."""
    import torch

    fresh = type(model)(model.config)
    if dtype is not None:
        fresh = fresh.to(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.normal_(0, 0.3)
    return fresh.eval()
