"""ShapeTally: determinism, held-out scenes, questions that need both perception and arithmetic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vift.config import apply_overrides
from vift.data.generate import SPLITS, generate_shapetally
from vift.data.world import QUESTION_TYPES, Scene, SceneObject, sample_question, split_rng


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_gives_byte_identical_data(ci_params, ci_data, tmp_path):
    again = generate_shapetally(ci_params.data, tmp_path / "again")
    assert tree_digest(tmp_path / "again") == tree_digest(ci_data)
    assert again["sha256"] == json.loads((ci_data / "summary.json").read_text())["sha256"]


def test_different_seed_gives_different_data(ci_params, ci_data, tmp_path):
    other = apply_overrides(ci_params, {"data.seed": 1}).data
    summary = generate_shapetally(other, tmp_path / "other")
    original = json.loads((ci_data / "summary.json").read_text())["sha256"]
    assert all(summary["sha256"][split] != original[split] for split in SPLITS)


def test_every_split_has_its_size_and_test_types_are_labelled(ci_params, ci_data):
    for split in SPLITS:
        assert len(read(ci_data / f"{split}.jsonl")) == getattr(ci_params.data, split)
    test_types = {r["type"] for r in read(ci_data / "test.jsonl")}
    assert test_types == set(QUESTION_TYPES)


def test_evaluation_scenes_never_appear_in_training_splits(ci_data):
    held_out = {r["scene"] for split in ("test", "calibration") for r in read(ci_data / f"{split}.jsonl")}
    train_scenes = {r["conversations"][1]["value"] for r in read(ci_data / "captions.jsonl")}
    train_scenes |= {
        r["conversations"][0]["value"].split("\n")[0].removeprefix("Scene: ")
        for r in read(ci_data / "text_instructions.jsonl")
        if r["conversations"][0]["value"].startswith("Scene: ")
    }
    assert held_out and not held_out & train_scenes


def test_text_instructions_have_no_images_and_visual_ones_do(ci_data):
    for record in read(ci_data / "text_instructions.jsonl") + read(ci_data / "backbone_text.jsonl"):
        assert "image" not in record and "<image>" not in json.dumps(record)
    for record in read(ci_data / "visual_instructions.jsonl") + read(ci_data / "captions.jsonl"):
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert (ci_data / record["image"]).is_file()


def test_captions_never_state_counts_or_arithmetic(ci_data):
    for record in read(ci_data / "captions.jsonl"):
        caption = record["conversations"][1]["value"]
        assert not any(ch.isdigit() for ch in caption) and "how many" not in caption.lower()


def test_answers_compose_perception_with_arithmetic():
    scene = Scene(3, (SceneObject(0, "red", "circle"), SceneObject(4, "blue", "circle"), SceneObject(8, "red", "square")))
    answers = {}
    for index in range(200):
        question = sample_question(split_rng(0, "unit", index), scene)
        answers[question.text] = question.answer
    assert answers.get("How many circles are there, plus 3?", "5") == "5"
    assert answers.get("How many shapes would remain if the red ones were removed?", "1") == "1"
    assert answers.get("What is twice the number of red shapes?", "4") == "4"
    assert answers.get("Are there more red shapes than blue shapes?", "yes") == "yes"
    assert len({q.split()[0] for q in answers}) >= 3


def test_backbone_teaches_the_language_model_to_describe_boards(ci_data):
    """Board notation: one token per cell in reading order, described in the caption's words."""
    from vift.data.world import CELL_TOKENS, NAMED_POSITIONS_2X2

    boards = [r for r in read(ci_data / "backbone_text.jsonl") if r["type"] == "describe_board"]
    assert boards
    for record in boards:
        board, instruction = record["conversations"][0]["value"].split("\n")
        cells = board.replace("><", ">\n<").split("\n")
        assert len(cells) == 4 and all(cell in CELL_TOKENS for cell in cells)
        described = record["conversations"][1]["value"].rstrip(".").split(", ")
        occupied = [(NAMED_POSITIONS_2X2[i], cell) for i, cell in enumerate(cells) if cell != "<empty>"]
        assert [f"{cell[1:-1].replace('_', ' ')} at {where}" for where, cell in occupied] == described
    assert not any(r["type"] == "describe_board" for r in read(ci_data / "text_instructions.jsonl"))


def test_reasoning_chains_restate_the_relevant_objects_then_compute_and_score_as_the_answer():
    """``data.text_answers: reasoning``: each chain lists exactly the objects its question is about,
    in the caption's words, counts them, computes, and ends on the answer the scorer extracts."""
    from vift.data.world import sample_arithmetic, sample_scene
    from vift.scoring.answers import extract_answer, is_correct

    seen = set()
    for index in range(400):
        rng = split_rng(0, "chains", index)
        scene = sample_scene(rng, 3, 0, 6)
        question = sample_question(rng, scene) if index % 4 else sample_arithmetic(rng, 16)
        seen.add(question.type)
        chain = question.reasoning
        assert chain.endswith(f"so the answer is {question.answer}.")
        extracted = extract_answer(chain, question.answer)
        assert extracted == question.answer and is_correct(extracted, question.answer)
        if question.type.startswith("arith"):
            continue
        words = question.text.split()
        # The restated objects: the caption's own phrases for exactly the objects asked about.
        phrases = [p for part in chain.split(". ") if " are " in part for p in part.rsplit(" are ", 1)[1].split(", ")]
        if question.type == "count_plus":
            wanted = [o for o in scene.objects if f"{o.shape}s" == words[2]]
        elif question.type == "remove_colour":
            wanted = [o for o in scene.objects if o.colour != words[-4]]
        elif question.type == "double_count":
            wanted = [o for o in scene.objects if o.colour == words[-2]]
        else:
            wanted = [o for o in scene.objects if o.colour == words[3]] + [o for o in scene.objects if o.colour == words[6]]
        described = [f"{o.colour} {o.shape} at {scene.position_name(o.cell)}" for o in wanted]
        assert [p for p in phrases if p != "none"] == described
        if question.type != "compare_colours":
            assert f". that is {len(wanted)}." in chain
    assert seen == {*QUESTION_TYPES, "arith_add", "arith_subtract", "arith_double", "arith_greater"}


def test_reasoning_answers_change_the_text_instructions_only(ci_params, ci_data, tmp_path):
    chained = apply_overrides(ci_params, {"data.text_answers": "reasoning"}).data
    summary = generate_shapetally(chained, tmp_path / "chained")
    original = json.loads((ci_data / "summary.json").read_text())["sha256"]
    assert [s for s in SPLITS if summary["sha256"][s] != original[s]] == ["text_instructions"]
    short, long = read(ci_data / "text_instructions.jsonl"), read(tmp_path / "chained" / "text_instructions.jsonl")
    for a, b in zip(short, long):
        assert a["conversations"][0] == b["conversations"][0]  # same scene, same question
        assert b["conversations"][1]["value"].endswith(f"so the answer is {a['conversations'][1]['value']}.")


def test_backbone_reasoning_answers_change_the_backbone_text_only(ci_params, ci_data, tmp_path):
    chained = apply_overrides(ci_params, {"data.backbone_answers": "reasoning"}).data
    summary = generate_shapetally(chained, tmp_path / "chained")
    original = json.loads((ci_data / "summary.json").read_text())["sha256"]
    assert [s for s in SPLITS if summary["sha256"][s] != original[s]] == ["backbone_text"]
    changed = 0
    for a, b in zip(read(ci_data / "backbone_text.jsonl"), read(tmp_path / "chained" / "backbone_text.jsonl")):
        assert a["conversations"][0] == b["conversations"][0]
        if a["type"] == "describe_board":  # board descriptions are not questions: unchanged
            assert a == b
        else:
            changed += 1
            assert b["conversations"][1]["value"].endswith(f"so the answer is {a['conversations'][1]['value']}.")
    assert changed > 0


def test_reasoning_answers_are_refused_for_imported_data():
    import pytest
    from pydantic import ValidationError

    from vift.config.schema import DataParams

    for name in ("text_answers", "backbone_answers"):
        with pytest.raises(ValidationError, match=f"{name} applies to generated data"):
            DataParams(source="import", import_dir="data/external", **{name: "reasoning"})
