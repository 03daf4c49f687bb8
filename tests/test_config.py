"""Parameters: presets validate, bad files fail with the field named and nothing written."""

from __future__ import annotations

import pytest
import yaml

from vift.cli import main
from vift.config import apply_overrides, available_presets, load_params, load_preset, write_params
from vift.errors import UserError


def test_every_preset_validates():
    assert {"ci", "tiny", "paper-7b"} <= set(available_presets())
    for name in available_presets():
        assert load_preset(name).preset == name


def test_paper_preset_follows_the_reference_recipe():
    paper = load_preset("paper-7b")
    caption, text = paper.train.caption, paper.train.text
    assert caption.trainable == ["projector"] and caption.learning_rate == 5e-4
    assert caption.per_device_train_batch_size * caption.gradient_accumulation_steps * caption.num_processes == 256
    assert text.learning_rate == 1e-5 and text.projector_learning_rate == 2e-6
    assert text.per_device_train_batch_size * text.gradient_accumulation_steps * text.num_processes == 128
    assert (caption.max_length, text.max_length) == (2048, 4096)
    assert caption.lr_scheduler_type == text.lr_scheduler_type == "cosine"
    assert caption.warmup_ratio == text.warmup_ratio == 0.03
    assert (paper.fusion.layer_start, paper.fusion.layer_end) == (14, 28)


def test_written_params_reload_identically(tmp_path):
    params = apply_overrides(load_preset("ci"), ["train.text.learning_rate=1e-4", "data.seed=7"])
    path = write_params(params, tmp_path / "params.yaml")
    again = load_params(path)
    assert again == params
    assert again.train.text.learning_rate == 1e-4 and again.data.seed == 7


def test_invalid_file_names_the_field_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"text": {"learning_rate": -1}}, "data": {"grid": 3, "max_objects": 12}}))
    assert main(["params", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.text.learning_rate" in err and "greater than 0" in err
    assert "max_objects (12) exceeds" in err


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("train:\n  text:\n    learning_rat: 0.1\n")
    with pytest.raises(UserError) as caught:
        load_params(bad)
    assert "train.text.learning_rat" in str(caught.value) and caught.value.exit_code == 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("data:\n  seed: 1\n  grid: [3\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: not valid YAML"):
        load_params(bad)


def test_invalid_override_writes_nothing(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    assert main(["params", "use", "ci", "--set", "fusion.layer_start=5", "--set", "fusion.layer_end=2", "--params", str(target)]) == 2
    assert "layer_end must be greater than layer_start" in capsys.readouterr().err
    assert not target.exists()
    assert main(["params", "use", "ci", "--set", "train.text.no_such_key=1", "--params", str(target)]) == 2
    assert not target.exists()
