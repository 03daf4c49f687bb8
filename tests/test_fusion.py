"""Ability-fused inference on the default family (LLaVA): exactness, prefill-only edits, batching,
agreement with a re-statement of the reference procedure, hook hygiene."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import widened
from vift.data.manifests import Manifest
from vift.errors import UserError
from vift.fusion.families import adapter_for
from vift.fusion.hooks import PrefillEditor
from vift.fusion.method import FusionSpec, align_right, fused_positions, steered_generate

GENERATE = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def model_and_processor(tiny_lvlm):
    """The ci tiny LLaVA in float64 with a wider init, so greedy outputs vary and never tie."""
    model, processor = tiny_lvlm
    return widened(model, seed=1, dtype=torch.float64), processor


@pytest.fixture(scope="module")
def batch(ci_data):
    records = list(Manifest(ci_data / "test.jsonl", "vqa"))[:8]
    images = [Image.open(ci_data / r.image).convert("RGB") for r in records]
    return images, [r.question for r in records]


def inputs_for(model, processor, images, questions):
    adapter = adapter_for(model)
    image_inputs = adapter.image_inputs(processor, images, questions, model.device)
    image_inputs["pixel_values"] = image_inputs["pixel_values"].double()
    return image_inputs, adapter.text_inputs(processor, questions, model.device)


def generate(model, inputs, spec=None, text_inputs=None, **kwargs):
    kwargs = {**GENERATE, "output_logits": True, "return_dict_in_generate": True, **kwargs}
    if spec is None:
        with torch.inference_mode():
            return model.generate(**inputs, **kwargs)
    return steered_generate(model, inputs, text_inputs, spec, **kwargs)


@pytest.mark.parametrize("neutral", [FusionSpec(mode="additive", a=0, b=0), FusionSpec(mode="replace", w_vis=1, w_text=0)])
@pytest.mark.parametrize("positions", ["question", "text_prompt"])
def test_neutral_fusion_gives_exactly_the_plain_model(model_and_processor, batch, neutral, positions):
    model, processor = model_and_processor
    image_inputs, text_inputs = inputs_for(model, processor, *batch)
    plain = generate(model, image_inputs)
    fused = generate(model, image_inputs, FusionSpec(**{**neutral.to_dict(), "positions": positions}), text_inputs)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        assert torch.equal(a, b)


def test_fusion_edits_the_prefill_once_and_leaves_decode_steps_alone(model_and_processor, batch):
    model, processor = model_and_processor
    image_inputs, _ = inputs_for(model, processor, *batch)
    layers = model.get_decoder().layers
    prompt_len = image_inputs["input_ids"].shape[1]
    editor = PrefillEditor(layers, 1, [lambda h: h + 1.0, lambda h: h - 0.5])
    with editor.active(), torch.inference_mode():
        model.generate(**image_inputs, **GENERATE)
    for layer in (1, 2):
        calls = [(length, edited) for index, length, edited in editor.calls if index == layer]
        assert calls[0] == (prompt_len, True)
        assert calls[1:] == [(1, False)] * (GENERATE["max_new_tokens"] - 1)


def test_non_neutral_fusion_changes_the_first_token_logits(model_and_processor, batch):
    model, processor = model_and_processor
    image_inputs, text_inputs = inputs_for(model, processor, *batch)
    plain = generate(model, image_inputs)
    fused = generate(model, image_inputs, FusionSpec(a=1.0, b=0.5, layer_start=1), text_inputs)
    assert not torch.allclose(fused.logits[0], plain.logits[0])


@pytest.mark.parametrize(
    "spec", [FusionSpec(a=0.8, b=0.4, layer_start=1), FusionSpec(mode="replace", w_vis=0.5, w_text=0.7, positions="text_prompt")]
)
def test_a_batch_of_eight_equals_the_samples_one_by_one(model_and_processor, batch, spec):
    model, processor = model_and_processor
    images, questions = batch
    assert len({len(q) for q in questions}) > 1  # mixed lengths, so the batch is padded
    image_inputs, text_inputs = inputs_for(model, processor, images, questions)
    batched = generate(model, image_inputs, spec, text_inputs)
    new = batched.sequences[:, image_inputs["input_ids"].shape[1] :]
    for row, (image, question) in enumerate(zip(images, questions)):
        single_image, single_text = inputs_for(model, processor, [image], [question])
        single = generate(model, single_image, spec, single_text)
        assert torch.equal(single.sequences[0, single_image["input_ids"].shape[1] :], new[row])
        assert torch.allclose(single.logits[0][0], batched.logits[0][row], atol=1e-9)


def test_additive_text_prompt_mode_matches_a_restatement_of_the_reference(model_and_processor, batch):
    """The reference: three passes for one sample, in-place add on the last L positions."""
    model, processor = model_and_processor
    a, b, start, end = 0.7, 0.3, 1, 3
    image_inputs, text_inputs = inputs_for(model, processor, [batch[0][0]], [batch[1][0]])
    with torch.inference_mode():
        # hidden_states[l] is the input of decoder layer l: an independent capture mechanism
        text_hidden = model(**text_inputs, output_hidden_states=True).hidden_states
        image_hidden = model(**image_inputs, output_hidden_states=True).hidden_states
    length = text_inputs["input_ids"].shape[1]
    done = set()

    def reference_hook(layer):
        def hook(module, args):
            if layer in done:
                return None
            done.add(layer)
            args[0][:, -length:] += a * text_hidden[layer] - b * image_hidden[layer][:, -length:]
            return None

        return hook

    layers = model.get_decoder().layers
    handles = [layers[i].register_forward_pre_hook(reference_hook(i)) for i in range(start, end)]
    try:
        reference = generate(model, image_inputs)
    finally:
        for handle in handles:
            handle.remove()
    ours = generate(model, image_inputs, FusionSpec(a=a, b=b, layer_start=start, layer_end=end, positions="text_prompt"), text_inputs)
    assert torch.equal(ours.sequences, reference.sequences)
    for x, y in zip(ours.logits, reference.logits):
        assert torch.allclose(x, y, atol=1e-10)


def test_no_hook_remains_after_fusion_also_after_an_exception(model_and_processor, batch):
    model, processor = model_and_processor
    image_inputs, text_inputs = inputs_for(model, processor, *batch)
    layers = model.get_decoder().layers
    generate(model, image_inputs, FusionSpec(a=0.5), text_inputs)
    assert all(not layer._forward_pre_hooks for layer in layers)

    def explode(module, args, output):
        raise RuntimeError("boom inside the steered forward")

    failing = layers[-1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            steered_generate(model, image_inputs, text_inputs, FusionSpec(a=0.5, layer_end=2), **GENERATE)
    finally:
        failing.remove()
    assert all(not layer._forward_pre_hooks for layer in layers)


def test_a_layer_range_outside_the_model_is_refused(model_and_processor, batch):
    model, processor = model_and_processor
    image_inputs, text_inputs = inputs_for(model, processor, *batch)
    with pytest.raises(ValueError, match="outside the model's 4 decoder layers"):
        steered_generate(model, image_inputs, text_inputs, FusionSpec(a=1, layer_start=2, layer_end=9), **GENERATE)


def test_beams_and_return_sequences_expand_the_fusion(model_and_processor, batch):
    model, processor = model_and_processor
    image_inputs, text_inputs = inputs_for(model, processor, batch[0][:3], batch[1][:3])
    kwargs = {"num_beams": 2, "num_return_sequences": 2}
    plain = generate(model, image_inputs, **kwargs)
    neutral = generate(model, image_inputs, FusionSpec(), text_inputs, **kwargs)
    fused = generate(model, image_inputs, FusionSpec(a=1.0, b=0.5), text_inputs, **kwargs)
    assert neutral.sequences.shape == plain.sequences.shape == (6, image_inputs["input_ids"].shape[1] + GENERATE["max_new_tokens"])
    assert torch.equal(neutral.sequences, plain.sequences)
    assert fused.sequences.shape == plain.sequences.shape


def test_question_positions_are_the_shared_suffix():
    image_ids = torch.tensor([[0, 9, 9, 5, 6, 7], [9, 9, 4, 5, 6, 7]])
    text_ids = torch.tensor([[0, 3, 5, 6, 7], [0, 0, 8, 6, 7]])
    image_mask, text_mask = (image_ids != 0).long(), (text_ids != 0).long()
    mask = fused_positions(image_ids, image_mask, text_ids, text_mask, "question")
    assert mask.tolist() == [[False, False, False, True, True, True], [False, False, False, False, True, True]]
    mask = fused_positions(image_ids, image_mask, text_ids, text_mask, "text_prompt")
    assert mask.sum(dim=1).tolist() == [4, 3]
    states = torch.arange(6.0).reshape(1, 3, 2)
    assert align_right(states, 5)[0, 2:].tolist() == states[0].tolist()


def test_an_unknown_family_names_the_supported_ones():
    with pytest.raises(UserError, match="unsupported model family 'mystery'; supported: llava"):
        adapter_for("mystery")
