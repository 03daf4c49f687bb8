"""How well a model captions held-out images: the perception that the caption stage must teach.

Reference captions are the ``reference`` (or ShapeTally's ``scene``) field of evaluation records,
in the same words as the training captions. A caption is a comma-separated
list of object phrases ("red circle at top left, ..."), so besides exact match we score the
phrases as a set: precision, recall and F1 over all images (micro-averaged).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from vift.data.manifests import Manifest, caption_instruction, load_rgb, reference_of, resolve_image
from vift.fusion.generation import generate_answers


def caption_phrases(caption: str) -> set[str]:
    """``"red circle at top left, blue square at center."`` -> ``{"red circle at top left", "blue square at center"}``."""
    return {phrase.strip() for phrase in caption.strip().rstrip(".").split(",") if phrase.strip()}


def caption_states_reference(generated: str, reference: str) -> bool:
    """Whether a caption states exactly the reference content: the same set of object phrases."""
    return caption_phrases(generated) == caption_phrases(reference)


def score_captions(generated: list[str], references: list[str]) -> dict:
    """Exact-match rate and phrase-level precision / recall / F1 of ``generated`` against ``references``."""
    exact = sum(g.strip() == r.strip() for g, r in zip(generated, references))
    true_positive = predicted = actual = 0
    for g, r in zip(generated, references):
        g_set, r_set = caption_phrases(g), caption_phrases(r)
        true_positive += len(g_set & r_set)
        predicted += len(g_set)
        actual += len(r_set)
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(1, len(references))
    return {"n": len(references), "exact_match": exact / n, "phrase_precision": precision, "phrase_recall": recall, "phrase_f1": f1}


@torch.inference_mode()
def caption_quality(
    model, processor, heldout_manifest: Path, captions_manifest: Path, image_root: Path, limit: int, batch_size: int
) -> dict:
    """Greedy captions of the first ``limit`` held-out images, scored against their scene descriptions.

    Returns the scores plus three examples; ``skipped`` says why when the records carry no reference.
    """
    if limit == 0 or not Path(heldout_manifest).is_file():
        return {"skipped": f"no held-out images to caption (limit {limit}, {heldout_manifest})"}
    items = list(itertools.islice(Manifest(heldout_manifest, "vqa", image_root, check_images=False), limit))
    references = [reference_of(r) for r in items]
    if not items or any(ref is None or r.image is None for ref, r in zip(references, items)):
        return {"skipped": f"{heldout_manifest}: records need an image and a reference caption ('reference' or 'scene')"}
    prompt = caption_instruction(captions_manifest)
    images = [load_rgb(resolve_image(Path(image_root), r.image)) for r in items]
    longest = max(len(processor.tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    was_training = model.training
    model.eval()
    try:
        generated = generate_answers(model, processor, images, [prompt] * len(items), batch_size=batch_size, max_new_tokens=longest + 4)
    finally:
        model.train(was_training)
    result = score_captions(generated, references)
    result["examples"] = [{"reference": r, "generated": g} for r, g in zip(references[:3], generated[:3])]
    return result
