"""Reasoning-chain answers: which objects they restate, against the question's relevant objects."""

from __future__ import annotations

import json

import pytest

from vift.data.manifests import VQARecord
from vift.data.world import sample_arithmetic, sample_question, sample_scene, split_rng
from vift.eval.chains import relevant_objects, restated_objects, restatement
from vift.eval.report import ablation_markdown
from vift.scoring.stats import paired_comparison


def test_every_generated_chain_restates_exactly_its_questions_relevant_objects():
    for index in range(300):
        rng = split_rng(0, "chains", index)
        scene = sample_scene(rng, 3, 0, 6)
        question = sample_question(rng, scene)
        relevant = relevant_objects(question.text, scene.describe())
        assert restated_objects(question.reasoning) == relevant
        if question.type == "remove_colour":  # the objects that remain: as many as the answer
            assert len(relevant) == int(question.answer)


@pytest.mark.parametrize(
    ("question", "relevant"),
    [
        ("How many circles are there, plus 2?", ["red circle at top left", "blue circle at center"]),
        ("How many shapes would remain if the red ones were removed?", ["blue circle at center", "blue square at bottom right"]),
        ("What is twice the number of blue shapes?", ["blue circle at center", "blue square at bottom right"]),
        ("Are there more blue shapes than red shapes?", ["blue circle at center", "blue square at bottom right", "red circle at top left"]),
        ("Are there more green shapes than red shapes?", ["red circle at top left"]),
        ("How many triangles are there, plus 4?", []),
        ("What colour is the circle?", None),  # not a ShapeTally question form
    ],
)
def test_relevant_objects_follow_the_question_form(question, relevant):
    scene = "red circle at top left, blue circle at center, blue square at bottom right."
    assert relevant_objects(question, scene) == relevant


def test_an_empty_board_has_no_relevant_objects():
    assert relevant_objects("How many circles are there, plus 1?", "an empty board.") == []


@pytest.mark.parametrize(
    ("answer", "restated"),
    [
        ("3", None),
        ("yes", None),
        ("the circles are none. that is 0. 0 plus 2 is 2. so the answer is 2.", []),
        ("the shapes that are not red are blue circle at center. that is 1. so the answer is 1.", ["blue circle at center"]),
        ("the red ones are red circle at top left. that is 1. the blue ones are none. that is 0.", ["red circle at top left"]),
        ("the circles are red circle at top left, blue", ["red circle at top left", "blue"]),  # cut off mid-chain
    ],
)
def test_restated_objects_are_read_from_each_are_sentence(answer, restated):
    assert restated_objects(answer) == restated


def _record(i: int, question: str, scene: str) -> VQARecord:
    return VQARecord(id=f"t{i}", image=f"images/t{i}.png", question=question, answer="0", scene=scene)


def test_restatement_scores_each_row_and_pairs_fused_with_its_controls():
    scene = "red circle at top left, blue circle at center."
    records = [_record(i, "How many circles are there, plus 1?", scene) for i in range(4)]
    records.append(VQARecord(id="t4", image="images/t4.png", question="What colour is it?", answer="red", scene=scene))
    right = "the circles are red circle at top left, blue circle at center. that is 2. 2 plus 1 is 3. so the answer is 3."
    wrong = "the circles are red circle at top left. that is 1. 1 plus 1 is 2. so the answer is 2."
    rows = {
        "vift_fused": [{"prediction": p} for p in (right, right, right, wrong, "red")],
        "fused_wrong_image": [{"prediction": p} for p in (wrong, right, wrong, wrong, right)],
        "question_only": [{"prediction": p} for p in ("3", "3", "2", "3", "red")],  # short answers: no chains
    }
    result = restatement(rows, records, 200, 0)
    assert set(result["rows"]) == {"vift_fused", "fused_wrong_image"}  # the last question's form is unknown: 4 items
    fused, control = result["rows"]["vift_fused"], result["rows"]["fused_wrong_image"]
    assert (fused["accuracy"], fused["chains"], fused["n"]) == (0.75, 1.0, 4) and control["accuracy"] == 0.25
    assert result["paired"] == {
        "vift_fused_vs_fused_wrong_image": paired_comparison([True, True, True, False], [False, True, False, False], 200, 0)
    }
    assert restatement({"vift_fused": rows["question_only"]}, records, 200, 0) is None  # no chains anywhere
    assert restatement(rows, [_record(i, "What colour is it?", scene) for i in range(5)], 200, 0) is None


def test_the_ablation_table_shows_restatement_when_measured():
    row = {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 10, "by_type": {}}
    pair = {"difference": 0.25, "ci95": [0.1, 0.4], "only_first_correct": 3, "only_second_correct": 0, "mcnemar_p": 0.25}
    metrics = {
        "rows": {"vift_fused": row},
        "paired": {},
        "verdict": {"fusion_beats_controls": False, "beats": {}, "rule": "r"},
        "restated": {"rows": {"vift_fused": {**row, "chains": 0.9}}, "paired": {"vift_fused_vs_fused_wrong_image": pair}},
    }
    fusion = {"mode": "additive", "positions": "question", "layer_start": 0, "layer_end": 4, "a": 1, "b": 0, "w_vis": 1, "w_text": 0}
    text = ablation_markdown(metrics, fusion, "t")
    assert "| vift_fused | 50.0 | 40.0–60.0 | 10 | 90.0 |" in text
    assert "vift_fused_vs_fused_wrong_image: +25.0 pp [+10.0, +40.0], McNemar p 0.25." in text
    without = {key: value for key, value in metrics.items() if key != "restated"}
    assert "Reasoning chains" not in ablation_markdown(without, fusion, "t")


def test_arithmetic_chains_restate_nothing():
    for index in range(40):
        question = sample_arithmetic(split_rng(0, "arithmetic", index), 10)
        assert question.reasoning and restated_objects(question.reasoning) is None


def test_the_base_stages_text_check_scores_chains_by_the_answer_they_end_on(monkeypatch, ci_data):
    from vift import paths
    from vift.stages import base

    monkeypatch.setattr(paths, "DATA_DIR", ci_data)
    asked = []

    def answers(model, processor, images, prompts, batch_size, max_new_tokens):
        asked.append(max_new_tokens)
        records = [json.loads(line) for line in (ci_data / "test.jsonl").read_text().splitlines()][: len(prompts)]
        # Every first answer right, as a chain; every second one the chain of a wrong answer.
        return [f"the circles are none. so the answer is {r['answer'] if i % 2 == 0 else '99'}." for i, r in enumerate(records)]

    monkeypatch.setattr(base, "generate_answers", answers)
    chained = base.text_accuracy(None, None, 8, chains=True)
    short = base.text_accuracy(None, None, 8)
    assert asked == [base.CHAIN_TOKENS, 4]
    assert chained["accuracy"] == pytest.approx((chained["n"] + 1) // 2 / chained["n"]) and short["accuracy"] == 0.0
