"""Evaluation: answer extraction, intervals, paired statistics, controls, calibration search."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vift.config.schema import CalibrationParams
from vift.data.manifests import Manifest
from vift.eval.ablation import majority_rows, summarise, wrong_image_order
from vift.fusion.calibrate import Calibrator, candidate_ranges, search
from vift.scoring.answers import extract_answer, is_correct
from vift.scoring.stats import paired_comparison, wilson_interval


@pytest.mark.parametrize(
    "prediction, gold, choices, extracted, correct",
    [
        ("5", "5", None, "5", True),
        ("There are five circles.", "5", None, "five", True),
        ("2 circles; 2 plus 3 is 5.", "5", None, "5", True),
        ("The answer is 3.50", "3.5", None, "3.50", True),
        ("1,200 apples", "1200", None, "1,200", True),
        ("yes", "no", None, "yes", False),
        ("No, there are not.", "no", None, "no", True),
        ("The answer is (B)", "B", ["cat", "dog"], "B", True),
        ("dog", "B", ["cat", "dog"], "B", True),
        ("C", "B", ["cat", "dog"], "", False),
        ("  Red square. ", "red square", None, "red square", True),
        ("", "4", None, "", False),
    ],
)
def test_rule_based_extraction_and_scoring(prediction, gold, choices, extracted, correct):
    got = extract_answer(prediction, gold, choices)
    assert got == extracted
    assert is_correct(got, gold, choices) is correct


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 0) == (0.0, 0.0)


def test_paired_comparison_counts_discordant_items():
    first = [True] * 30 + [False] * 10
    second = [False] * 20 + [True] * 10 + [False] * 10
    result = paired_comparison(first, second, samples=2000, seed=0)
    assert result["difference"] == pytest.approx(0.5)
    assert (result["only_first_correct"], result["only_second_correct"]) == (20, 0)
    assert result["mcnemar_p"] < 1e-5 and 0.3 < result["ci95"][0] < 0.5 < result["ci95"][1]


def test_wrong_images_are_a_derangement():
    order = wrong_image_order(50, seed=3)
    assert sorted(order) == list(range(50)) and all(i != j for i, j in enumerate(order))
    assert order == wrong_image_order(50, seed=3) != wrong_image_order(50, seed=4)


def test_majority_per_type_guesses_the_most_common_answer(ci_data):
    records = list(Manifest(ci_data / "test.jsonl", "vqa", check_images=False))
    rows = majority_rows(records)
    for kind in {r.type for r in records}:
        answers = [r.answer for r in records if r.type == kind]
        guessed = {row["prediction"] for row in rows if row["type"] == kind}
        assert guessed == {max(set(answers), key=answers.count)}


def test_verdict_needs_the_paired_interval_above_zero():
    def row(flags):
        return [{"id": str(i), "type": "t", "correct": f} for i, f in enumerate(flags)]

    good = [True] * 60 + [False] * 40
    weak = [False] * 40 + [True] * 20 + [False] * 40
    rows = {"vift_fused": row(good), "vift_unfused": row(weak), "question_only": row(weak), "fused_wrong_image": row(good)}
    verdict = summarise(rows, bootstrap_samples=500, seed=0)["verdict"]
    assert verdict["beats"] == {"vift_unfused": True, "question_only": True, "fused_wrong_image": False}
    assert verdict["fusion_beats_controls"] is False


def test_default_layer_ranges_cover_the_depth():
    assert candidate_ranges(28, None)[:3] == [(0, 28), (14, 28), (7, 28)]
    with pytest.raises(ValueError, match="outside"):
        candidate_ranges(4, [(2, 6)])


def test_calibration_search_stays_in_budget_and_never_loses_to_no_fusion(tiny_lvlm, ci_data):
    model, processor = tiny_lvlm
    records = list(Manifest(ci_data / "calibration.jsonl", "vqa"))[:8]
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    calibrator = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=3)
    params = CalibrationParams(modes=["additive", "replace"], weights=[0.0, 0.5, 1.0], budget=12)
    result = search(calibrator, params)
    assert len(result["search"]) <= 12 and result["calibration"]["evaluated"] == len(result["search"])
    assert {row["mode"] for row in result["search"]} == {"additive", "replace"}
    assert result["calibration"]["accuracy"] >= result["calibration"]["unfused_accuracy"]
    chosen = result["fusion"]
    best = max(row["accuracy"] for row in result["search"])
    assert any(row["accuracy"] == best and all(row[k] == chosen[k] for k in chosen) for row in result["search"])


def test_the_capture_cache_cap_is_checked_before_capturing_the_first_batch_too(tiny_lvlm, ci_data):
    """Before, the first batch was captured whatever its size (~5 GB at 7B, batch 32)."""
    from vift.fusion.calibrate import capture_bytes
    from vift.fusion.method import FusionSpec

    model, processor = tiny_lvlm
    records = list(Manifest(ci_data / "calibration.jsonl", "vqa"))[:8]
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    everything = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=3)
    first = everything.batches[0]
    measured = sum(t.numel() * t.element_size() for group in first.states for t in group)
    assert capture_bytes(model, first.image_inputs, first.text_inputs, everything.num_layers) == measured  # exact
    none = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=3, max_cache_bytes=measured - 1)
    assert [b.states is None for b in none.batches] == [True, True]
    one = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=3, max_cache_bytes=measured)
    assert [b.states is None for b in one.batches] == [False, True]
    spec = FusionSpec(mode="additive", a=0.5, b=0.25)
    assert none.correct(spec) == one.correct(spec) == everything.correct(spec)  # the same answers, cached or not


def test_gold_answer_log_likelihood_equals_a_teacher_forced_forward_pass(tiny_lvlm, ci_data):
    """The calibration tie-break: mean log p(answer + end-of-turn | image, question), finite."""
    from vift.fusion.families import adapter_for
    from vift.fusion.method import NEUTRAL

    model, processor = tiny_lvlm
    records = list(Manifest(ci_data / "calibration.jsonl", "vqa"))[:4]
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    calibrator = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=3)
    measured = calibrator.answer_log_likelihood(NEUTRAL)
    tokenizer = processor.tokenizer
    expected = 0.0
    for record, image in zip(records, images):
        prompt = adapter_for(model).image_inputs(processor, [image], [record.question], model.device)
        gold = tokenizer(record.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.cat([prompt["input_ids"], torch.tensor([gold])], dim=1)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=prompt["pixel_values"]).logits[0].double()
        start = prompt["input_ids"].shape[1]
        log_probs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        expected += float(log_probs.gather(1, torch.tensor(gold)[:, None]).sum())
    assert math.isfinite(measured) and measured < 0
    assert measured == pytest.approx(expected / len(records), rel=1e-4)


def test_the_headline_metric_is_a_few_numbers_of_the_served_row_and_the_verdict():
    from vift.eval.report import headline

    metrics = {
        "rows": {
            "vift_fused": {"accuracy": 0.41234, "ci95": [0.38, 0.44]},
            "question_only": {"accuracy": 0.444, "ci95": [0.41, 0.47]},
            "describe_then_answer": {"accuracy": 0.572, "ci95": [0.541, 0.602]},
        },
        "verdict": {"fusion_beats_controls": False},
        "perception": {"vift": {"accuracy": 0.045}},
    }
    assert headline(metrics, "describe_then_answer") == {
        "served": {"acc": 0.572, "lo": 0.541, "hi": 0.602},
        "fused": 0.4123,
        "q_only": 0.444,
        "fusion_wins": False,
        "perceive": 0.045,
    }
    del metrics["perception"]
    assert "perceive" not in headline(metrics, "vift_fused") and headline(metrics, "vift_fused")["served"]["acc"] == 0.4123
