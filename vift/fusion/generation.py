"""Batched generation: a model answering prompts, with or without images, greedy by default.

A module of its own, below :mod:`vift.fusion.method`, because the training stages check their
models by generating and must not depend on the fusion method: DVC reruns a stage when any file of
its import closure changes, so a change to how fusion works reruns calibration and evaluation only,
never the training stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (family adapter, image+question inputs, the batch's questions, generate kwargs) -> sequences
Steer = Callable[[object, dict, list[str], dict], torch.Tensor]


def generate_answers(
    model,
    processor,
    images: Sequence | None,
    questions: Sequence[str],
    batch_size: int = 16,
    steer: Steer | None = None,
    **generate_kwargs,
) -> list[str]:
    """Answers to ``questions`` about ``images`` (PIL images; None: text-only prompts), batched.

    ``steer``, when given, generates each batch of image prompts in place of plain ``generate``
    (how :func:`vift.fusion.method.fused_generate` applies a fusion). ``generate_kwargs`` go to
    ``generate``; ``do_sample`` defaults to False.
    """
    from vift.fusion.families import adapter_for

    adapter = adapter_for(model)
    generate_kwargs.setdefault("do_sample", False)
    answers: list[str] = []
    for begin in range(0, len(questions), batch_size):
        batch_questions = list(questions[begin : begin + batch_size])
        if images is None:
            inputs = adapter.text_inputs(processor, batch_questions, model.device)
        else:
            inputs = adapter.image_inputs(processor, list(images[begin : begin + batch_size]), batch_questions, model.device)
        if steer is None or images is None:
            with torch.inference_mode():
                sequences = model.generate(**inputs, **generate_kwargs)
        else:
            sequences = steer(adapter, inputs, batch_questions, generate_kwargs)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True))
    return answers
