"""Stage ``base``: build + pretrain the tiny default LVLM, or snapshot a local checkpoint."""

from __future__ import annotations

import itertools
import time

from vift import paths
from vift.config.schema import Params
from vift.data.generate import training_corpus
from vift.data.manifests import Manifest, reference_of
from vift.data.world import text_prompt
from vift.fusion.generation import generate_answers
from vift.io import atomic_directory, atomic_write_json
from vift.model.compose import compose_llava
from vift.model.loading import snapshot_checkpoint
from vift.model.tiny import build_tiny_lvlm
from vift.scoring.answers import extract_answer, is_correct
from vift.train.pretrain import pretrain_language_model

TEXT_CHECK_ITEMS = 300  # held-out test scenes used to check the pretrained LM on text
PRETRAIN_SPLITS = ("backbone_text", "text_instructions")  # the tiny LM pretrains on the first present


CHAIN_TOKENS = 96  # room for a reasoning chain (data.backbone_answers: reasoning; the longest is about 70)


def text_accuracy(model, processor, batch_size: int, chains: bool = False) -> dict:
    """Exact-match accuracy of the LM on composed questions asked over held-out scene descriptions
    (``chains``: the answer a reasoning chain ends on, as evaluation extracts it).

    Needs the reference description (``reference``, or ShapeTally's ``scene``) of each test record,
    which imported data may lack: then the check is skipped and says why.
    """
    items = list(itertools.islice(Manifest(paths.manifest("test"), "vqa", paths.DATA_DIR, check_images=False), TEXT_CHECK_ITEMS))
    references = [reference_of(r) for r in items]
    if not items or not all(references):
        return {"skipped": f"{paths.manifest('test')}: records have no reference description ('reference' or 'scene')"}
    # ShapeTally's format (what backbone_text pretrains on), not params.prompts: a prompt change
    # must not retrain the base for a report-only check.
    prompts = [text_prompt(reference, r.question) for reference, r in zip(references, items)]
    answers = generate_answers(model, processor, None, prompts, batch_size=batch_size, max_new_tokens=CHAIN_TOKENS if chains else 4)
    if chains:
        correct = [is_correct(extract_answer(a, r.answer), r.answer) for a, r in zip(answers, items)]
    else:
        correct = [a == r.answer for a, r in zip(answers, items)]
    by_type: dict[str, list[bool]] = {}
    for ok, record in zip(correct, items):
        by_type.setdefault(record.type or "untyped", []).append(ok)
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "n": len(correct),
        "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
    }


def run(params: Params) -> None:
    started = time.time()
    report: dict = {"base": params.model.base}
    with atomic_directory(paths.BASE_MODEL) as out:
        if params.model.base == "tiny":
            model, processor = build_tiny_lvlm(params.model.tiny, params.data.image_size, training_corpus(paths.DATA_DIR), params.seed)
            report["parameters"] = sum(p.numel() for p in model.parameters())
            chains = params.data.backbone_answers == "reasoning"
            report["text_accuracy_before"] = text_accuracy(model, processor, params.train.check_batch_size, chains).get("accuracy")
            split = next(s for s in PRETRAIN_SPLITS if paths.manifest(s).exists())  # the data contract requires the last
            report["pretrain_split"] = split
            backbone = list(Manifest(paths.manifest(split), "conversation", paths.DATA_DIR, check_images=False))
            history = pretrain_language_model(model, processor, backbone, params.model.pretrain, params.seed)
            report["pretrain_loss"] = [h["loss"] for h in history if "loss" in h]
            report["text_accuracy"] = text_accuracy(model, processor, params.train.check_batch_size, chains)
            model.save_pretrained(out)
            processor.save_pretrained(out)
        elif params.model.base == "compose":
            model, processor = compose_llava(
                params.model.vision_tower,
                params.model.language_model,
                params.model.vision_feature_layer,
                params.model.dtype,
                params.model.trust_remote_code,
                scratch=(params.model.tiny, params.data.image_size, params.seed),
            )
            report["parameters"] = sum(p.numel() for p in model.parameters())
            model.save_pretrained(out)
            processor.save_pretrained(out)
        else:
            snapshot_checkpoint(params.model.base, out, params.model.trust_remote_code)
    atomic_write_json(paths.BASE_REPORT, report)
    print(f"base: done in {time.time() - started:.0f} s", flush=True)
