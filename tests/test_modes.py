"""Inference modes: calibration picks the one to serve only on evidence; the served model uses it."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from vift.fusion.method import FusionSpec
from vift.fusion.modes import choose_mode, describe_then_answer, fused_generate
from vift.registry.pyfunc import ViftModel
from vift.scoring.stats import paired_comparison


def compare(first, second):
    return paired_comparison(first, second, 2000, 0)


def test_plain_is_served_unless_another_mode_wins_beyond_noise():
    n = 200
    plain = [i < 80 for i in range(n)]  # 40 %
    by_noise = [4 <= i < 88 for i in range(n)]  # 8 wins, 4 losses: +2 points
    one_sided = [i < 84 for i in range(n)]  # 4 wins, 0 losses: the bootstrap alone calls it real
    clearly = [i < 140 for i in range(n)]  # +60 items, every plain success kept
    chosen = choose_mode({"plain": plain, "fused": by_noise, "describe_then_answer": one_sided}, compare)
    assert chosen["mode"] == "plain" and chosen["accuracy"]["fused"] == 0.42
    assert chosen["versus_plain"]["fused"]["ci95"][0] <= 0
    lucky = chosen["versus_plain"]["describe_then_answer"]
    assert lucky["ci95"][0] > 0 and lucky["mcnemar_p"] == pytest.approx(0.125)
    chosen = choose_mode({"plain": plain, "fused": by_noise, "describe_then_answer": clearly}, compare)
    assert chosen["mode"] == "describe_then_answer" and chosen["versus_plain"]["describe_then_answer"]["ci95"][0] > 0
    # Two modes beyond noise: the more accurate one.
    better = [i < 150 for i in range(n)]
    assert choose_mode({"plain": plain, "fused": better, "describe_then_answer": clearly}, compare)["mode"] == "fused"


def png_base64(colour: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def describe_model(tiny_checkpoint, tmp_path_factory) -> ViftModel:
    fusion = tmp_path_factory.mktemp("fusion") / "fusion.json"
    spec = FusionSpec(mode="additive", positions="question", a=0.5, b=0.5, layer_start=0, layer_end=2)
    fusion.write_text(json.dumps({"fusion": spec.to_dict(), "serving": {"mode": "describe_then_answer"}}))
    model = ViftModel(max_new_tokens=3)
    model.load_context(SimpleNamespace(artifacts={"model": str(tiny_checkpoint), "fusion": str(fusion)}))
    return model


def test_the_served_model_answers_in_the_mode_calibration_recorded_and_a_request_may_ask_another(describe_model, monkeypatch):
    calls = []

    def spy(model, processor, images, questions, fusion, **kwargs):
        calls.append(("image" if images is not None else "text", list(questions), fusion))
        return [f"answer-{len(calls)}\n  and a second line"] * len(questions)

    monkeypatch.setattr("vift.fusion.modes.fused_generate", spy)
    frame = pd.DataFrame({"image": [png_base64("red")], "question": ["What colour?"]})
    assert describe_model.mode == "describe_then_answer"
    assert describe_model.predict(None, frame) == ["answer-2"]  # one clean final answer
    (_, describe, _), (kind, over_caption, _) = calls
    assert describe == ["Describe the image."] and kind == "text"
    assert over_caption[0] == "Scene: answer-1\n  and a second line\nWhat colour?"
    calls.clear()
    describe_model.predict(None, frame, params={"mode": "fused"})
    assert calls[0][0] == "image" and calls[0][2] is describe_model.fusion
    calls.clear()
    describe_model.predict(None, frame, params={"fusion": False})
    assert calls[0][0] == "image" and calls[0][2] is None


def test_describe_then_answer_is_the_ablation_row_computed_the_same_way(tiny_lvlm):
    model, processor = tiny_lvlm
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    questions = ["What colour?", "How many shapes?"]
    answers, captions = describe_then_answer(model, processor, images, questions, batch_size=2, max_new_tokens=3)
    direct = fused_generate(model, processor, images, ["Describe the image."] * 2, None, batch_size=2, max_new_tokens=64)
    assert captions == direct and len(answers) == 2


def test_perception_counts_captions_that_state_exactly_the_reference_content(monkeypatch):
    from vift.data.manifests import VQARecord
    from vift.eval.ablation import perception
    from vift.scoring.stats import wilson_interval

    references = ["red circle at top left, blue square at center", "green triangle at center", "yellow square at bottom"]
    records = [VQARecord(id=f"q{i}", image=f"{i}.png", question="?", answer="1", reference=r) for i, r in enumerate(references)]
    captions = {
        "caption": ["blue square at center, red circle at top left.", "green triangle at center", "red square at bottom"],
        "vift": ["red circle at top left", "green triangle at center.", "yellow square at bottom"],
    }
    asked = []

    def fake_generate(model, processor, images, prompts, fusion, **kwargs):
        asked.append(prompts[0])
        return captions[model]

    monkeypatch.setattr("vift.fusion.method.fused_generate", fake_generate)
    models = {name: (lambda n=name: (n, None)) for name in captions}
    seen = perception(models, records, [None] * 3, "What is in the picture?", batch_size=4)
    # caption: phrases in another order count (2 of 3: the third names the wrong colour);
    # vift: a missing object is not the reference content (2 of 3).
    assert seen["caption"]["accuracy"] == seen["vift"]["accuracy"] == pytest.approx(2 / 3)
    assert seen["caption"]["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert seen["vift"]["phrase_f1"] == pytest.approx(2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))
    assert asked == ["What is in the picture?"] * 2
    no_reference = [VQARecord(id="q", image="x.png", question="?", answer="1")]
    assert perception(models, no_reference, [None], "p", batch_size=1) is None


def test_the_reference_field_is_optional_and_scene_is_accepted():
    from vift.data.manifests import VQARecord, reference_of

    assert reference_of(VQARecord(id="a", image="a.png", question="?", answer="1", reference="red circle")) == "red circle"
    assert reference_of(VQARecord(id="a", image="a.png", question="?", answer="1", scene="red circle")) == "red circle"
    assert reference_of(VQARecord(id="a", image="a.png", question="?", answer="1")) is None


def test_prompt_defaults_are_shapetallys_and_a_null_describe_prompt_is_the_captions_own(tmp_path, ci_data):
    from vift.config.schema import PromptParams
    from vift.data.world import text_prompt
    from vift.fusion.modes import Prompts

    default = PromptParams()
    assert default.over_description.format(description="red circle", question="How many?") == text_prompt("red circle", "How many?")
    assert Prompts().over("red circle", "How many?") == text_prompt("red circle", "How many?")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"id": "c", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A dog."}]}) + "\n")  # fmt: skip
    assert Prompts.from_params(default, captions).describe == "What is in the picture?"
    assert Prompts.from_params(default, ci_data / "captions.jsonl").describe == "Describe the image."
    custom = PromptParams(describe="Caption this.", over_description="A picture shows {description} {question}")
    assert Prompts.from_params(custom, captions).over("a dog.", "What animal?") == "A picture shows a dog. What animal?"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Scene: {description}", "over_description must use exactly {description} and {question}, not ['description']"),
        ("{description} {question} {extra}", "not ['description', 'extra', 'question']"),
        ("{description} {question", "over_description is not a format string"),
    ],
)
def test_a_template_without_both_fields_is_refused_with_the_field(tmp_path, capsys, template, expected):
    from vift.cli import main

    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"prompts": {"over_description": template}}))
    assert main(["params", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "  prompts: " in err and expected in err


class _NoisyCalibrator:
    """Calibration items where one configuration is right on ``wins`` more items than no fusion."""

    num_layers = 4

    def __init__(self, items: int, wins: int, losses: int = 0):
        self.batches = [type("Batch", (), {"records": list(range(items))})()]
        self.items, self.wins, self.losses = items, wins, losses

    def correct(self, spec):
        base = [i < self.items // 4 for i in range(self.items)]  # no fusion: a quarter right
        if spec.is_neutral or (spec.a, spec.b) != (1.0, 0.0):
            return base
        flipped = list(base)
        for i in range(self.wins):
            flipped[self.items // 4 + i] = True
        for i in range(self.losses):
            flipped[i] = False
        return flipped

    def answer_log_likelihood(self, spec):
        return 0.0


def test_calibration_keeps_no_fusion_unless_the_winner_beats_it_beyond_chance_with_the_search_counted():
    from vift.config.schema import CalibrationParams
    from vift.fusion.calibrate import search

    params = CalibrationParams(modes=["additive"], weights=[0.0, 1.0], layer_ranges=[(0, 4)], budget=10)
    # 12 wins, 0 losses on 200 items: McNemar p = 0.0005, below 0.05 / 9 configurations tried: kept.
    clear = search(_NoisyCalibrator(200, wins=12), params)
    assert clear["calibration"]["evaluated"] == 9 and clear["calibration"]["best_versus_neutral"]["threshold"] == pytest.approx(0.05 / 9)
    assert clear["fusion"]["a"] == 1.0 and clear["calibration"]["best_versus_neutral"]["kept_neutral"] is False
    # 5 wins, 1 loss: the best of the search by accuracy (+2 points) but within chance: no fusion kept, and said.
    noisy = search(_NoisyCalibrator(200, wins=5, losses=1), params)
    best = noisy["calibration"]["best_versus_neutral"]
    assert noisy["calibration"]["best"]["a"] == 1.0 and best["difference"] == pytest.approx(0.02)
    assert best["kept_neutral"] is True and best["mcnemar_p"] > best["threshold"]
    assert noisy["fusion"]["a"] == 0.0 and noisy["calibration"]["chosen_is_neutral"] is True
    assert noisy["calibration"]["accuracy"] == noisy["calibration"]["unfused_accuracy"] == 0.25
    # The search table shows each configuration's paired difference with no fusion and its interval.
    row = next(r for r in noisy["search"] if (r["a"], r["b"]) == (1.0, 0.0))
    assert row["difference_vs_neutral"] == pytest.approx(0.02) and row["ci95_low_vs_neutral"] < row["ci95_high_vs_neutral"]


def test_the_fusion_sections_configuration_seeds_the_search_or_is_served_as_given():
    from vift.config.schema import CalibrationParams
    from vift.fusion.calibrate import search
    from vift.fusion.method import FusionSpec

    given = FusionSpec(a=0.5, b=0.25, layer_start=1, layer_end=3)  # on no grid point of the search below
    params = CalibrationParams(modes=["additive"], weights=[0.0, 1.0], layer_ranges=[(0, 4)], budget=10)
    seeded = search(_NoisyCalibrator(200, wins=12), params, start=given)
    assert [(r["a"], r["b"], r["layer_start"]) for r in seeded["search"][:2]] == [(0.0, 0.0, 0), (0.5, 0.25, 1)]
    assert seeded["fusion"]["a"] == 1.0 and seeded["calibration"]["searched"] is True  # the search still wins
    # search off: only no fusion and the given configuration, which is served although it does not win.
    fixed = search(_NoisyCalibrator(200, wins=12), params.model_copy(update={"search": False, "budget": 1}), start=given)
    assert [r["phase"] for r in fixed["search"]] == ["fixed", "fixed"] and fixed["calibration"]["evaluated"] == 2
    assert FusionSpec.from_dict(fixed["fusion"]) == given and fixed["calibration"]["searched"] is False
    assert fixed["calibration"]["best_versus_neutral"]["difference"] == 0.0


def test_a_fixed_fusion_outside_the_models_layers_is_refused_with_the_fields_named():
    from vift.config import load_preset
    from vift.errors import UserError
    from vift.stages.calibrate import start_spec

    params = load_preset("ci").model_copy(deep=True)
    params.fusion.layer_start, params.fusion.layer_end = 2, 9
    with pytest.raises(UserError, match=r"fusion.layer_start / fusion.layer_end: fusion layers \[2, 9\) outside the model's 4"):
        start_spec(params, 4)
    params.fusion.layer_end = 4
    assert start_spec(params, 4).layer_range(4) == (2, 4)
