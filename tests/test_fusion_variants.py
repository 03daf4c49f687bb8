"""The fusion variants #18 investigates: norm-preserving injection and steering the prefix.

``_edit`` is checked on plain tensors (the formula, position by position), the search and the
configuration files on stand-ins; the family tests run both variants on every supported family.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vift.config.schema import CalibrationParams, FusionParams
from vift.fusion.calibrate import search
from vift.fusion.method import NEUTRAL, FusionSpec, _edit, fused_positions

BATCH, SEQ, HIDDEN = 2, 7, 5


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    hidden, text, image = (torch.randn(BATCH, SEQ, HIDDEN, generator=generator, dtype=torch.float64) for _ in range(3))
    fused = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    fused[0, -3:] = True  # sample 0: 3 fused positions
    fused[1, -2:] = True  # sample 1: 2
    real = torch.ones(BATCH, SEQ, dtype=torch.bool)
    real[1, :2] = False  # sample 1 is left-padded by 2
    return hidden, text, image, fused, real


def test_norm_preserving_injection_keeps_each_edited_positions_norm_and_the_edits_direction(tensors):
    hidden, text, image, fused, _ = tensors
    for spec in (FusionSpec(a=0.8, b=0.3, preserve_norm=True), FusionSpec(mode="replace", w_vis=0.4, w_text=0.9, preserve_norm=True)):
        plain = _edit(FusionSpec(**{**spec.to_dict(), "preserve_norm": False}), text, image, fused)(hidden)
        kept = _edit(spec, text, image, fused)(hidden)
        norms = kept.norm(dim=-1)
        assert torch.allclose(norms[fused], hidden.norm(dim=-1)[fused], rtol=0, atol=1e-12)
        assert not torch.allclose(plain.norm(dim=-1)[fused], hidden.norm(dim=-1)[fused])  # the edit alone changes them
        cosine = torch.nn.functional.cosine_similarity(kept[fused], plain[fused], dim=-1)
        assert torch.allclose(cosine, torch.ones_like(cosine), rtol=0, atol=1e-12)  # only rescaled
        assert torch.equal(kept[~fused], hidden[~fused])  # positions not fused: untouched


def test_steering_the_prefix_adds_each_samples_mean_question_edit_to_its_real_earlier_positions(tensors):
    hidden, text, image, fused, real = tensors
    spec = FusionSpec(a=0.8, b=0.3, steer_prefix=True)
    prefix = real & ~fused
    steered = _edit(spec, text, image, fused, prefix)(hidden)
    delta = 0.8 * text - 0.3 * image
    for row in range(BATCH):
        mean = delta[row][fused[row]].mean(dim=0)
        assert torch.allclose(steered[row][prefix[row]], hidden[row][prefix[row]] + mean, rtol=0, atol=1e-12)
        assert torch.allclose(steered[row][fused[row]], hidden[row][fused[row]] + delta[row][fused[row]], rtol=0, atol=1e-12)
    assert torch.equal(steered[~real], hidden[~real])  # padding is never steered
    with_norm = _edit(FusionSpec(a=0.8, b=0.3, steer_prefix=True, preserve_norm=True), text, image, fused, prefix)(hidden)
    assert torch.allclose(with_norm.norm(dim=-1)[real], hidden.norm(dim=-1)[real], rtol=0, atol=1e-12)
    assert torch.equal(with_norm[~real], hidden[~real])


def test_a_neutral_fusion_stays_exactly_neutral_with_either_variant(tensors):
    hidden, text, image, fused, real = tensors
    for spec in (FusionSpec(preserve_norm=True), FusionSpec(steer_prefix=True), FusionSpec(preserve_norm=True, steer_prefix=True)):
        assert spec.is_neutral
        assert torch.equal(_edit(spec, text, image, fused, real & ~fused)(hidden), hidden)


def test_steering_the_prefix_is_refused_outside_additive_mode_in_every_place_it_can_be_asked_for():
    with pytest.raises(ValueError, match="additive"):
        FusionSpec(mode="replace", steer_prefix=True)
    with pytest.raises(ValidationError, match="steer_prefix needs mode additive"):
        FusionParams(mode="replace", steer_prefix=True)
    with pytest.raises(ValidationError, match="needs the additive mode"):
        CalibrationParams(modes=["replace"], steer_prefix=[True])
    with pytest.raises(ValidationError, match="at least one value"):
        CalibrationParams(preserve_norm=[])


class _VariantCalibrator:
    """Right on the first 30 of 40 items only with norm-preserving, prefix-steering additive fusion."""

    num_layers = 4
    batches = [type("Batch", (), {"records": list(range(40))})()]

    def __init__(self):
        self.evaluated: list[FusionSpec] = []

    def correct(self, spec: FusionSpec) -> list[bool]:
        self.evaluated.append(spec)
        right = 30 if spec.preserve_norm and spec.steer_prefix and spec.a > 0 else 5
        return [i < right for i in range(40)]

    def answer_log_likelihood(self, spec: FusionSpec) -> float:
        return 0.0


def test_the_search_covers_each_listed_variant_and_can_choose_one():
    params = CalibrationParams(
        modes=["additive", "replace"],
        weights=[0.0, 1.0],
        layer_ranges=[(0, 4)],
        preserve_norm=[False, True],
        steer_prefix=[False, True],
        budget=40,
    )
    calibrator = _VariantCalibrator()
    result = search(calibrator, params)
    seen = {(s.mode, s.preserve_norm, s.steer_prefix) for s in calibrator.evaluated if s != NEUTRAL}
    assert seen == {
        ("additive", False, False), ("additive", True, False), ("additive", False, True), ("additive", True, True),
        ("replace", False, False), ("replace", True, False),
    }  # fmt: skip
    chosen = result["fusion"]
    assert chosen["preserve_norm"] is True and chosen["steer_prefix"] is True and chosen["a"] > 0
    assert {"preserve_norm", "steer_prefix"} <= set(result["search"][0])  # the table shows each row's variant


def test_a_fusion_file_with_a_variant_reads_back_and_one_with_a_bad_variant_is_a_clear_error(tmp_path):
    import json

    from vift.errors import UserError
    from vift.fusion.modes import FusionFile

    good = tmp_path / "fusion.json"
    good.write_text(json.dumps({"fusion": {**FusionSpec(a=0.5, preserve_norm=True, steer_prefix=True).to_dict()}}))
    assert FusionFile.read(good).spec == FusionSpec(a=0.5, preserve_norm=True, steer_prefix=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fusion": {"mode": "replace", "steer_prefix": True}}))
    with pytest.raises(UserError, match="bad.json: invalid fusion: .*steer_prefix needs mode additive"):
        FusionFile.read(bad)


# --- the mean task vector -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(tiny_lvlm, ci_data):
    from PIL import Image

    from tests.conftest import widened
    from vift.data.manifests import Manifest
    from vift.fusion.calibrate import Calibrator

    model, processor = tiny_lvlm
    model = widened(model, seed=3)
    records = list(Manifest(ci_data / "calibration.jsonl", "vqa"))[:6]
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    return model, processor, records, images, Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=2)


def test_the_task_vector_is_the_mean_of_t_minus_v_over_every_calibration_items_question_positions(calibration):
    from vift.fusion.calibrate import Calibrator
    from vift.fusion.families import adapter_for
    from vift.fusion.method import align_right, capture_states, fused_positions

    model, processor, records, images, calibrator = calibration
    adapter, layers = adapter_for(model), calibrator.num_layers
    differences: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    for record, image in zip(records, images):  # one item at a time: no padding, no batching
        image_inputs = adapter.image_inputs(processor, [image], [record.question], model.device)
        text_inputs = adapter.text_inputs(processor, [record.question], model.device)
        text, vision = capture_states(model, image_inputs, text_inputs, 0, layers)
        mask = fused_positions(
            image_inputs["input_ids"], image_inputs["attention_mask"], text_inputs["input_ids"], text_inputs["attention_mask"], "question"
        )
        for layer in range(layers):
            differences[layer].append((align_right(text[layer], mask.shape[1]) - vision[layer])[mask])
    expected = torch.stack([torch.cat(d).double().mean(dim=0) for d in differences])
    vector = torch.tensor(calibrator.task_vector(), dtype=torch.float64)
    assert vector.shape == (layers, model.config.get_text_config().hidden_size)
    assert torch.allclose(vector, expected, rtol=0, atol=1e-5)
    uncached = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=2, max_cache_bytes=0)
    assert torch.allclose(torch.tensor(uncached.task_vector(), dtype=torch.float64), vector, rtol=0, atol=1e-9)


def test_task_vector_fusion_adds_a_times_the_layers_vector_on_the_question_positions_only(calibration, monkeypatch):
    from vift.fusion import method
    from vift.fusion.families import adapter_for
    from vift.fusion.hooks import capture_layer_inputs

    model, processor, records, images, calibrator = calibration
    adapter = adapter_for(model)
    questions = [r.question for r in records[:4]]
    image_inputs = adapter.image_inputs(processor, images[:4], questions, model.device)
    text_inputs = adapter.text_inputs(processor, questions, model.device)
    vector = calibrator.task_vector()
    spec = FusionSpec(mode="task_vector", a=0.75, layer_start=1, layer_end=3, task_vector=vector)
    seen = []
    layer = model.get_decoder().layers[1]
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    try:
        steered = method.steered_generate(model, image_inputs, text_inputs, spec, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    plain = capture_layer_inputs(model, model.get_decoder().layers, image_inputs, 1, 2)[0]
    mask = fused_positions(
        image_inputs["input_ids"], image_inputs["attention_mask"], text_inputs["input_ids"], text_inputs["attention_mask"], "question"
    )
    expected = plain + mask[..., None] * 0.75 * torch.tensor(vector[1], dtype=plain.dtype)
    assert torch.allclose(seen[0], expected, rtol=0, atol=1e-6)
    assert steered.shape[1] == image_inputs["input_ids"].shape[1] + 1


def test_calibration_searches_the_task_vector_by_its_one_weight_and_the_fusion_file_carries_the_vector(calibration, tmp_path):
    import json

    from vift.fusion.modes import FusionFile

    *_, calibrator = calibration
    params = CalibrationParams(modes=["task_vector"], weights=[0.0, 0.5, 1.0], layer_ranges=[(0, 4), (2, 4)], budget=8, significance=1.0)
    result = search(calibrator, params, bootstrap_samples=10)
    searched = [row for row in result["search"] if row["mode"] == "task_vector"]
    assert {(row["a"], row["b"]) for row in searched} >= {(0.0, 0.0), (1.0, 0.0)} and all(row["b"] == 0 for row in searched)
    assert all("task_vector" not in row for row in result["search"])  # the table stays readable
    chosen = result["fusion"]
    assert chosen["mode"] == "task_vector" and len(chosen["task_vector"]) == calibrator.num_layers
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps(result))
    spec = FusionFile.read(path).spec
    assert spec.task_vector == calibrator.task_vector() and spec.to_dict() == {k: v for k, v in chosen.items() if k != "task_vector"}


def test_a_task_vector_mode_without_its_vector_is_refused_with_what_to_do():
    with pytest.raises(ValidationError, match="list task_vector in fusion.calibrate.modes instead"):
        FusionParams(mode="task_vector", a=0.5)
    with pytest.raises(ValueError, match="b must be 0"):
        FusionSpec(mode="task_vector", a=0.5, b=0.5)
    assert FusionSpec(mode="task_vector").is_neutral and not FusionSpec(mode="task_vector", a=0.5).is_neutral
