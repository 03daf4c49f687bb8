"""Guards on the verdict-critical code: each test pins one behaviour that a one-line bug would break.

Statistics (Wilson interval, paired bootstrap, the verdict rule), answer scoring, the calibration
tie-break and its reuse of captured states, the fusion formula and its hooks, the image-root check
and the ablation's controls. Stubs and exact values where possible; the tiny LLaVA where the
behaviour lives in a real forward pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as scipy_stats

from tests.conftest import widened
from vift.config.schema import CalibrationParams
from vift.data.manifests import Manifest, VQARecord, resolve_image
from vift.eval.ablation import run_ablation, summarise
from vift.fusion.calibrate import Calibrator, search
from vift.fusion.families import adapter_for
from vift.fusion.hooks import PrefillEditor, capture_layer_inputs
from vift.fusion.method import NEUTRAL, FusionSpec, align_right, capture_states, fused_positions, steered_generate
from vift.model.loading import decoder_layers
from vift.registry import gate
from vift.scoring.answers import score_answer
from vift.scoring.stats import paired_comparison, wilson_interval

# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("correct, n", [(3, 20), (17, 20), (1, 50), (40, 45), (7, 9), (120, 400)])
def test_wilson_interval_equals_scipys_wilson_interval_off_centre(correct, n):
    expected = scipy_stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(correct, n)
    assert low == pytest.approx(expected.low, abs=1e-6)
    assert high == pytest.approx(expected.high, abs=1e-6)


def test_wilson_interval_is_not_centred_on_the_observed_proportion():
    low, high = wilson_interval(2, 20)  # p = 0.1: the Wilson centre is pulled towards 1/2
    assert (low + high) / 2 == pytest.approx((0.1 + 1.959964**2 / 40) / (1 + 1.959964**2 / 20), abs=1e-9)
    assert (low + high) / 2 > 0.1 + 0.05


def test_paired_bootstrap_keeps_items_paired():
    """Two systems that agree on all but 4 of 100 items: the paired interval is narrow and above 0.

    Resampling the two columns independently would give an interval of about +-0.14 around 0.04."""
    first = [i % 2 == 0 for i in range(100)]
    second = list(first)
    for i in (0, 2, 4, 6):  # first right, second wrong
        second[i] = False
    result = paired_comparison(first, second, samples=4000, seed=0)
    low, high = result["ci95"]
    assert result["difference"] == pytest.approx(0.04)
    assert 0 < low < 0.04 < high < 0.1


def test_paired_bootstrap_interval_of_identical_systems_is_exactly_zero():
    flags = [i % 3 == 0 for i in range(90)]
    assert paired_comparison(flags, list(flags), samples=2000, seed=1)["ci95"] == [0.0, 0.0]


def test_paired_bootstrap_interval_is_95_percent_wide():
    """n = 400, 100 items only first right, 60 only second: the bootstrap of the mean difference is
    close to normal, so the 95 % interval is 2 * 1.96 * se wide (a 90 % one would be 16 % narrower)."""
    first = [True] * 100 + [False] * 60 + [True] * 120 + [False] * 120
    second = [False] * 100 + [True] * 60 + [True] * 120 + [False] * 120
    diff_mean, diff_square = 40 / 400, 160 / 400
    se = ((diff_square - diff_mean**2) / 400) ** 0.5
    low, high = paired_comparison(first, second, samples=20000, seed=0)["ci95"]
    assert high - low == pytest.approx(2 * 1.959964 * se, rel=0.05)
    assert (low + high) / 2 == pytest.approx(diff_mean, abs=0.005)


def _rows(flags):
    return [{"id": str(i), "type": "t", "correct": bool(f)} for i, f in enumerate(flags)]


def test_verdict_is_negative_when_the_paired_interval_straddles_zero():
    fused = [True] * 50 + [False] * 50
    unfused = list(fused)
    for i in range(5):  # 5 items only fused right, 3 only unfused right: +0.02, not significant
        unfused[i] = False
    for i in range(50, 53):
        unfused[i] = True
    weak = [False] * 100
    rows = {"vift_fused": _rows(fused), "vift_unfused": _rows(unfused), "question_only": _rows(weak), "fused_wrong_image": _rows(weak)}
    metrics = summarise(rows, bootstrap_samples=2000, seed=0)
    low, high = metrics["paired"]["vift_fused_vs_vift_unfused"]["ci95"]
    assert low < 0 < high
    assert metrics["verdict"]["beats"] == {"vift_unfused": False, "question_only": True, "fused_wrong_image": True}
    assert metrics["verdict"]["fusion_beats_controls"] is False


# --- answer scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, correct",
    [
        ("5", True),
        ("5.0", True),
        ("There are five shapes.", True),
        ("6", False),
        ("There are 6 circles.", False),
        ("-5", False),
        ("50", False),
        ("4.9", False),
        ("six", False),
        ("5 or 6? I say 6", False),
    ],
)
def test_numeric_gold_is_correct_only_for_the_same_number(response, correct):
    record = VQARecord(id="1", question="How many shapes?", answer="5")
    assert score_answer(record, response)["correct"] is correct


# --- calibration ------------------------------------------------------------------------------


class _TieCalibrator:
    """A stand-in for Calibrator: accuracy and gold log-likelihood given per configuration."""

    num_layers = 4
    batches = [type("Batch", (), {"records": [0, 1, 2, 3]})()]

    def __init__(self):
        self.scored: list[FusionSpec] = []

    def accuracy(self, spec: FusionSpec) -> float:
        return 0.75 if spec == NEUTRAL or spec.a == 1.0 else 0.25

    def correct(self, spec: FusionSpec) -> list[bool]:
        return [True, True, True, False] if self.accuracy(spec) == 0.75 else [True, False, False, False]

    def answer_log_likelihood(self, spec: FusionSpec) -> float:
        self.scored.append(spec)
        if spec == NEUTRAL:
            return -2.0
        return -0.5 if (spec.a, spec.b) == (1.0, 1.0) else -1.5


def test_calibration_tie_goes_to_the_best_gold_log_likelihood_not_the_first():
    calibrator = _TieCalibrator()
    # significance 1: the tie-break alone (the configurations tie with no fusion, so the check for
    # "beyond chance" would keep no fusion; see test_modes' calibration tests).
    params = CalibrationParams(modes=["additive"], weights=[0.0, 1.0], layer_ranges=[(0, 4)], budget=10, significance=1.0)
    result = search(calibrator, params)
    assert result["calibration"]["tied_at_top"] == 3 and len(calibrator.scored) == 3
    assert result["search"][0]["a"] == 0.0 and result["search"][0]["accuracy"] == 0.75  # the first is tied too
    chosen = result["fusion"]
    assert (chosen["mode"], chosen["a"], chosen["b"], chosen["layer_start"], chosen["layer_end"]) == ("additive", 1.0, 1.0, 0, 4)
    assert result["calibration"]["chosen_is_neutral"] is False


# --- fusion on the tiny LLaVA -----------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_model(tiny_lvlm):
    """The ci tiny LLaVA (float32, so calibration's processor inputs fit) with a wider init, so
    fused states differ clearly between layers and samples."""
    model, processor = tiny_lvlm
    return widened(model, seed=2), processor


@pytest.fixture(scope="module")
def samples(ci_data):
    records = list(Manifest(ci_data / "calibration.jsonl", "vqa"))[:4]
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    return records, images


def _inputs(model, processor, images, questions):
    adapter = adapter_for(model)
    return adapter.image_inputs(processor, images, questions, model.device), adapter.text_inputs(processor, questions, model.device)


def test_replace_mode_writes_the_unsteered_image_state_not_the_steered_one(wide_model, samples):
    """H_l = w_vis * V_l + w_text * T_l on fused positions at every fused layer, V_l unsteered; the
    layers after the first see steered states, which replace mode must not use."""
    model, processor = wide_model
    records, images = samples
    image_inputs, text_inputs = _inputs(model, processor, images[:2], [r.question for r in records[:2]])
    spec = FusionSpec(mode="replace", w_vis=0.5, w_text=0.25, layer_start=1, layer_end=3)
    text_states, image_states = capture_states(model, image_inputs, text_inputs, 1, 3)
    mask = fused_positions(
        image_inputs["input_ids"], image_inputs["attention_mask"], text_inputs["input_ids"], text_inputs["attention_mask"], "question"
    )[..., None]
    layers = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def observe(index):
        def hook(module, args, kwargs, output):
            seen.setdefault(index, (args[0] if args else kwargs["hidden_states"]).detach().clone())  # the prefill's input

        return hook

    handles = [layers[i].register_forward_hook(observe(i), with_kwargs=True) for i in (1, 2)]
    try:
        steered_generate(model, image_inputs, text_inputs, spec, (text_states, image_states), max_new_tokens=1, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    length = image_inputs["input_ids"].shape[1]
    for k, layer in enumerate((1, 2)):
        v, t = image_states[k], align_right(text_states[k], length)
        expected = torch.where(mask, 0.5 * v + 0.25 * t, v)
        assert torch.allclose(seen[layer], expected, atol=1e-4), f"layer {layer}"


def test_beams_carry_each_samples_own_fusion(wide_model, samples):
    """With 2 beams x 2 return sequences, rows 2i and 2i+1 of the batch belong to sample i: their
    first-step logits equal those of sample i fused on its own."""
    model, processor = wide_model
    records, images = samples
    questions = [r.question for r in records[:3]]
    kwargs = dict(num_beams=2, num_return_sequences=2, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    spec = FusionSpec(a=1.0, b=0.5, layer_start=1)
    image_inputs, text_inputs = _inputs(model, processor, images[:3], questions)
    batched = steered_generate(model, image_inputs, text_inputs, spec, **kwargs)
    assert batched.logits[0].shape[0] == 6
    for i in range(3):
        single_image, single_text = _inputs(model, processor, [images[i]], [questions[i]])
        single = steered_generate(model, single_image, single_text, spec, **kwargs)
        for beam in range(2):
            assert torch.allclose(batched.logits[0][2 * i + beam], single.logits[0][beam], atol=1e-3), (i, beam)


def test_a_fusion_hook_that_never_fires_is_an_error():
    layers = [torch.nn.Identity() for _ in range(3)]
    x = torch.zeros(1, 4, 2)
    editor = PrefillEditor(layers, 1, [lambda h: h + 1, lambda h: h + 1])
    with pytest.raises(RuntimeError, match=r"decoder layers \[2\] never fired"):
        with editor.active():
            assert torch.equal(layers[1](x), x + 1)  # layer 2 is never called
    fine = PrefillEditor(layers, 1, [lambda h: h + 1, lambda h: h + 1])
    with fine.active():
        layers[1](x), layers[2](x)
    assert [(i, e) for i, _, e in fine.calls] == [(1, True), (2, True)]


def test_a_capture_hook_that_never_fires_is_an_error():
    layers = [torch.nn.Identity() for _ in range(3)]

    class OnlyFirstLayer:
        def generate(self, **kwargs):
            layers[0](torch.zeros(1, 4, 2))

    with pytest.raises(RuntimeError, match=r"decoder layers \[1\] never fired"):
        capture_layer_inputs(OnlyFirstLayer(), layers, {}, 0, 2)


def test_calibration_reuses_captures_of_the_specs_own_layers(wide_model, samples):
    """Cached all-layer captures, sliced to [start, end), give what a fresh capture of that range gives."""
    model, processor = wide_model
    records, images = samples
    cached = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=2)
    fresh = Calibrator(model, processor, records, images, batch_size=4, max_new_tokens=2, max_cache_bytes=0)
    assert cached.batches[0].states is not None and fresh.batches[0].states is None
    spec = FusionSpec(a=1.0, b=0.5, layer_start=1, layer_end=3)
    text_states, image_states = cached._states(cached.batches[0], spec)
    expected_text, expected_image = capture_states(model, cached.batches[0].image_inputs, cached.batches[0].text_inputs, 1, 3)
    for got, want in zip([*text_states, *image_states], [*expected_text, *expected_image]):
        assert torch.allclose(got, want, atol=1e-5)
    assert cached.answer_log_likelihood(spec) == pytest.approx(fresh.answer_log_likelihood(spec), rel=1e-5)


# --- image root -------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ["../xevil/a.png", "../x-evil/a.png", "../x2/a.png", "sub/../../xevil/a.png", "/data/xevil/a.png"])
def test_an_image_in_a_sibling_folder_sharing_the_roots_prefix_is_refused(relative):
    with pytest.raises(ValueError, match="escapes the image root"):
        resolve_image(Path("/data/x"), relative)


def test_an_image_under_the_root_resolves_inside_it():
    assert resolve_image(Path("/data/x"), "sub/../a.png") == Path("/data/x/a.png")


# --- ablation controls ------------------------------------------------------------------------


def test_ablation_rows_get_their_own_model_images_and_fusion(monkeypatch):
    """Stub models answer with what they were given: the wrong-image control gets every item another
    item's image (fused), the ViT baseline runs the model loaded from models["vit"]."""

    def name(image) -> str:  # each test image is told apart by its width; a black one says so
        return f"{'black' if image.getpixel((0, 0)) == (0, 0, 0) else 'image'}{image.size[0] - 1}"

    def fake_generate(model, processor, images, questions, fusion, batch_size=16, **kwargs):
        return [f"{model}|{name(images[i]) if images is not None else '-'}|{fusion is not None}" for i in range(len(questions))]

    monkeypatch.setattr("vift.eval.runner.fused_generate", fake_generate)
    monkeypatch.setattr("vift.fusion.modes.fused_generate", fake_generate)  # describe_then_answer
    n = 6
    records = [VQARecord(id=str(i), image=f"{i}.png", question=f"question {i}", answer="1", type="count") for i in range(n)]
    images = [Image.new("RGB", (i + 1, 1), "white") for i in range(n)]
    models = {name: (lambda name=name: (f"{name}-model", "processor")) for name in ("caption", "vift", "vit")}
    fusion = FusionSpec(a=1.0)
    rows = run_ablation(models, records, images, fusion, batch_size=4, max_new_tokens=3, seed=5)

    def given(row):
        return [r["prediction"].split("|") for r in rows[row]]

    assert given("vift_fused") == [["vift-model", f"image{i}", "True"] for i in range(n)]
    wrong = given("fused_wrong_image")
    assert {model for model, _, _ in wrong} == {"vift-model"} and {f for _, _, f in wrong} == {"True"}
    wrong_images = [image for _, image, _ in wrong]
    assert sorted(wrong_images) == sorted(f"image{i}" for i in range(n))
    assert all(image != f"image{i}" for i, image in enumerate(wrong_images))
    assert given("vit_baseline") == [["vit-model", f"image{i}", "False"] for i in range(n)]
    assert given("caption_only") == [["caption-model", f"image{i}", "False"] for i in range(n)]
    assert given("question_only") == [["vift-model", "-", "False"] for i in range(n)]
    # The blank-image control: fused, over a black image of each item's own size.
    assert given("fused_blank_image") == [["vift-model", f"black{i}", "True"] for i in range(n)]


# --- scoring corners the mutation run found unguarded (docs/TESTING.md) --------------------------


@pytest.mark.parametrize(
    ("prediction", "correct"),
    [("C", True), ("The answer is C.", True), ("blue", True), ("B", False), ("green", False), ("c", True)],
)
def test_multiple_choice_gold_given_as_the_option_text_is_its_letter(prediction, correct):
    record = VQARecord(id="q", image="a.png", question="Which colour?", answer="blue", choices=["red", "green", "blue"])
    assert score_answer(record, prediction)["correct"] is correct


def test_yes_no_gold_takes_the_first_yes_or_no_and_nothing_else():
    from vift.scoring.answers import extract_answer

    assert extract_answer("Yes, there are more red shapes.", "yes") == "yes"
    assert extract_answer("I think no.", "yes") == "no"
    assert extract_answer("maybe", "yes") == ""
    record = VQARecord(id="q", image="a.png", question="More red?", answer="yes")
    assert score_answer(record, "Yes, there are more red shapes.")["correct"] is True


@pytest.mark.parametrize(
    ("gold", "prediction", "correct"),
    [("1000000", "1000000.5", True), ("1000000", "1000002", False), ("0.5", "0.5000015", False), ("0.5", "0.5000005", True)],
)
def test_numeric_tolerance_is_relative_to_the_gold_with_an_absolute_floor_of_one_millionth(gold, prediction, correct):
    record = VQARecord(id="q", image="a.png", question="How many?", answer=gold)
    assert score_answer(record, prediction)["correct"] is correct


def test_free_text_answers_compare_with_whitespace_and_end_punctuation_normalised():
    record = VQARecord(id="q", image="a.png", question="Which colour?", answer="dark blue")
    assert score_answer(record, "Dark   blue.")["correct"] is True
    assert score_answer(record, "dark")["correct"] is False


# --- paired comparison corners the mutation run found unguarded ---------------------------------


def test_paired_comparison_takes_plain_booleans_and_counts_both_discordant_sides():
    first = [True, True, False, False, True]
    second = [True, False, True, False, False]
    result = paired_comparison(first, second, 500, 0)
    assert result["difference"] == pytest.approx(0.2)
    assert (result["only_first_correct"], result["only_second_correct"]) == (2, 1)
    assert result["mcnemar_p"] == pytest.approx(scipy_stats.binomtest(2, 3, 0.5).pvalue)


def test_paired_comparison_without_resampling_or_items_is_the_plain_difference():
    assert paired_comparison([True, False], [False, False], 0, 0)["ci95"] == [0.5, 0.5]
    empty = paired_comparison([], [], 1000, 0)
    assert (empty["difference"], empty["ci95"], empty["mcnemar_p"]) == (0.0, [0.0, 0.0], 1.0)
    identical = paired_comparison([True, False, True], [True, False, True], 100, 0)
    assert identical["mcnemar_p"] == 1.0


def test_paired_comparison_is_reproducible_from_its_seed():
    rng = np.random.default_rng(1)
    first, second = list(rng.random(60) < 0.6), list(rng.random(60) < 0.4)
    runs = [paired_comparison(first, second, 300, seed)["ci95"] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_paired_comparison_refuses_unpaired_lists_by_name():
    with pytest.raises(ValueError, match="^paired comparison needs the same items in both$"):
        paired_comparison([True], [True, False], 10, 0)


# --- the served-mode choice and the registry gate: boundaries the mutation run found unguarded ----


def _comparison(low: float, p: float, difference: float = 0.1) -> dict:
    return {"difference": difference, "ci95": [low, low + 0.2], "mcnemar_p": p}


@pytest.mark.parametrize(
    ("low", "p", "served"),
    [(0.01, 0.01, "fused"), (0.0, 0.01, "plain"), (-0.01, 0.01, "plain"), (0.01, 0.05, "plain"), (0.01, 0.049, "fused")],
)
def test_a_mode_is_served_only_with_the_interval_strictly_above_0_and_p_strictly_below_005(low, p, served):
    from vift.fusion.modes import choose_mode

    correct = {"plain": [False, True], "fused": [True, True], "describe_then_answer": [False, False]}
    compare = {"fused": _comparison(low, p), "describe_then_answer": _comparison(-0.5, 1.0)}
    chosen = choose_mode(correct, lambda first, second: compare["fused" if first == correct["fused"] else "describe_then_answer"])
    assert chosen["mode"] == served
    assert set(chosen["versus_plain"]) == {"fused", "describe_then_answer"}  # plain is not compared with itself
    assert chosen["accuracy"] == {"plain": 0.5, "fused": 1.0, "describe_then_answer": 0.0}
    assert chosen["rule"] == (
        "plain unless a mode beats it on the calibration split with the paired bootstrap 95 % CI above 0 "
        "and McNemar p < 0.05; then the most accurate such mode"
    )


@pytest.mark.parametrize(("describe", "fused", "served"), [(0.9, 0.8, "describe_then_answer"), (0.8, 0.9, "fused"), (0.8, 0.8, "fused")])
def test_among_modes_beyond_chance_the_most_accurate_is_served_ties_to_the_earlier_mode(describe, fused, served):
    from vift.fusion.modes import choose_mode

    n = 10
    correct = {
        "plain": [False] * n,
        "fused": [i < fused * n for i in range(n)],
        "describe_then_answer": [i < describe * n for i in range(n)],
    }
    assert choose_mode(correct, lambda first, second: _comparison(0.1, 0.001))["mode"] == served
    assert choose_mode({"plain": [True], "fused": [True]}, lambda a, b: _comparison(-1, 1))["accuracy"] == {"plain": 1.0, "fused": 1.0}


def test_gate_decisions_say_why_in_words():
    assert gate.decide(0.5, None, 0.0, None).reason == "no champion yet: the first gated version becomes champion"
    kept = gate.decide(0.9, None, 0.0, "3")
    assert kept.promote is False and kept.reason == (
        "champion version 3 has no accuracy tag for this gate metric, so it cannot be compared; champion kept "
        "(move the alias by hand if intended)"
    )
    assert gate.decide(0.61, 0.5, 0.1, "1").reason == "0.6100 beats champion 0.5000 by more than the margin 0.1"
    lost = gate.decide(0.6, 0.5, 0.1, "1")
    assert lost.promote is False and lost.reason == "0.6000 does not beat champion 0.5000 by more than the margin 0.1"


@pytest.mark.parametrize(("low", "p", "passes"), [(0.01, 0.01, True), (0.0, 0.01, False), (0.01, 0.05, False)])
def test_the_evidence_gate_needs_the_interval_strictly_above_0_and_p_strictly_below_005(low, p, passes):
    evidence = {"question_only": _comparison(low, p), "majority_per_type": _comparison(0.2, 0.001)}
    failure = gate.evidence_failure(evidence, "vift_fused")
    assert (failure is None) is passes
    if not passes:
        assert failure.promote is False


def test_the_evidence_gate_reports_every_control_it_lost_to_in_one_reason():
    missing_first = {"majority_per_type": {"difference": -0.1, "ci95": [-0.2, 0.05]}}  # no McNemar p recorded: not evidence
    failure = gate.evidence_failure(missing_first, "describe_then_answer")
    assert failure.promote is False
    assert failure.reason == (
        "kept as candidate: does not beat its controls (no comparison with question_only; describe_then_answer - "
        "majority_per_type = -0.1000, 95 % CI [-0.2000, +0.0500], McNemar p = 1: not above 0 beyond chance)"
    )
    absent = gate.evidence_failure(None, "vift_fused")
    assert absent.promote is False


# --- the ablation's summary, controls and helpers: gaps the mutation run found -------------------


def _row(correct: list[bool]) -> list[dict]:
    return [{"id": str(i), "correct": c, "type": "count"} for i, c in enumerate(correct)]


def test_summarise_reports_rows_paired_comparisons_evidence_and_the_rule_with_one_seed():
    rng = np.random.default_rng(3)
    correct = {name: list(rng.random(40) < p) for name, p in (("vift_fused", 0.7), ("vift_unfused", 0.3), ("question_only", 0.4),
               ("fused_wrong_image", 0.35), ("majority_per_type", 0.25), ("describe_then_answer", 0.8))}  # fmt: skip
    metrics = summarise({name: _row(c) for name, c in correct.items()}, 200, 11)
    assert metrics["rows"]["vift_fused"]["accuracy"] == pytest.approx(sum(correct["vift_fused"]) / 40)
    assert metrics["paired"]["vift_fused_vs_question_only"] == paired_comparison(correct["vift_fused"], correct["question_only"], 200, 11)
    assert set(metrics["evidence"]) == {"vift_fused", "vift_unfused", "describe_then_answer"}
    assert metrics["evidence"]["describe_then_answer"]["majority_per_type"] == paired_comparison(
        correct["describe_then_answer"], correct["majority_per_type"], 200, 11
    )
    assert set(metrics["verdict"]["beats"]) == {"vift_unfused", "question_only", "fused_wrong_image"}
    assert metrics["verdict"]["rule"] == (
        "vift_fused must beat vift_unfused, question_only, fused_wrong_image and fused_blank_image (those present) "
        "with the paired bootstrap 95 % CI of the accuracy difference above 0"
    )
    with pytest.raises(ValueError, match="^row question_only does not cover the same items as vift_fused$"):
        summarise({"vift_fused": _row([True, False]), "question_only": _row([True])}, 10, 0)


def test_majority_per_type_guesses_the_commonest_answer_also_for_untyped_records():
    from vift.eval.ablation import majority_rows

    records = [VQARecord(id=str(i), image="a.png", question="?", answer=a, type=t)
               for i, (a, t) in enumerate([("2", None), ("2", None), ("3", None), ("yes", "compare"), ("no", "compare"), ("no", "compare")])]  # fmt: skip
    assert [r["prediction"] for r in majority_rows(records)] == ["2", "2", "2", "no", "no", "no"]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7])
def test_wrong_image_order_is_a_derangement_for_every_size_and_identity_only_below_two(n):
    from vift.eval.ablation import wrong_image_order

    order = wrong_image_order(n, seed=4)
    assert sorted(order) == list(range(n))
    if n >= 2:
        assert all(order[i] != i for i in range(n))
    else:
        assert order == list(range(n))


def test_on_a_real_model_where_fusion_cannot_help_calibration_refuses_the_noise_winner(wide_model, ci_data):
    """Gold answers drawn at random from what the configurations themselves answer: no
    configuration can be better than another except by chance. Without the beyond-chance check a
    fused configuration wins the search; with it, no fusion is kept."""
    import random

    from vift.fusion.calibrate import _grid
    from vift.fusion.method import fused_generate

    model, processor = wide_model
    records = list(Manifest(ci_data / "calibration.jsonl", "vqa"))
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    questions = [r.question for r in records]
    ranges = [(0, 4), (2, 4)]
    specs = [NEUTRAL] + [spec for r in ranges for spec in _grid("additive", "question", r, [0.0, 0.5, 1.0])]
    answers = {
        s: fused_generate(model, processor, images, questions, None if s.is_neutral else s, batch_size=16, max_new_tokens=1) for s in specs
    }
    rng = random.Random(0)
    gold = [rng.choice(sorted({answers[s][i] for s in specs})) for i in range(len(records))]
    assert sum(len({answers[s][i] for s in specs}) > 1 for i in range(len(records))) > len(records) // 2  # fusion changes answers
    calibrator = Calibrator(model, processor, [r.model_copy(update={"answer": g}) for r, g in zip(records, gold)], images, 16, 1)
    params = CalibrationParams(modes=["additive"], weights=[0.0, 0.5, 1.0], layer_ranges=ranges, budget=10)
    unchecked = search(calibrator, params.model_copy(update={"significance": 1.0}))
    assert unchecked["calibration"]["chosen_is_neutral"] is False  # noise wins without the check
    assert unchecked["calibration"]["best_accuracy"] > unchecked["calibration"]["unfused_accuracy"]
    checked = search(calibrator, params)
    assert checked["calibration"]["chosen_is_neutral"] is True and checked["calibration"]["best_versus_neutral"]["kept_neutral"] is True
    assert checked["fusion"]["a"] == checked["fusion"]["b"] == 0.0
