"""Ability-fused inference, the whole method.

For image v and question q, let T_l be the input hidden states of decoder layer l for the text-only
prompt and V_l those for the image+question prompt, both captured without steering. During the
prefill of the image+question prompt, at each layer l in [start, end), on the fused positions:

- ``additive`` (the reference code): H_l += a·T_l − b·V_l, accumulating across layers;
- ``replace`` (the paper's formula read literally): H_l = w_vis·V_l + w_text·T_l;
- ``task_vector``: H_l += a·d_l, d_l the mean of T_l − V_l over the calibration items' fused
  positions (one vector per layer, no per-sample states: what is left of fusion without them).

Fused positions are aligned from the right (both batches are left-padded):
- ``question``: the tokens both prompts share at their end (question + assistant prefix);
- ``text_prompt`` (the reference): the last L positions, L = length of the whole text-only prompt.

Decode steps are untouched; they see the fusion through the KV cache. a = b = 0, or w_vis = 1 and
w_text = 0, reproduce the plain model exactly.

Two variants (off by default; docs/RESULTS.md measures them):
- ``preserve_norm``: after the edit, each edited position is rescaled to the norm its hidden state
  had before (norm-preserving injection, as in L2V-CoT);
- ``steer_prefix`` (additive only): every real position before the fused ones, the image tokens
  included, also gets the sample's mean edit over its fused positions (a textual steering vector).

Compared with the reference (one sample at a time, three full prefills), everything is batched, and
both capture passes stop after the last fused layer.

**Shared prefix** (:func:`steered_generate` with ``question`` positions, on families whose adapter
allows it): in a causal decoder every position before the first fused one has the same states in
the unsteered and the steered pass, at every layer. So the image prompt is laid out per sample as
``[pad, prefix | pad, fused suffix]`` (the padding in the middle is masked, and positions come from
the attention mask, so every real token keeps its position), the prefix — image included — is
prefilled once into a KV cache through ``generate``, and only the suffix runs twice against it:
unsteered to capture ``V``, then steered. A capture whose weight is 0 (``b``, ``w_vis``; ``a``,
``w_text``) is skipped. The result is the same as the full path's (bit for bit on the tested
families, float64) and is returned in the caller's layout. Not used, and the full path runs, for
bidirectional prefixes (PaliGemma), M-RoPE (the Qwen-VL families: a cached continuation takes its
positions from column indices, which the middle padding shifts), a sliding window shorter than the
prompt plus the answer (the middle padding would change what falls inside it), ``text_prompt``
positions (their region can start inside the image tokens), beams or several return sequences.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from vift.fusion.generation import generate_answers
from vift.fusion.hooks import PrefillEditor, capture_layer_inputs
from vift.model.loading import decoder_layers

Mode = Literal["additive", "replace", "task_vector"]
Positions = Literal["question", "text_prompt"]


@dataclass(frozen=True)
class FusionSpec:
    """One fusion configuration; ``layer_end`` None means the last decoder layer (exclusive end)."""

    mode: Mode = "additive"
    positions: Positions = "question"
    a: float = 0.0
    b: float = 0.0
    w_vis: float = 1.0
    w_text: float = 0.0
    layer_start: int = 0
    layer_end: int | None = None
    preserve_norm: bool = False
    steer_prefix: bool = False
    # ``task_vector`` mode: per decoder layer (all of them), the mean of T − V over the calibration
    # items' fused positions; calibration computes it. Not compared or hashed (one per calibration).
    task_vector: tuple[tuple[float, ...], ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.steer_prefix and self.mode != "additive":
            raise ValueError("steer_prefix adds the mean question edit a·T − b·V: additive mode only")
        if self.mode == "task_vector" and self.b != 0:
            raise ValueError("task_vector mode adds a·d (d: the mean of T − V over calibration items); b must be 0")

    @classmethod
    def from_dict(cls, values: dict) -> FusionSpec:
        values = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        if values.get("task_vector") is not None:
            values["task_vector"] = tuple(tuple(float(x) for x in layer) for layer in values["task_vector"])
        return cls(**values)

    def to_dict(self) -> dict:
        """The configuration's fields; the task vector (large) is :meth:`vector_dict`'s."""
        return {k: v for k, v in asdict(self).items() if k != "task_vector"}

    def vector_dict(self) -> dict:
        """``{"task_vector": [[...], ...]}`` when the spec carries one, else ``{}``."""
        return {} if self.task_vector is None else {"task_vector": [list(layer) for layer in self.task_vector]}

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        end = num_layers if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= num_layers:
            raise ValueError(f"fusion layers [{self.layer_start}, {end}) outside the model's {num_layers} decoder layers")
        return self.layer_start, end

    @property
    def is_neutral(self) -> bool:
        if self.mode in ("additive", "task_vector"):
            return self.a == 0 and self.b == 0
        return self.w_vis == 1 and self.w_text == 0

    def with_weights(self, **weights) -> FusionSpec:
        return replace(self, **weights)


NEUTRAL = FusionSpec()


def fused_positions(
    image_ids: torch.Tensor, image_mask: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, positions: Positions
) -> torch.Tensor:
    """Boolean ``(batch, image_seq)`` mask of the positions to fuse, aligned from the right.

    ``question``: per sample, the longest common suffix of the two prompts' tokens.
    ``text_prompt``: per sample, the last L positions, L = non-pad length of the text-only prompt.
    Both inputs must be left-padded (real tokens at the end).
    """
    batch, image_len = image_ids.shape
    text_len = text_ids.shape[1]
    overlap = min(image_len, text_len)
    if positions == "text_prompt":
        lengths = text_mask.sum(dim=1)
        if (lengths > image_mask.sum(dim=1)).any():
            raise ValueError("text-only prompt longer than the image prompt: text_prompt positions undefined")
    else:
        same = (image_ids[:, -overlap:] == text_ids[:, -overlap:]) & image_mask[:, -overlap:].bool() & text_mask[:, -overlap:].bool()
        # common suffix length = number of trailing positions before the first mismatch from the right
        lengths = same.flip(1).long().cumprod(dim=1).sum(dim=1)
        if (lengths == 0).any():
            raise ValueError("a text-only prompt shares no final tokens with its image prompt")
    from_right = torch.arange(image_len - 1, -1, -1, device=image_ids.device)
    return from_right[None, :] < lengths[:, None]


def align_right(states: torch.Tensor, length: int) -> torch.Tensor:
    """``(batch, seq, hidden)`` states placed at the right end of a ``(batch, length, hidden)`` zero tensor."""
    batch, seq, hidden = states.shape
    out = states.new_zeros(batch, length, hidden)
    keep = min(seq, length)
    out[:, length - keep :] = states[:, seq - keep :]
    return out


def _repeat_for(hidden: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Expand per-sample tensors to ``generate``'s beams/return sequences (sample-major order)."""
    factor = hidden.shape[0] // tensors[0].shape[0]
    return [t if factor == 1 else t.repeat_interleave(factor, dim=0) for t in tensors]


def _edit(spec: FusionSpec, text_state: torch.Tensor, image_state: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None = None):
    """The fusion formula at one layer, as an edit of that layer's prefill hidden states.

    ``prefix`` (with ``steer_prefix``): the real positions before the fused ones, which get the
    sample's mean edit over its fused positions. With ``preserve_norm`` every edited position is
    rescaled to the norm it had before the edit.
    """

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        text, image, where = _repeat_for(hidden, text_state, image_state, mask[..., None])
        # Both formulas build a new tensor: the input (which a caller may still hold) is never written.
        if spec.mode in ("additive", "task_vector"):  # task_vector: T is the mean vector, b = 0
            delta = where * (spec.a * text - spec.b * image)
            edited = hidden + delta
            if prefix is not None:
                (before,) = _repeat_for(hidden, prefix[..., None])
                mean = delta.sum(dim=1, keepdim=True) / where.sum(dim=1, keepdim=True).clamp_min(1)
                edited = edited + before * mean
                where = where | before
        else:
            edited = torch.where(where, spec.w_vis * image + spec.w_text * text, hidden)
        if spec.preserve_norm:
            tiny = torch.finfo(edited.dtype).tiny
            scale = hidden.norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(tiny)
            edited = torch.where(where, edited * scale, edited)
        return edited

    return edit


def capture_states(model, image_inputs: dict, text_inputs: dict, start: int, end: int) -> tuple[list, list]:
    """Unsteered inputs of decoder layers [start, end): (text-only states, image+question states)."""
    layers = decoder_layers(model)
    return (
        capture_layer_inputs(model, layers, text_inputs, start, end),
        capture_layer_inputs(model, layers, image_inputs, start, end),
    )


@torch.inference_mode()
def steered_generate(
    model, image_inputs: dict, text_inputs: dict, spec: FusionSpec, states: tuple[list, list] | None = None, **generate_kwargs
):
    """Generate from ``image_inputs`` with text-only states from ``text_inputs`` fused in.

    Both are batches of model inputs for the same questions, left-padded, as processors return
    them. ``states``: captures from ``capture_states`` over exactly the spec's layer range, to
    reuse across specs (calibration); captured here when None. Returns what ``generate`` returns.
    """
    layers = decoder_layers(model)
    start, end = spec.layer_range(len(layers))
    mask = fused_positions(
        image_inputs["input_ids"], image_inputs["attention_mask"], text_inputs["input_ids"], text_inputs["attention_mask"], spec.positions
    )
    if states is None and reuses_prefix(model, spec, mask, generate_kwargs):
        return _prefix_steered_generate(model, layers, start, end, image_inputs, text_inputs, spec, mask, **generate_kwargs)
    text_states, image_states = (
        states if states is not None else _needed_captures(model, layers, spec, text_inputs, image_inputs, start, end)
    )
    image_len = image_inputs["input_ids"].shape[1]
    prefix = image_inputs["attention_mask"].bool() & ~mask if spec.steer_prefix else None
    edits = _edits(model, spec, text_states, image_states, mask, image_len, start, end, prefix)
    with PrefillEditor(layers, start, edits).active():
        return model.generate(**image_inputs, **generate_kwargs)


def uses_text(spec: FusionSpec) -> bool:
    """Whether ``spec`` reads the text-only states T (a weight on them that is not 0)."""
    return spec.mode != "task_vector" and (spec.a if spec.mode == "additive" else spec.w_text) != 0


def uses_image(spec: FusionSpec) -> bool:
    """Whether ``spec`` reads the unsteered image+question states V (task_vector: its mean is in the vector)."""
    return spec.mode != "task_vector" and (spec.b if spec.mode == "additive" else spec.w_vis) != 0


def _needed_captures(model, layers, spec: FusionSpec, text_inputs: dict, image_inputs: dict, start: int, end: int):
    """``(T, V)`` captures of layers [start, end); a state the spec weighs by 0 is not captured (None)."""
    return (
        capture_layer_inputs(model, layers, text_inputs, start, end) if uses_text(spec) else None,
        capture_layer_inputs(model, layers, image_inputs, start, end) if uses_image(spec) else None,
    )


def _edits(
    model,
    spec: FusionSpec,
    text_states,
    image_states,
    mask: torch.Tensor,
    length: int,
    start: int,
    end: int,
    prefix: torch.Tensor | None = None,
) -> list:
    """One edit per fused layer over ``length`` positions; states not captured (weight 0) count as 0."""
    for captured in (text_states, image_states):
        if captured is not None and len(captured) != end - start:
            raise ValueError(f"{len(captured)} captured layers for the fusion range [{start}, {end})")
    hidden = model.config.get_text_config().hidden_size
    zeros = torch.zeros(mask.shape[0], length, hidden, dtype=model.dtype, device=mask.device)
    if spec.mode == "task_vector" and (spec.task_vector is None or len(spec.task_vector) < end or len(spec.task_vector[0]) != hidden):
        raise ValueError("task_vector mode needs the per-layer vector calibration computes (one row per decoder layer, hidden-size wide)")
    edits = []
    for index in range(end - start):
        text = zeros if text_states is None else align_right(text_states[index], length)
        if spec.mode == "task_vector":
            text = torch.tensor(spec.task_vector[start + index], dtype=model.dtype, device=mask.device).expand_as(zeros)
        image = zeros if image_states is None else image_states[index]
        edits.append(_edit(spec, text, image, mask, prefix))
    return edits


# Sequence-aligned keys of an adapter's batch; every other key (pixel values, grids, sizes) is per image.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def reuses_prefix(model, spec: FusionSpec, mask: torch.Tensor, generate_kwargs: dict) -> bool:
    """Whether the shared-prefix path applies (module docstring: which cases it leaves to the full path)."""
    from vift.fusion.families import adapter_for

    if spec.positions != "question" or not uses_image(spec) or not adapter_for(model).reuses_prefix:
        return False  # without V to capture, the full path prefills the image prompt only once anyway
    if spec.steer_prefix:
        return False  # the prefix itself is edited: it differs between the unsteered and steered passes
    if generate_kwargs.get("num_beams", 1) != 1 or generate_kwargs.get("num_return_sequences", 1) != 1:
        return False
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window is not None:
        new_tokens = generate_kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens
        if new_tokens is None or mask.shape[1] + int(mask.sum(1).max()) + new_tokens > window:
            return False
    return bool(mask.any(dim=1).all())


def shared_prefix_layout(inputs: dict, mask: torch.Tensor, pad_id: int) -> tuple[dict, torch.Tensor, int]:
    """``inputs`` laid out per sample as ``[pad, prefix | pad, fused suffix]``: ``(inputs, fused mask,
    prefix length P)``. Every sample's prefix ends at column P and its fused suffix at the last column;
    the padding is masked (``attention_mask`` 0), so positions, which follow the mask, are unchanged."""
    real = inputs["attention_mask"].bool()
    batch, length = real.shape
    suffix = mask.sum(dim=1)
    prefix = real.sum(dim=1) - suffix
    p_len, s_len = int(prefix.max()), int(suffix.max())
    out = dict(inputs)
    for key in SEQUENCE_KEYS:
        if key not in inputs:
            continue
        old = inputs[key]
        new = old.new_full((batch, p_len + s_len), pad_id if key == "input_ids" else 0)
        for row in range(batch):  # a handful of rows: plain slicing is clearer than a scatter
            p, s = int(prefix[row]), int(suffix[row])
            new[row, p_len - p : p_len] = old[row, length - s - p : length - s]
            new[row, p_len + s_len - s :] = old[row, length - s :]
        out[key] = new
    columns = torch.arange(p_len + s_len, device=mask.device)
    new_mask = columns[None, :] >= (p_len + s_len - suffix)[:, None]
    return out, new_mask, p_len


def prefill_prefix(model, inputs: dict, p_len: int) -> tuple[Any, dict]:
    """The first ``p_len`` columns of ``inputs`` (laid out by :func:`shared_prefix_layout`), image
    included, run once into a KV cache: ``(cache, the sequence inputs to generate on from it)``.
    Those inputs carry no pixels: the image is in the cache."""
    prefix = {k: v[:, :p_len] if k in SEQUENCE_KEYS else v for k, v in inputs.items()}
    with torch.inference_mode():  # generate computes the prefix's positions from its mask
        cache = model.generate(**prefix, max_new_tokens=1, do_sample=False, return_dict_in_generate=True).cache
    return cache, {k: v for k, v in inputs.items() if k in SEQUENCE_KEYS}


def _prefix_steered_generate(model, layers, start: int, end: int, image_inputs: dict, text_inputs: dict, spec, mask, **generate_kwargs):
    pad_id = model.generation_config.pad_token_id
    inputs, laid_mask, p_len = shared_prefix_layout(image_inputs, mask, 0 if pad_id is None else int(pad_id))
    cache, suffix_inputs = prefill_prefix(model, inputs, p_len)
    s_len = suffix_inputs["input_ids"].shape[1] - p_len
    image_suffix = {**suffix_inputs, "cache": copy.deepcopy(cache)}
    text_states, image_states = _needed_captures(model, layers, spec, text_inputs, image_suffix, start, end)
    edits = _edits(model, spec, text_states, image_states, laid_mask[:, p_len:], s_len, start, end)
    with torch.inference_mode(), PrefillEditor(layers, start, edits).active():
        out = model.generate(**suffix_inputs, cache=cache, **generate_kwargs)
    return _in_caller_layout(out, image_inputs["input_ids"], p_len + s_len)


def _in_caller_layout(out: Any, input_ids: torch.Tensor, laid_length: int) -> Any:
    """``generate``'s output with the prompt as the caller laid it out (answers start where they expect)."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    restored = torch.cat([input_ids, sequences[:, laid_length:]], dim=1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out


def fused_generate(
    model,
    processor,
    images: Sequence | None,
    questions: Sequence[str],
    fusion: FusionSpec | None,
    batch_size: int = 16,
    **generate_kwargs,
) -> list[str]:
    """Answers to ``questions`` about ``images`` (PIL images), with fusion applied; batched.

    ``fusion`` None (or neutral) runs the plain model; ``images`` None asks the questions without
    images (text-only prompts; no fusion). ``generate_kwargs`` go to ``generate`` (greedy by
    default). The one entry point for evaluation, ``vift predict`` and the MLflow model.
    """
    if images is None and fusion is not None and not fusion.is_neutral:
        raise ValueError("fusion needs images: it fuses text-only states into the image+question pass")
    steer = None
    if fusion is not None and not fusion.is_neutral:

        def steer(adapter, inputs: dict, batch_questions: list[str], kwargs: dict):
            text_inputs = adapter.text_inputs(processor, batch_questions, model.device)
            return steered_generate(model, inputs, text_inputs, fusion, **kwargs)

    return generate_answers(model, processor, images, questions, batch_size, steer, **generate_kwargs)
