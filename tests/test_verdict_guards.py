"""Guards on the verdict-critical code: each test pins one behaviour that a one-line bug would break.

Statistics (Wilson interval, paired bootstrap, the verdict rule), answer scoring, calibration (the
search, its tie-break, the ``Calibrator`` and its reuse of captured states), the fusion formula and
its hooks, the fused positions, the entry points that run the fusion and the served mode
(``fused_generate``, ``answer``), reading ``models/fusion.json``, the image-root check, and the
ablation (its controls, each row's call, the perception check). Stubs and exact values where
possible; the tiny LLaVA where the behaviour lives in a real forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats as scipy_stats

from tests.conftest import widened
from vift.config.schema import CalibrationParams
from vift.data.manifests import Manifest, VQARecord, resolve_image
from vift.errors import UserError
from vift.eval.ablation import run_ablation, summarise
from vift.fusion.calibrate import Calibrator, search
from vift.fusion.families import adapter_for
from vift.fusion.hooks import PrefillEditor, capture_layer_inputs
from vift.fusion.method import NEUTRAL, FusionSpec, align_right, capture_states, fused_generate, fused_positions, steered_generate
from vift.fusion.modes import FusionFile, Prompts, answer
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


def test_wilson_interval_at_none_or_all_correct_ends_exactly_at_0_or_1():
    # Found by a run whose unfused row scored 0 of 1000: the computed lower bound was 1e-17 above
    # the accuracy, and the accuracy plot refused the negative error bar.
    for n in range(1, 1500):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        assert 0.0 < wilson_interval(0, n)[1] and wilson_interval(n, n)[0] < 1.0
    expected = scipy_stats.binomtest(0, 1000).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(0, 1000)[1] == pytest.approx(expected.high, abs=1e-9)


def test_the_accuracy_plot_takes_rows_at_0_and_1_and_intervals_past_their_estimate(tmp_path):
    from vift.eval.plots import accuracy_bars

    rows = {
        "none": {"accuracy": 0.0, "ci95": list(wilson_interval(0, 1000))},
        "all": {"accuracy": 1.0, "ci95": list(wilson_interval(1000, 1000))},
        "rounded": {"accuracy": 0.0, "ci95": [1e-17, 0.004]},  # an interval rounded past 0
    }
    accuracy_bars(rows, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 0


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


# --- fused positions and the layer range ------------------------------------------------------


def _positions(image_rows: list[list[int]], text_rows: list[list[int]], positions: str) -> torch.Tensor:
    """``fused_positions`` on left-padded token rows; 0 is padding."""
    image_ids, text_ids = torch.tensor(image_rows), torch.tensor(text_rows)
    return fused_positions(image_ids, (image_ids != 0).long(), text_ids, (text_ids != 0).long(), positions)


def test_text_prompt_positions_may_cover_the_whole_image_prompt_and_are_bounded_per_sample():
    assert _positions([[5, 6, 7]], [[8, 6, 7]], "text_prompt").tolist() == [[True, True, True]]
    # Sample 0's text prompt (3 tokens) is longer than its image prompt (2); the batch has 6 image tokens.
    with pytest.raises(ValueError, match="^text-only prompt longer than the image prompt: text_prompt positions undefined$"):
        _positions([[0, 0, 5, 6], [1, 2, 3, 4]], [[7, 5, 6], [0, 0, 4]], "text_prompt")


def test_question_positions_need_one_shared_final_token_and_one_is_enough():
    assert _positions([[4, 5, 9]], [[6, 7, 9]], "question").tolist() == [[False, False, True]]
    with pytest.raises(ValueError, match="^a text-only prompt shares no final tokens with its image prompt$"):
        _positions([[4, 5, 9], [4, 5, 9]], [[6, 7, 9], [6, 7, 8]], "question")


def test_fused_positions_are_built_on_the_inputs_device_not_the_default_one():
    """On a GPU the prompts live on the model's device, and the position index must follow them.
    Here the default device is "meta" (no data): an index built there cannot be compared or read."""
    image_ids, text_ids = torch.tensor([[1, 2, 5, 6, 7]]), torch.tensor([[3, 5, 6, 7]])
    image_mask, text_mask = torch.ones_like(image_ids), torch.ones_like(text_ids)
    with torch.device("meta"):
        mask = fused_positions(image_ids, image_mask, text_ids, text_mask, "question")
    assert mask.device == image_ids.device and mask.tolist() == [[False, False, True, True, True]]


def test_an_empty_layer_range_is_refused():
    assert FusionSpec(layer_start=3).layer_range(4) == (3, 4)
    with pytest.raises(ValueError, match=r"^fusion layers \[2, 2\) outside the model's 4 decoder layers$"):
        FusionSpec(layer_start=2, layer_end=2).layer_range(4)


# --- fused_generate: batching, defaults, which path runs --------------------------------------


class _StubLVLM:
    """Model, processor and family adapter in one, recording what ``fused_generate`` asks of them.

    Every prompt is three tokens; generating appends token 7 (" seven ") and the end-of-sequence
    token 2, which decoding drops only with ``skip_special_tokens``."""

    device = "the-models-device"

    def __init__(self):
        self.inputs: list[tuple] = []  # (kind, images, questions, device) per adapter call
        self.generated: list[tuple] = []  # (batch size, generate kwargs) per plain generate
        self.steered: list[tuple] = []  # (spec, text inputs, generate kwargs) per steered generate

    @staticmethod
    def prompt(questions) -> dict:
        ids = torch.ones(len(questions), 3, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @staticmethod
    def answer(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([input_ids, torch.tensor([[7, 2]] * len(input_ids))], dim=1)

    def image_inputs(self, processor, images, questions, device) -> dict:
        self.inputs.append(("image", list(images), list(questions), device))
        return self.prompt(questions)

    def text_inputs(self, processor, questions, device) -> dict:
        self.inputs.append(("text", None, list(questions), device))
        return self.prompt(questions)

    def generate(self, input_ids, attention_mask, **kwargs):
        self.generated.append((len(input_ids), kwargs))
        return self.answer(input_ids)

    def batch_decode(self, tokens, skip_special_tokens=False) -> list[str]:
        words = {1: "<prompt>", 7: " seven ", 2: "" if skip_special_tokens else "</s>"}
        return ["".join(words[t] for t in row.tolist()) for row in tokens]


@pytest.fixture
def stub(monkeypatch) -> _StubLVLM:
    stub = _StubLVLM()
    monkeypatch.setattr("vift.fusion.families.adapter_for", lambda model: stub)

    def steered(model, image_inputs, text_inputs, spec, **kwargs):
        stub.steered.append((spec, text_inputs, kwargs))
        return stub.answer(image_inputs["input_ids"])

    monkeypatch.setattr("vift.fusion.method.steered_generate", steered)
    return stub


def test_fused_generate_batches_by_16_greedily_on_the_models_device_and_returns_the_decoded_new_tokens(stub):
    questions = [f"q{i}" for i in range(17)]
    assert fused_generate(stub, stub, list(range(17)), questions, None, max_new_tokens=2) == ["seven"] * 17
    greedy = {"do_sample": False, "max_new_tokens": 2}
    assert stub.generated == [(16, greedy), (1, greedy)]
    assert stub.inputs == [
        ("image", list(range(16)), questions[:16], "the-models-device"),
        ("image", [16], questions[16:], "the-models-device"),
    ]
    fused_generate(stub, stub, [0], ["q"], None, do_sample=True, top_k=3)  # a caller's choice is kept
    assert stub.generated[-1] == (1, {"do_sample": True, "top_k": 3})


def test_fused_generate_without_images_asks_the_text_prompts_and_refuses_a_real_fusion(stub):
    assert fused_generate(stub, stub, None, ["q"], FusionSpec(a=0.0, b=0.0), max_new_tokens=1) == ["seven"]
    assert stub.inputs == [("text", None, ["q"], "the-models-device")] and stub.steered == []
    with pytest.raises(ValueError, match=r"^fusion needs images: it fuses text-only states into the image\+question pass$"):
        fused_generate(stub, stub, None, ["q"], FusionSpec(a=0.5))


def test_fused_generate_runs_a_neutral_fusion_as_the_plain_model_and_a_real_one_steered(stub):
    fused_generate(stub, stub, ["image"], ["q"], FusionSpec(mode="replace", w_vis=1.0, w_text=0.0), max_new_tokens=1)
    assert stub.generated == [(1, {"do_sample": False, "max_new_tokens": 1})] and stub.steered == []
    spec = FusionSpec(a=0.5)
    assert fused_generate(stub, stub, ["image"], ["q"], spec, max_new_tokens=1) == ["seven"]
    ((used, text_inputs, kwargs),) = stub.steered
    assert used is spec and kwargs == {"do_sample": False, "max_new_tokens": 1} and text_inputs["input_ids"].shape == (1, 3)
    assert stub.inputs[1:] == [("image", ["image"], ["q"], "the-models-device"), ("text", None, ["q"], "the-models-device")]


# --- answer: each mode's calls ----------------------------------------------------------------


@pytest.fixture
def generate_calls(monkeypatch) -> list[dict]:
    """``fused_generate`` as ``vift.fusion.modes`` calls it, recorded; call k answers question i with "k:i"."""
    calls: list[dict] = []

    def spy(model, processor, images, questions, fusion, **kwargs):
        calls.append({"model": model, "processor": processor, "images": images, "questions": list(questions), "fusion": fusion, **kwargs})
        return [f"{len(calls)}:{i}" for i in range(len(questions))]

    monkeypatch.setattr("vift.fusion.modes.fused_generate", spy)
    return calls


def test_describe_then_answer_captions_each_image_then_asks_over_the_caption_with_the_served_prompts(generate_calls):
    prompts = Prompts(describe="Caption it.", over_description="[{description}] {question}")
    got = answer("model", "processor", ["image0", "image1"], ["q0", "q1"], "describe_then_answer", FusionSpec(a=0.5), 3, 5, prompts)
    assert got == ["2:0", "2:1"]
    common = {"model": "model", "processor": "processor", "fusion": None, "batch_size": 3}
    assert generate_calls == [
        {**common, "images": ["image0", "image1"], "questions": ["Caption it."] * 2, "max_new_tokens": 64},
        {**common, "images": None, "questions": ["[1:0] q0", "[1:1] q1"], "max_new_tokens": 5},
    ]


@pytest.mark.parametrize("mode", ["fused", "plain"])
def test_answer_in_fused_or_plain_mode_is_one_call_with_the_fusion_only_when_fused(generate_calls, mode):
    spec = FusionSpec(a=0.5)
    assert answer("model", "processor", ["image0"], ["q0"], mode, spec, batch_size=3, max_new_tokens=5) == ["1:0"]
    fusion = spec if mode == "fused" else None
    assert generate_calls == [
        {
            "model": "model",
            "processor": "processor",
            "images": ["image0"],
            "questions": ["q0"],
            "fusion": fusion,
            "batch_size": 3,
            "max_new_tokens": 5,
        }
    ]


def test_an_unknown_mode_is_refused_with_the_known_ones(generate_calls):
    with pytest.raises(ValueError, match=r"^unknown inference mode 'sketch'; one of plain, fused, describe_then_answer$"):
        answer("model", "processor", ["image0"], ["q0"], "sketch", None, batch_size=1, max_new_tokens=1)
    assert generate_calls == []


# --- models/fusion.json -----------------------------------------------------------------------


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "{path}: not found; the calibrate stage writes models/fusion.json"),
        ('{\n  "fusion": {,}\n}', "{path}:2: malformed JSON: Expecting property name enclosed in double quotes"),
        (b'{"fusion": {"a": "\xff"}}', "{path}: unreadable ('utf-8' codec can't decode byte 0xff in position 18: invalid start byte)"),
        ([0.5], "{path}: expected a JSON object with a 'fusion' object"),
        ({"fusion": [0.5]}, "{path}: expected a JSON object with a 'fusion' object"),
        (
            {"fusion": {"beta": 2, "alpha": 1}},
            "{path}: unknown fusion field(s) alpha, beta; known: a, b, layer_end, layer_start, mode, positions, preserve_norm, steer_prefix, task_vector, w_text, w_vis",
        ),
        (
            {"fusion": {"a": "lots", "mode": "sideways"}},
            "{path}: invalid fusion: mode: Input should be 'additive', 'replace' or 'task_vector'; a: Input should be a valid number, unable to parse "
            "string as a number",
        ),
        (
            {"fusion": {"layer_start": 3, "layer_end": 2}},
            "{path}: invalid fusion: fusion: Value error, layer_end must be greater than layer_start",
        ),
        (
            {"fusion": {"a": 1.0}, "serving": {"prompts": {"style": "terse"}}},
            "{path}: serving.prompts: Prompts.__init__() got an unexpected keyword argument 'style'",
        ),
    ],
    ids=[
        "missing",
        "malformed",
        "not-utf8",
        "not-an-object",
        "fusion-not-an-object",
        "unknown-fields",
        "invalid-values",
        "unordered-layers",
        "unknown-prompt-field",
    ],  # fmt: skip
)
def test_every_problem_in_fusion_json_is_an_input_error_naming_the_file(tmp_path, content, message):
    path = _write(tmp_path / "fusion.json", content)
    with pytest.raises(UserError) as raised:
        FusionFile.read(path)
    assert str(raised.value) == message.format(path=path) and raised.value.exit_code == 2


def test_fusion_json_gives_the_spec_the_served_mode_and_prompts_and_keeps_the_whole_content(tmp_path):
    spec = {"mode": "replace", "positions": "text_prompt", "w_vis": 0.5, "w_text": 0.25, "layer_start": 1, "layer_end": 3}
    prompts = {"describe": "Caption it.", "over_description": "[{description}] {question}"}
    content = {"fusion": spec, "serving": {"mode": "describe_then_answer", "prompts": prompts}, "calibration": {"evaluated": 9}}
    read = FusionFile.read(_write(tmp_path / "full.json", content))
    assert (read.spec, read.mode, read.prompts) == (FusionSpec(**spec), "describe_then_answer", Prompts(**prompts))
    assert read.content == content and read.prompts.to_dict() == prompts
    # A bare spec object (`vift eval --fusion` accepts one): the default mode and prompts.
    bare = FusionFile.read(_write(tmp_path / "bare.json", {"a": 0.5, "layer_start": 1}))
    assert (bare.spec, bare.mode, bare.prompts, bare.content) == (
        FusionSpec(a=0.5, layer_start=1),
        "fused",
        Prompts(),
        {"a": 0.5, "layer_start": 1},
    )
    # A serving entry that is no object, or names no known mode: the defaults.
    for serving in ("describe_then_answer", {"mode": "sketch"}, None):
        odd = FusionFile.read(_write(tmp_path / "odd.json", {"fusion": {"a": 0.5}, "serving": serving}))
        assert (odd.spec, odd.mode, odd.prompts) == (FusionSpec(a=0.5), "fused", Prompts()), serving


# --- the ablation's rows and the perception check: each call's arguments ---------------------


@pytest.fixture
def ablation_calls(monkeypatch) -> list[dict]:
    """``predict`` and ``describe_then_answer`` as ``run_ablation`` calls them, recorded. A predicted
    row says which model answered; describe-then-answer answers "a<i>" over caption "c<i>"."""
    calls: list[dict] = []

    def predict(model, processor, records, images, fusion, batch_size, max_new_tokens, questions=None):
        calls.append({"row": "predict", "model": model, "processor": processor, "records": records, "images": images,
                      "fusion": fusion, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "questions": questions})  # fmt: skip
        return [{"id": r.id, "prediction": model, "correct": False} for r in records]

    def describe(model, processor, images, questions, batch_size, max_new_tokens, prompts, caption_tokens):
        calls.append({"row": "describe", "model": model, "processor": processor, "images": images, "questions": questions,
                      "batch_size": batch_size, "max_new_tokens": max_new_tokens, "prompts": prompts, "caption_tokens": caption_tokens})  # fmt: skip
        return [f"a{i}" for i in range(len(questions))], [f"c{i}" for i in range(len(questions))]

    monkeypatch.setattr("vift.eval.ablation.predict", predict)
    monkeypatch.setattr("vift.eval.ablation.describe_then_answer", describe)
    return calls


def _ablation_records(references: list[str | None]) -> list[VQARecord]:
    return [
        VQARecord(id=str(i), question=f"q{i}", answer="1", type="count", **({"reference": ref} if ref else {}))
        for i, ref in enumerate(references)
    ]


def test_ablation_calls_each_row_with_its_model_batch_tokens_prompts_and_reports_each_step(ablation_calls):
    from vift.eval.ablation import wrong_image_order

    records = _ablation_records([f"scene {i}" for i in range(6)])  # 6 items: 120 possible wrong-image orders
    images = [Image.new("RGB", (i + 2, 3), "white") for i in range(6)]
    models = {name: (lambda name=name: (f"{name}-model", f"{name}-processor")) for name in ("caption", "vift", "vit")}
    fusion, prompts, steps = FusionSpec(a=0.5), Prompts(describe="D", over_description="<{description}> {question}"), []
    rows = run_ablation(models, records, images, fusion, 4, 3, seed=7, caption_tokens=9, progress=steps.append, prompts=prompts)
    assert steps == ["caption_only", "vift_unfused", "vift_fused", "question_only", "fused_wrong_image", "fused_blank_image",
                     "describe_then_answer", "oracle_description", "vit_baseline"]  # fmt: skip
    assert list(rows) == [*steps, "majority_per_type"]
    predicted = [c for c in ablation_calls if c["row"] == "predict"]
    assert all(c["records"] == records and (c["batch_size"], c["max_new_tokens"]) == (4, 3) for c in predicted)
    assert [(c["model"], c["processor"], c["fusion"], c["questions"]) for c in predicted] == [
        ("caption-model", "caption-processor", None, None),
        ("vift-model", "vift-processor", None, None),
        ("vift-model", "vift-processor", fusion, None),
        ("vift-model", "vift-processor", None, None),
        ("vift-model", "vift-processor", fusion, None),
        ("vift-model", "vift-processor", fusion, None),
        ("vift-model", "vift-processor", None, [f"<scene {i}> q{i}" for i in range(6)]),
        ("vit-model", "vit-processor", None, None),
    ]
    given = [c["images"] for c in predicted]
    assert given[0] == given[1] == given[2] == given[7] == images and given[3] is None and given[6] is None
    assert given[4] == [images[i] for i in wrong_image_order(6, 7)]  # the given seed
    assert [(b.mode, b.size, b.getpixel((0, 0))) for b in given[5]] == [("RGB", (i + 2, 3), (0, 0, 0)) for i in range(6)]
    (described,) = [c for c in ablation_calls if c["row"] == "describe"]
    assert described == {"row": "describe", "model": "vift-model", "processor": "vift-processor", "images": images,
                         "questions": [f"q{i}" for i in range(6)], "batch_size": 4, "max_new_tokens": 3, "prompts": prompts, "caption_tokens": 9}  # fmt: skip
    assert [(r["id"], r["prediction"], r["caption"]) for r in rows["describe_then_answer"]] == [
        (str(i), f"a{i}", f"c{i}") for i in range(6)
    ]
    assert [r["prediction"] for r in rows["majority_per_type"]] == ["1"] * 6


def test_ablation_without_caption_vit_or_every_reference_skips_those_rows_and_defaults_caption_tokens_and_prompts(ablation_calls):
    records = _ablation_records(["one circle", None])
    images = [Image.new("RGB", (2, 2), "white")] * 2
    rows = run_ablation({"vift": lambda: ("m", "p")}, records, images, FusionSpec(a=0.5), 2, 5, seed=0)
    assert list(rows) == ["vift_unfused", "vift_fused", "question_only", "fused_wrong_image", "fused_blank_image",
                          "describe_then_answer", "majority_per_type"]  # fmt: skip
    (described,) = [c for c in ablation_calls if c["row"] == "describe"]
    assert (described["prompts"], described["caption_tokens"]) == (Prompts(), 64)


def test_perception_captions_with_the_given_prompt_and_scores_each_model_against_the_references(monkeypatch):
    from vift.eval.ablation import perception

    calls = []

    def caption(model, processor, images, questions, fusion, batch_size, max_new_tokens):
        calls.append((model, processor, images, questions, fusion, batch_size, max_new_tokens))
        right = {"good": 3, "half": 1}[model]  # the first `right` captions state the reference
        return [f"red circle, blue square.{i}" if i >= right else "blue square, red circle." for i in range(len(images))]

    monkeypatch.setattr("vift.fusion.method.fused_generate", caption)
    records = _ablation_records(["red circle, blue square"] * 3)
    images = ["i0", "i1", "i2"]
    models = {"caption": lambda: ("good", "pg"), "vift": lambda: ("half", "ph")}
    out = perception(models, records, images, "Describe.", 2)
    assert calls == [("good", "pg", images, ["Describe."] * 3, None, 2, 64), ("half", "ph", images, ["Describe."] * 3, None, 2, 64)]
    assert out["caption"] == {
        "accuracy": 1.0,
        "ci95": list(wilson_interval(3, 3)),
        "n": 3,
        "phrase_f1": 1.0,
        "examples": [{"reference": "red circle, blue square", "caption": "blue square, red circle."}] * 2,
    }
    half = out["vift"]
    assert (half["accuracy"], half["ci95"], half["n"]) == (pytest.approx(1 / 3), list(wilson_interval(1, 3)), 3)
    assert half["phrase_f1"] == pytest.approx(4 / 6)  # "blue square.1" is no reference phrase: 4 of 6 phrases, each side
    assert half["examples"][1] == {"reference": "red circle, blue square", "caption": "red circle, blue square.1"}
    perception(models, records[:1], images[:1], "Describe.", 2, caption_tokens=5)
    assert calls[-1][-1] == 5
    # No references (or not all of them), or no records: nothing to report, no model loaded.
    assert perception({}, [], [], "Describe.", 2) is None
    assert perception(models, _ablation_records(["red circle", None]), images[:2], "Describe.", 2) is None
    assert len(calls) == 4


# --- calibration: the scorer, the search space, the Calibrator on stubs -----------------------


def test_gold_answer_scorer_forces_each_gold_token_then_end_of_turn_and_sums_their_log_probabilities():
    from vift.fusion.calibrate import GoldAnswerScorer

    gold = torch.tensor([[1, 2, -1], [0, -1, -1]])  # -1: after the answer's end
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    scorer = GoldAnswerScorer(gold, eos_token_id=3)
    forced = [scorer(torch.zeros(2, 1, dtype=torch.long), scores) for _ in range(4)]  # one step past the gold's width
    assert scorer.step == 4
    for step, expected in enumerate([[1, 0], [2, 3], [3, 3], [3, 3]]):
        assert forced[step].argmax(dim=1).tolist() == expected
        assert (forced[step] == 0).sum() == 2 and torch.isinf(forced[step]).sum() == 6 and (forced[step] < 0).sum() == 6
    log_p = torch.log_softmax(scores.double(), dim=1)
    assert scorer.log_likelihood.dtype == torch.float64
    assert scorer.log_likelihood.tolist() == pytest.approx([float(log_p[0, 1] + log_p[0, 2]), float(log_p[1, 0])], abs=1e-12)
    empty = GoldAnswerScorer(torch.tensor([[3], [3]]), eos_token_id=3)  # empty answers: only the end-of-turn token
    for _ in range(2):
        assert empty(torch.zeros(2, 1, dtype=torch.long), scores).argmax(dim=1).tolist() == [3, 3]


def test_candidate_layer_ranges_are_the_given_ones_checked_or_a_spread_over_the_depth():
    from vift.fusion.calibrate import candidate_ranges

    assert candidate_ranges(4, [[0, 4], [3, 4]]) == [(0, 4), (3, 4)]
    for bad in ([-1, 2], [2, 2], [3, 5]):
        with pytest.raises(ValueError, match=rf"^fusion.calibrate.layer_ranges: \[{bad[0]}, {bad[1]}\) outside 0..4$"):
            candidate_ranges(4, [(0, 4), bad])
    assert candidate_ranges(4, None) == candidate_ranges(4, []) == [(0, 4), (2, 4), (1, 4), (0, 2), (1, 3)]
    assert candidate_ranges(28, None) == [(0, 28), (14, 28), (7, 28), (0, 14), (7, 21)]
    assert candidate_ranges(3, None) == [(0, 3), (1, 3), (0, 1), (0, 2)]
    assert candidate_ranges(2, None) == [(0, 2), (1, 2), (0, 1)]
    assert candidate_ranges(1, None) == [(0, 1)]


def test_the_weight_grid_and_the_neighbours_of_a_configuration():
    from vift.fusion.calibrate import _grid, _neighbours

    assert _grid("replace", "text_prompt", (1, 3), [0.0, 0.5]) == [
        FusionSpec(mode="replace", positions="text_prompt", w_vis=w_vis, w_text=w_text, layer_start=1, layer_end=3)
        for w_vis, w_text in ((0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5))
    ]
    spec = FusionSpec(a=0.5, b=0.0, layer_start=1, layer_end=3)
    weights = [1.0, 0.0, 0.5, 0.25, 0.00025, 0.5]  # unsorted, with a repeat; 0.00025 and its midpoint get rounded
    assert _neighbours(spec, weights, [(0, 4)], 4) == [
        spec.with_weights(a=0.25), spec.with_weights(a=0.375), spec.with_weights(a=1.0), spec.with_weights(a=0.75),
        spec.with_weights(b=0.0003), spec.with_weights(b=0.0001),  # rounded to 4 places
        spec.with_weights(layer_start=0), spec.with_weights(layer_start=2), spec.with_weights(layer_end=2), spec.with_weights(layer_end=4),
    ]  # fmt: skip
    whole = FusionSpec(mode="replace", w_vis=1.0, w_text=1.0)  # layers [0, 4): only the inner shifts fit
    assert _neighbours(whole, [0.0, 1.0], [(0, 4)], 4) == [
        whole.with_weights(w_vis=0.0), whole.with_weights(w_vis=0.5), whole.with_weights(w_text=0.0), whole.with_weights(w_text=0.5),
        whole.with_weights(layer_start=1, layer_end=4), whole.with_weights(layer_start=0, layer_end=3),
    ]  # fmt: skip
    one_layer = FusionSpec(a=1.0, layer_start=1, layer_end=2)  # shifts that would empty the range are left out
    assert _neighbours(one_layer, [1.0], [(1, 2)], 4)[-2:] == [one_layer.with_weights(layer_start=0), one_layer.with_weights(layer_end=3)]


class _CalibrationLVLM:
    """Model, tokenizer and family adapter in one, for ``Calibrator``. An image prompt is 3 tokens
    ending with the question's number, a text prompt 1 token. The plain model answers that number,
    a steered one 7; token 9 ends a turn. Under teacher forcing every step scores token t as t."""

    device = "cpu"
    dtype = torch.float16
    eos_token_id = 9

    def __init__(self, hidden_size: int = 4):
        self.config = type("Config", (), {"get_text_config": lambda self: type("Text", (), {"hidden_size": hidden_size})()})()
        self.inputs: list[tuple] = []  # (kind, images, questions, device) per adapter call
        self.generated: list[dict] = []  # kwargs per generate

    def image_inputs(self, processor, images, questions, device) -> dict:
        self.inputs.append(("image", list(images), list(questions), device))
        return {"input_ids": torch.tensor([[5, 5, int(q[1:])] for q in questions])}

    def text_inputs(self, processor, questions, device) -> dict:
        self.inputs.append(("text", None, list(questions), device))
        return {"input_ids": torch.full((len(questions), 1), 6)}

    def generate(self, input_ids, steered=False, logits_processor=None, **kwargs):
        self.generated.append({"steered": steered, "inference_mode": torch.is_inference_mode_enabled(), **kwargs})
        if logits_processor is None:
            answer = torch.full_like(input_ids[:, -1:], 7) if steered else input_ids[:, -1:]
            return torch.cat([input_ids, answer, torch.full_like(answer, 9)], dim=1)
        for _ in range(kwargs["max_new_tokens"]):
            scores = logits_processor(input_ids, torch.arange(10.0).repeat(len(input_ids), 1))
            input_ids = torch.cat([input_ids, scores.argmax(dim=1, keepdim=True)], dim=1)
        return input_ids

    def __call__(self, text, add_special_tokens=True) -> dict:  # the tokenizer: one token per digit
        assert add_special_tokens is False
        return {"input_ids": [int(c) for c in text]}

    def batch_decode(self, tokens, skip_special_tokens=False) -> list[str]:
        return ["".join("" if t == 9 and skip_special_tokens else str(t) for t in row.tolist()) for row in tokens]


@pytest.fixture
def calibration_lvlm(monkeypatch) -> tuple[_CalibrationLVLM, list]:
    """The stub, with 4 decoder layers; captures and steered generations are recorded."""
    stub, calls = _CalibrationLVLM(), []
    monkeypatch.setattr("vift.fusion.calibrate.decoder_layers", lambda model: [None] * 4)
    monkeypatch.setattr("vift.fusion.calibrate.adapter_for", lambda model: stub)

    def capture(model, image_inputs, text_inputs, start, end):
        calls.append(("capture", model, image_inputs["input_ids"][:, -1].tolist(), text_inputs["input_ids"].shape, start, end))
        return [f"text{layer}" for layer in range(start, end)], [f"image{layer}" for layer in range(start, end)]

    def steered(model, image_inputs, text_inputs, spec, states, **kwargs):
        calls.append(("steered", model, text_inputs["input_ids"].shape, spec, states))
        return model.generate(**image_inputs, steered=True, **kwargs)

    monkeypatch.setattr("vift.fusion.calibrate.capture_states", capture)
    monkeypatch.setattr("vift.fusion.calibrate.steered_generate", steered)
    return stub, calls


def _calibration_records() -> list[VQARecord]:
    return [VQARecord(id=str(i), question=f"q{i}", answer=a) for i, a in enumerate(["0", "17", "2", "7", "4"])]


def test_capture_bytes_is_one_hidden_vector_per_layer_and_token_of_both_prompts(calibration_lvlm):
    from vift.fusion.calibrate import capture_bytes

    stub, _ = calibration_lvlm
    image_inputs, text_inputs = stub.image_inputs(None, [0, 1], ["q0", "q1"], "cpu"), stub.text_inputs(None, ["q0", "q1"], "cpu")
    assert capture_bytes(stub, image_inputs, text_inputs, 3) == 3 * (6 + 2) * 4 * 2  # layers x tokens x hidden x float16


def test_calibrator_batches_the_records_and_caches_captures_up_to_the_cap_inclusive(calibration_lvlm):
    stub, calls = calibration_lvlm
    records, images = _calibration_records(), [f"image{i}" for i in range(5)]
    per_pair = 4 * 8 * 4 * 2  # 4 layers, 2 x (3 + 1) tokens, hidden 4, float16
    calibrator = Calibrator(stub, stub, records, images, batch_size=2, max_new_tokens=3, max_cache_bytes=2 * per_pair)
    assert calibrator.num_layers == 4 and calibrator.model is stub and calibrator.processor is stub and calibrator.max_new_tokens == 3
    assert [b.records for b in calibrator.batches] == [records[:2], records[2:4], records[4:]]
    assert stub.inputs == [
        (kind, images[i : i + 2] if kind == "image" else None, [f"q{j}" for j in range(i, min(i + 2, 5))], "cpu")
        for i in (0, 2, 4)
        for kind in ("image", "text")
    ]
    assert calls == [("capture", stub, [0, 1], (2, 1), 0, 4), ("capture", stub, [2, 3], (2, 1), 0, 4)]  # the third: over the cap
    assert calibrator.batches[0].states == ([f"text{i}" for i in range(4)], [f"image{i}" for i in range(4)])
    assert calibrator.batches[2].states is None
    assert [b.image_inputs["input_ids"][:, -1].tolist() for b in calibrator.batches] == [[0, 1], [2, 3], [4]]
    assert [b.text_inputs["input_ids"].shape for b in calibrator.batches] == [(2, 1), (2, 1), (1, 1)]


@pytest.mark.parametrize(("hidden_size", "cached"), [(2**26, True), (2**26 + 1, False)])
def test_the_default_capture_cache_holds_2_gib(monkeypatch, calibration_lvlm, hidden_size, cached):
    stub, _ = calibration_lvlm
    big = _CalibrationLVLM(hidden_size)  # one item: 4 layers x 4 tokens x hidden x 2 bytes = 2 GiB at 2**26
    monkeypatch.setattr("vift.fusion.calibrate.adapter_for", lambda model: big)
    calibrator = Calibrator(big, big, _calibration_records()[:2], ["image0", "image1"], batch_size=1, max_new_tokens=1)
    assert [b.states is not None for b in calibrator.batches] == [cached, False]


def test_calibrator_answers_plain_or_steered_over_the_specs_cached_layers_and_scores_each_item(calibration_lvlm):
    stub, calls = calibration_lvlm
    per_pair = 4 * 8 * 4 * 2
    calibrator = Calibrator(stub, stub, _calibration_records(), [None] * 5, batch_size=2, max_new_tokens=3, max_cache_bytes=per_pair)
    del calls[:]
    assert calibrator.correct(NEUTRAL) == [True, False, True, False, True]  # the plain model answers the question's number
    assert stub.generated == [{"steered": False, "inference_mode": True, "max_new_tokens": 3, "do_sample": False}] * 3 and calls == []
    spec = FusionSpec(a=0.5, layer_start=1, layer_end=3)
    assert calibrator.correct(spec) == [False, False, False, True, False]  # steered: 7
    assert calls == [
        ("steered", stub, (2, 1), spec, (["text1", "text2"], ["image1", "image2"])),
        ("steered", stub, (2, 1), spec, None),  # past the cache: captured afresh by steered_generate
        ("steered", stub, (1, 1), spec, None),
    ]
    assert stub.generated[3:] == [{"steered": True, "inference_mode": False, "max_new_tokens": 3, "do_sample": False}] * 3


def test_gold_answer_log_likelihood_is_the_mean_over_items_of_the_forced_answer_and_end_of_turn(calibration_lvlm):
    stub, _ = calibration_lvlm
    processor = type("Processor", (), {"tokenizer": stub})()  # a processor's own tokenizer is used
    calibrator = Calibrator(stub, processor, _calibration_records(), [None] * 5, batch_size=2, max_new_tokens=3)
    log_p = torch.log_softmax(torch.arange(10.0, dtype=torch.float64), dim=0)  # every step scores token t as t
    expected = [log_p[0] + log_p[9], log_p[1] + log_p[7] + log_p[9], log_p[2] + log_p[9], log_p[7] + log_p[9], log_p[4] + log_p[9]]
    assert calibrator.answer_log_likelihood(NEUTRAL) == pytest.approx(float(sum(expected)) / 5, abs=1e-9)
    assert [g["max_new_tokens"] for g in stub.generated] == [3, 2, 2]  # each batch's longest gold answer, end-of-turn included
    assert all(g["do_sample"] is False and not g["steered"] for g in stub.generated)
    alone = Calibrator(stub, stub, _calibration_records()[:1], [None], batch_size=2, max_new_tokens=3)  # the stub is its own tokenizer
    assert alone.answer_log_likelihood(FusionSpec(a=0.5)) == pytest.approx(float(log_p[0] + log_p[9]), abs=1e-9)


class _ClimbCalibrator:
    """40 items; a configuration is right on the first 4k, k = 2 + int(4a) + int(4b) for additive
    fusion from layer 0, else k = 2. So the search climbs in a and b, and every right set contains
    no fusion's (all wins, no losses)."""

    num_layers = 4
    batches = [type("Batch", (), {"records": list(range(25))})(), type("Batch", (), {"records": list(range(15))})()]

    def __init__(self):
        self.evaluated: list[FusionSpec] = []
        self.scored: list[FusionSpec] = []

    def correct(self, spec: FusionSpec) -> list[bool]:
        self.evaluated.append(spec)
        k = 2 + int(4 * spec.a) + int(4 * spec.b) if spec.mode == "additive" and spec.layer_start == 0 else 2
        return [i < 4 * k for i in range(40)]

    def answer_log_likelihood(self, spec: FusionSpec) -> float:
        self.scored.append(spec)
        return -1.0 if spec == NEUTRAL else 0.0


def test_search_runs_the_coarse_grid_round_robin_within_two_thirds_of_the_budget_then_climbs_to_the_best():
    calibrator, progress = _ClimbCalibrator(), []
    params = CalibrationParams(modes=["additive", "replace"], weights=[0.0, 0.5, 0.9, 1.0], layer_ranges=[(0, 4), (2, 4)], budget=16)
    result = search(calibrator, params, progress=lambda done, budget: progress.append((done, budget)))  # 1000 bootstrap samples, seed 0
    add, rep = (
        (lambda a, b, s=0: FusionSpec(a=a, b=b, layer_start=s, layer_end=4)),
        (lambda v, t, s=0: FusionSpec(mode="replace", w_vis=v, w_text=t, layer_start=s, layer_end=4)),
    )
    # Coarse weights: every other one and the last (0, 0.9, 1); 16 * 2 // 3 = 10 coarse configurations.
    coarse = [
        NEUTRAL,
        add(0, 0),
        add(0, 0, 2),
        rep(0, 0),
        rep(0, 0, 2),
        add(0, 0.9),
        add(0, 0.9, 2),
        rep(0, 0.9),
        rep(0, 0.9, 2),
        add(0, 1),
    ]
    # Refinement around a=0, b=1, then around a=0.5, b=1 until the budget is spent.
    refine = [add(0.5, 1), add(0.25, 1), add(0, 0.95), add(0, 1, 1), FusionSpec(b=1, layer_end=3), add(0.9, 1)]
    assert calibrator.evaluated == coarse + refine
    assert [r["phase"] for r in result["search"]] == ["coarse"] * 10 + ["refine"] * 6
    assert [r["accuracy"] for r in result["search"]] == [0.2, 0.2, 0.2, 0.2, 0.2, 0.5, 0.2, 0.2, 0.2, 0.6, 0.8, 0.7, 0.5, 0.2, 0.6, 0.9]
    assert [r["layer_end"] for r in result["search"]][:2] == [4, 4] and result["search"][14]["layer_end"] == 3
    assert progress == [(i, 16) for i in range(1, 17)]
    assert calibrator.scored == []  # one configuration at the top: no tie-break needed
    # The best against no fusion, with search's 1000 bootstrap samples (1001 give another interval here).
    expected = paired_comparison([i < 36 for i in range(40)], [i < 8 for i in range(40)], 1000, 0)
    row = result["search"][15]
    assert [row[f"{key}_vs_neutral"] for key in ("difference", "ci95_low", "ci95_high", "mcnemar_p")] == [
        expected["difference"],
        *expected["ci95"],
        expected["mcnemar_p"],
    ]
    best = {**add(0.9, 1).to_dict()}
    assert result["fusion"] == best
    calibration = result["calibration"]
    assert calibration.pop("best_versus_neutral") == {
        **{key: expected[key] for key in ("difference", "ci95", "mcnemar_p")},
        "threshold": pytest.approx(0.05 / 16),
        "kept_neutral": False,
    }
    # Every fold's other items choose the same best configuration, so its held-out answers are its own.
    assert calibration.pop("cross_validated") == {
        "folds": 5, "accuracy": 0.9, **expected, "fused_folds": 5, "same_choice_folds": 5, "kept_neutral": False,
    }  # fmt: skip
    assert calibration == {
        "accuracy": 0.9,
        "best_accuracy": 0.9,
        "best": best,
        "unfused_accuracy": 0.2,
        "chosen_is_neutral": False,
        "searched": True,
        "tied_at_top": 1,
        "evaluated": 16,
        "budget": 16,
        "items": 40,
        "layer_ranges": [(0, 4), (2, 4)],
        "num_layers": 4,
    }


def test_a_coarse_grid_that_fits_the_budget_exactly_is_evaluated_whole_and_a_truncated_one_keeps_two_thirds():
    params = CalibrationParams(modes=["additive"], weights=[0.0, 1.0], layer_ranges=[(0, 4)], budget=5)  # no fusion + 4 = 5
    whole = search(_ClimbCalibrator(), params, bootstrap_samples=10)
    assert [(r["a"], r["b"], r["phase"]) for r in whole["search"]] == [
        (0, 0, "coarse"),
        (0, 0, "coarse"),
        (0, 1, "coarse"),
        (1, 0, "coarse"),
        (1, 1, "coarse"),
    ]
    calibrator = _ClimbCalibrator()
    truncated = search(calibrator, params.model_copy(update={"budget": 4}), bootstrap_samples=10)  # 4 * 2 // 3 = 2 coarse
    assert [(r["a"], r["b"], r["phase"]) for r in truncated["search"]] == [(0, 0, "coarse"), (0, 0, "coarse")]
    assert calibrator.evaluated == [NEUTRAL, FusionSpec(layer_end=4)]  # no better than no fusion: nothing to refine around
    # Two configurations tie at the top: the gold log-likelihood breaks the tie (the first one's is lower).
    assert calibrator.scored == [NEUTRAL, FusionSpec(layer_end=4)] and truncated["calibration"]["tied_at_top"] == 2
    assert truncated["calibration"]["best"]["layer_end"] == 4 and truncated["calibration"]["chosen_is_neutral"] is True  # a = b = 0
    calibrator = _ClimbCalibrator()
    search(calibrator, params.model_copy(update={"budget": 2}), bootstrap_samples=10)  # 2 * 2 // 3 = 1 coarse: no fusion alone
    assert calibrator.evaluated == [NEUTRAL]


def test_the_given_fusion_is_evaluated_even_on_the_smallest_budget():
    """Before, budget 2 cut the coarse grid to one configuration: no fusion alone, not the start."""
    params = CalibrationParams(modes=["additive"], weights=[0.0, 1.0], layer_ranges=[(0, 4)], budget=2)
    given = FusionSpec(a=1.0, b=1.0, layer_end=4)
    for budget in (1, 2):
        calibrator = _ClimbCalibrator()
        result = search(calibrator, params.model_copy(update={"budget": budget}), bootstrap_samples=10, start=given)
        assert calibrator.evaluated[:2] == [NEUTRAL, given] and len(result["search"]) == 2


class _FewWinsCalibrator:
    """200 items; a=1, b=0 is right on 7 more items than no fusion, the others on the same ones."""

    num_layers = 4
    batches = [type("Batch", (), {"records": list(range(200))})()]

    def correct(self, spec: FusionSpec) -> list[bool]:
        return [i < (57 if (spec.a, spec.b) == (1.0, 0.0) else 50) for i in range(200)]

    def answer_log_likelihood(self, spec: FusionSpec) -> float:
        return 0.0


def test_the_winner_must_beat_no_fusion_at_the_significance_divided_by_the_configurations_not_at_005():
    params = CalibrationParams(modes=["additive"], weights=[0.0, 1.0], layer_ranges=[(0, 4)], budget=10)
    result = search(_FewWinsCalibrator(), params)
    best = result["calibration"]["best_versus_neutral"]
    assert best["threshold"] == pytest.approx(0.05 / 9) and best["mcnemar_p"] == pytest.approx(2 * 0.5**7)  # 7 wins, 0 losses
    assert best["threshold"] < best["mcnemar_p"] < 0.05
    assert best["ci95"][0] > 0 and best["kept_neutral"] is True and result["calibration"]["chosen_is_neutral"] is True


def test_accuracy_on_a_single_calibration_item_is_0_or_1():
    one = type("One", (), {"num_layers": 4, "batches": [type("Batch", (), {"records": [0]})()], "correct": lambda self, spec: [True]})()
    result = search(one, CalibrationParams(modes=["additive"], weights=[0.0], layer_ranges=[(0, 4)], budget=1), bootstrap_samples=10)
    assert result["calibration"]["accuracy"] == result["search"][0]["accuracy"] == 1.0 and result["calibration"]["items"] == 1


def test_gold_answers_are_scored_on_the_models_device(monkeypatch, calibration_lvlm):
    """Under ``torch.device("meta")`` a tensor left on the default device would differ: no GPU needed."""
    stub, _ = calibration_lvlm
    stub.device, devices = torch.device("meta"), []

    class Recorder:
        def __init__(self, gold, eos_token_id):
            devices.append(gold.device)
            self.log_likelihood = torch.zeros(len(gold))

        def __call__(self, input_ids, scores):
            return scores

    monkeypatch.setattr("vift.fusion.calibrate.GoldAnswerScorer", Recorder)
    Calibrator(stub, stub, _calibration_records()[:1], [None], batch_size=1, max_new_tokens=1).answer_log_likelihood(NEUTRAL)
    assert devices == [torch.device("meta")]
