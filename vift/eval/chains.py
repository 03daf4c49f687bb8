"""What a reasoning-chain answer restates about the image: a direct probe of perception.

A model trained with ``data.text_answers: reasoning`` answers a ShapeTally question by first
restating the objects it is about ("the circles are red circle at top left, blue circle at
center. that is 2. ..."), then computing. The restated objects are what the model read from the
image, so whether they are exactly the question's relevant objects measures perception apart from
the arithmetic. Compared between fused answering and its controls (another item's image, none),
it says whether fusion reads the image it is given. Only for ShapeTally's question forms and
records with a reference description; other questions are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vift.data.manifests import reference_of
from vift.scoring.stats import paired_comparison, wilson_interval

# The question forms of vift.data.world.sample_question, and which objects each is about.
_FORMS = (
    (re.compile(r"How many (\w+)s are there, plus \d+\?"), lambda m, colour, shape: shape == m[1]),
    (re.compile(r"How many shapes would remain if the (\w+) ones were removed\?"), lambda m, colour, shape: colour != m[1]),
    (re.compile(r"What is twice the number of (\w+) shapes\?"), lambda m, colour, shape: colour == m[1]),
)
_COMPARE = re.compile(r"Are there more (\w+) shapes than (\w+) shapes\?")
# Rows whose restatements are compared with fused answering's (those present).
CONTROL_ROWS = ("vift_unfused", "question_only", "fused_wrong_image", "fused_blank_image")


def _objects(description: str) -> list[tuple[str, str, str]]:
    """(phrase, colour, shape) of each object of a caption ("red circle at top left, ...")."""
    text = description.strip().rstrip(".")
    if not text or text == "an empty board":
        return []
    return [(phrase, *phrase.split(" ", 2)[:2]) for phrase in text.split(", ")]


def relevant_objects(question: str, description: str) -> list[str] | None:
    """The caption phrases of the objects ``question`` is about, in the order a chain restates
    them; None for a question of another form."""
    objects = _objects(description)
    question = question.strip()
    if m := _COMPARE.fullmatch(question):
        return [p for p, colour, _ in objects if colour == m[1]] + [p for p, colour, _ in objects if colour == m[2]]
    for pattern, wanted in _FORMS:
        if m := pattern.fullmatch(question):
            return [p for p, colour, shape in objects if wanted(m, colour, shape)]
    return None


def restated_objects(answer: str) -> list[str] | None:
    """The object phrases an answer restates ("the ... are X, Y." sentences; "none" for none), or
    None when it restates nothing (a short answer)."""
    sentences = [s for s in re.split(r"\.\s*", answer) if " are " in s]
    if not sentences:
        return None
    return [p.strip() for s in sentences for p in s.rsplit(" are ", 1)[1].split(", ") if p.strip() and p.strip() != "none"]


def restatement(rows: dict[str, list[dict]], records: Sequence, bootstrap_samples: int, seed: int) -> dict | None:
    """Per row, the share of answers that restate objects (``chains``) and the share that restate
    exactly the relevant ones (Wilson 95 % interval, over the items with a known relevant set);
    fused answering's against each control's, paired. None when no row restates anything."""
    known = [
        (i, relevant)
        for i, r in enumerate(records)
        if (ref := reference_of(r)) and (relevant := relevant_objects(r.question, ref)) is not None
    ]
    if not known:
        return None
    correct, out = {}, {}
    for name, items in rows.items():
        restated = [restated_objects(items[i]["prediction"]) for i, _ in known]
        if not any(r is not None for r in restated):
            continue
        correct[name] = [r == relevant for r, (_, relevant) in zip(restated, known)]
        hits = sum(correct[name])
        out[name] = {
            "chains": sum(r is not None for r in restated) / len(known),
            "accuracy": hits / len(known),
            "ci95": list(wilson_interval(hits, len(known))),
            "n": len(known),
        }
    if not out:
        return None
    paired = (
        {}
        if "vift_fused" not in correct
        else {
            f"vift_fused_vs_{other}": paired_comparison(correct["vift_fused"], correct[other], bootstrap_samples, seed)
            for other in CONTROL_ROWS
            if other in correct
        }
    )
    return {"rows": out, "paired": paired}
