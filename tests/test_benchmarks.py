"""Real benchmark layouts (MathVista / MathVerse / MathVision testmini), their scoring, and `vift eval`."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from vift.benchmarks.formats import load_benchmark
from vift.benchmarks.scoring import make_scorer, rule_score
from vift.benchmarks.specs import FREE_FORM_INSTRUCTION, IMAGE_QUESTION, MC_INSTRUCTION
from vift.errors import UserError
from vift.eval.cli import add_commands

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def records_of(benchmark: str, **kwargs) -> dict:
    records, _, _ = load_benchmark(benchmark, FIXTURES / benchmark, **kwargs)
    return {r.id: r for r in records}


def copy_fixture(benchmark: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / benchmark, tmp_path / benchmark))


def run_eval(argv: list[str], params_file: Path) -> int:
    parser = argparse.ArgumentParser(prog="vift")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, lambda p: p.add_argument("--params", default=str(params_file)))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


# --- loaders -----------------------------------------------------------------------------------------


def test_mathvista_records_carry_prompt_rules_choices_and_category():
    records = records_of("mathvista")
    assert list(records) == ["1", "2", "3", "4"]
    mc = records["2"]
    assert mc.choices == ["1/4", "1/2", "3/4"] and mc.answer == "1/2" and mc.image == "images/2.png"
    assert mc.question == f"Question: What part is blue?\nChoices:\n(A) 1/4\n(B) 1/2\n(C) 3/4\n{MC_INSTRUCTION}"
    assert records["1"].question.endswith("requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.")
    assert "(Unit: cm)" in records["3"].question and "with one decimal place" in records["3"].question
    assert records["4"].question.endswith("provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    assert {r.type for r in records.values()} == {"general-vqa", "math-targeted-vqa"}
    assert records["3"].model_extra["precision"] == 1 and records["4"].model_extra["answer_type"] == "list"


def test_mathverse_parses_inline_choices_images_folder_and_text_only_items():
    records = records_of("mathverse")
    mc = records["1"]
    assert mc.choices == ["40°", "60°", "120°", "140°"] and mc.answer == "A"
    assert mc.image == "images/images_version_1-4/image_1.png"
    assert mc.question.endswith(MC_INSTRUCTION)
    assert records["2"].question == f"{IMAGE_QUESTION}\n{FREE_FORM_INSTRUCTION}"  # Vision Only: empty question
    assert records["3"].image is None  # Text Only: asked without an image
    assert [r.type for r in records.values()] == ["Text Dominant", "Vision Only", "Text Only"]
    assert records["2"].model_extra["judge_question"] == "How far apart are Ned and Bart, to one decimal place?"


def test_mathvision_drops_image_placeholders_and_keeps_letter_answers():
    records = records_of("mathvision")
    assert "<image1>" not in records["1"].question and "<image1>" not in records["2"].question
    assert records["1"].choices == ["3", "4", "5", "6", "7"] and records["1"].answer == "B"
    assert records["1"].question.endswith("(E) 7\n" + MC_INSTRUCTION)
    assert records["2"].choices is None and records["2"].question.endswith(FREE_FORM_INSTRUCTION)
    assert [r.type for r in records.values()] == ["counting", "arithmetic", "metric geometry - area"]


def test_limit_keeps_file_order_and_breakdown_picks_the_type_key():
    records = records_of("mathvista", limit=2, breakdown="question_type")
    assert list(records) == ["1", "2"]
    assert [r.type for r in records.values()] == ["free_form", "multi_choice"]
    assert [r.type for r in records_of("mathvision", breakdown="level").values()] == ["1", "2", "3"]


def test_prompt_field_asks_the_benchmarks_own_query_verbatim():
    raw = json.loads((FIXTURES / "mathvista" / "testmini.json").read_text())
    records = records_of("mathvista", prompt_field="query")
    assert all(records[pid].question == raw[pid]["query"] for pid in raw)
    assert records_of("mathverse", prompt_field="query_wo")["3"].question.startswith("Please directly answer")


def test_data_may_point_at_the_annotation_file_itself():
    records, path, data_dir = load_benchmark("mathvision", FIXTURES / "mathvision" / "testmini.jsonl")
    assert path.name == "testmini.jsonl" and data_dir == FIXTURES / "mathvision" and len(records) == 3


def _mutate_json(folder: Path, name: str, change) -> None:
    path = folder / name
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def _mutate_jsonl(folder: Path, name: str, index: int, change) -> None:
    path = folder / name
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines[index])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize(
    "benchmark, mutate, expected",
    [
        (
            "mathvista",
            lambda d: _mutate_json(d, "testmini.json", lambda c: c["2"].update(answer="2/3")),
            ["pid 2", "answer '2/3' is not one of the choices"],
        ),
        ("mathvista", lambda d: _mutate_json(d, "testmini.json", lambda c: c["3"].update(precision=None)), ["pid 3", "needs a precision"]),
        (
            "mathvista",
            lambda d: _mutate_json(d, "testmini.json", lambda c: c["1"].update(image="../../outside.png")),
            ["pid 1", "escapes the data folder"],
        ),
        ("mathvista", lambda d: (d / "images" / "4.png").unlink(), ["pid 4", "image 'images/4.png' not found"]),
        ("mathvista", lambda d: (d / "images" / "2.png").write_bytes(b"not a png"), ["pid 2", "image unreadable or corrupt"]),
        (
            "mathvista",
            lambda d: (d / "testmini.json").write_text('{"1": {"question": "x",\n "image": }}'),
            ["testmini.json:2:", "malformed JSON"],
        ),
        (
            "mathverse",
            lambda d: _mutate_json(d, "testmini.json", lambda c: c[0].update(answer="Z")),
            ["record 0 (sample_index 1)", "not an option letter"],
        ),
        (
            "mathverse",
            lambda d: _mutate_json(d, "testmini.json", lambda c: c[1].update(question_type="essay")),
            ["sample_index 2", "question_type 'essay'"],
        ),
        (
            "mathverse",
            lambda d: _mutate_json(d, "testmini.json", lambda c: c[2].update(sample_index="1")),
            ["sample_index 1", "duplicate id '1'"],
        ),
        (
            "mathvision",
            lambda d: _mutate_jsonl(d, "testmini.jsonl", 1, lambda r: r.pop("answer")),
            ["line 2 (id 2)", "field 'answer' is missing"],
        ),
        (
            "mathvision",
            lambda d: _mutate_jsonl(d, "testmini.jsonl", 0, lambda r: r.update(answer="F")),
            ["line 1 (id 1)", "not an option letter of 5 options"],
        ),
    ],
    ids=[
        "not-a-choice",
        "float-without-precision",
        "escaping-image",
        "missing-image",
        "corrupt-image",
        "malformed-json",
        "bad-letter",
        "bad-question-type",
        "duplicate-id",
        "missing-answer",
        "letter-out-of-range",
    ],  # fmt: skip
)
def test_bad_benchmark_files_name_file_record_and_problem(tmp_path, benchmark, mutate, expected):
    folder = copy_fixture(benchmark, tmp_path)
    mutate(folder)
    with pytest.raises(UserError) as raised:
        load_benchmark(benchmark, folder)
    message = str(raised.value)
    assert str(folder) in message and all(part in message for part in expected), message


def test_missing_annotation_file_lists_what_was_tried(tmp_path):
    with pytest.raises(
        UserError,
        match=r"no MathVerse testmini annotation file found \(tried testmini.json, data/testmini.json, testmini.parquet, .*data/testmini-\*.parquet\)",
    ):
        load_benchmark("mathverse", tmp_path)


# --- scoring -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "benchmark, record_id, response, extracted, correct",
    [
        ("mathvista", "2", "The answer is (B) 1/2.", "B", True),
        ("mathvista", "2", "1/2", "B", True),  # the option's text
        ("mathvista", "2", "I think C.", "C", False),
        ("mathvista", "2", "A cat is drawn here.", "", False),  # "A" as an article is no answer
        ("mathvista", "1", "There is 1 dot.", "1", True),
        ("mathvista", "3", "About 1.54 cm wide.", "1.54", True),  # rounded to precision 1
        ("mathvista", "3", "1.6", "1.6", False),
        ("mathvista", "4", "It peaks between [2007, 2008].", "[2007, 2008]", True),
        ("mathverse", "1", "So angle C is 40°, \\boxed{A}", "A", True),
        ("mathverse", "1", "Answer: C", "C", False),
        ("mathverse", "2", "d is approximately 22.30 meters.", "22.30", True),
        ("mathvision", "3", "The shaded part is \\frac{1}{2}.", "\\frac{1}{2}", True),
        ("mathvision", "3", "So the answer is 0.5", "0.5", True),
        ("mathvision", "3", "1/3", "1/3", False),
        ("mathvision", "1", "B. Four stars", "B", True),
        ("mathvision", "2", "I am not sure.", "", False),
    ],
)
def test_rule_based_benchmark_scoring(benchmark, record_id, response, extracted, correct):
    result = rule_score(records_of(benchmark)[record_id], response)
    assert (result["extracted"], result["correct"]) == (extracted, correct)


@pytest.mark.parametrize(
    "response, correct",
    [("So BC = $2\\sqrt{3}$", True), ("The answer is 2√3.", True), ("BC = 2\\sqrt{2}", False), ("I don't know", False)],
)
def test_symbolic_free_form_answers_compare_as_normalised_latex(response, correct):
    from vift.data.manifests import VQARecord

    record = VQARecord(id="1", question="How long is BC?", answer="2\\sqrt{3}", benchmark="mathvision", answer_type="text")
    assert rule_score(record, response)["correct"] is correct


def test_vqa_benchmark_keeps_the_ablation_rules():
    from vift.data.manifests import VQARecord

    record = VQARecord(id="1", question="How many?", answer="5")
    assert make_scorer("vqa")(record, "There are five.") == {"extracted": "five", "correct": True, "scored_by": "rules"}


# --- vift eval ---------------------------------------------------------------------------------------


def _outputs(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("benchmark", ["mathvista", "mathverse", "mathvision"])
def test_eval_command_writes_consistent_predictions_and_metrics(benchmark, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--benchmark", benchmark, "--data", str(FIXTURES / benchmark), "--model", str(tiny_checkpoint),
            "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert run_eval(argv, tmp_path / "no-params.yaml") == 0
    rows, metrics = _outputs(out)
    records = records_of(benchmark)
    assert [r["id"] for r in rows] == list(records)  # one prediction per record, in order
    assert {"id", "question", "type", "prediction", "extracted", "gold", "correct"} <= set(rows[0])
    assert metrics["n"] == len(rows) and metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert {t: part["n"] for t, part in metrics["by_type"].items()} == {
        t: sum(r["type"] == t for r in rows) for t in {r["type"] for r in rows}
    }
    assert metrics["no_answer"] == sum(not r["extracted"] for r in rows)
    assert metrics["scoring"] == "rules" and metrics["fusion"] is None and metrics["max_new_tokens"] == 4
    for row in rows:
        record = records[row["id"]]
        assert row["question"] == record.question and row["gold"] == record.answer
        assert row["correct"] == rule_score(record, row["prediction"])["correct"]
        if record.choices:
            assert row["question"].endswith(MC_INSTRUCTION)
    printed = capsys.readouterr().out
    assert "ALL" in printed and f"{len(rows)} items" in printed


def test_eval_scores_known_responses_per_category(tiny_checkpoint, tmp_path, monkeypatch):
    canned = {"1": "I see 1 dot.", "2": "Half is blue: (B)", "3": "It is 1.62 cm.", "4": "[2007, 2008]"}
    by_question = {r.question: canned[r.id] for r in records_of("mathvista").values()}
    monkeypatch.setattr(
        "vift.eval.runner.fused_generate", lambda model, processor, images, questions, fusion, **kw: [by_question[q] for q in questions]
    )
    out = tmp_path / "out"
    argv = ["--benchmark", "mathvista", "--data", str(FIXTURES / "mathvista"), "--model", str(tiny_checkpoint), "--out", str(out)]
    assert run_eval(argv, tmp_path / "no-params.yaml") == 0
    rows, metrics = _outputs(out)
    assert [(r["extracted"], r["correct"]) for r in rows] == [("1", True), ("B", True), ("1.62", False), ("[2007, 2008]", True)]
    assert metrics["accuracy"] == 0.75 and metrics["no_answer"] == 0
    assert {t: (p["n"], p["accuracy"]) for t, p in metrics["by_type"].items()} == {"general-vqa": (2, 1.0), "math-targeted-vqa": (2, 0.5)}


def _fused_eval(tiny_checkpoint, tmp_path, *extra: str):
    """`vift eval` of the tiny checkpoint on three MathVista items with an additive fusion file,
    batch 2, 3 new tokens: (the fusion, the output folder, its rows, its metrics)."""
    from vift.fusion.method import FusionSpec

    spec = FusionSpec(mode="additive", a=0.5, b=0.5, layer_start=1)
    fusion_file = tmp_path / "fusion.json"
    fusion_file.write_text(json.dumps({"fusion": spec.to_dict(), "calibration": {}}))
    out = tmp_path / "out"
    argv = ["--benchmark", "mathvista", "--data", str(FIXTURES / "mathvista"), "--model", str(tiny_checkpoint),
            "--fusion", str(fusion_file), "--limit", "3", "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out), *extra]  # fmt: skip
    assert run_eval(argv, tmp_path / "no-params.yaml") == 0
    return spec, out, *_outputs(out)


def test_eval_with_a_fusion_file_answers_as_fused_generate_does(tiny_checkpoint, tmp_path):
    from PIL import Image

    from vift.fusion.method import fused_generate
    from vift.model.loading import load_model, load_processor

    spec, _, rows, metrics = _fused_eval(tiny_checkpoint, tmp_path)
    assert metrics["fusion"] == spec.to_dict()
    records = list(records_of("mathvista", limit=3).values())
    images = [Image.open(FIXTURES / "mathvista" / r.image).convert("RGB") for r in records]
    model, processor = load_model(tiny_checkpoint).eval(), load_processor(tiny_checkpoint)
    expected = fused_generate(model, processor, images, [r.question for r in records], spec, batch_size=2, max_new_tokens=3)
    assert [r["prediction"] for r in rows] == expected


def test_eval_controls_answer_without_the_image_with_another_and_with_a_black_one_and_count_helped_and_hurt(tiny_checkpoint, tmp_path):
    from PIL import Image

    from vift.eval.ablation import wrong_image_order
    from vift.fusion.method import fused_generate
    from vift.model.loading import load_model, load_processor
    from vift.scoring.stats import paired_comparison

    spec, out, rows, metrics = _fused_eval(tiny_checkpoint, tmp_path, "--controls")
    records = list(records_of("mathvista", limit=3).values())
    questions = [r.question for r in records]
    images = [Image.open(FIXTURES / "mathvista" / r.image).convert("RGB") for r in records]
    model, processor = load_model(tiny_checkpoint).eval(), load_processor(tiny_checkpoint)
    order = wrong_image_order(3, 0)
    expected = {
        "question_only": fused_generate(model, processor, None, questions, None, batch_size=2, max_new_tokens=3),
        "wrong_image": fused_generate(model, processor, [images[j] for j in order], questions, spec, batch_size=2, max_new_tokens=3),
        "blank_image": fused_generate(model, processor, [Image.new("RGB", i.size) for i in images], questions, spec, batch_size=2, max_new_tokens=3),
    }  # fmt: skip
    assert set(metrics["controls"]) == set(expected) and order != [0, 1, 2]
    for control, answers in expected.items():
        control_rows = [json.loads(line) for line in (out / f"predictions_{control}.jsonl").read_text().splitlines()]
        assert [r["prediction"] for r in control_rows] == answers, control
        assert metrics["controls"][control]["n"] == 3
        correct = [r["correct"] for r in control_rows]
        assert metrics["controls"][control]["accuracy"] == sum(correct) / 3
        assert metrics["paired"][f"main_vs_{control}"] == paired_comparison([r["correct"] for r in rows], correct, 1000, 0)


def test_eval_rejects_a_fusion_outside_the_models_layers_before_writing(tiny_checkpoint, tmp_path):
    fusion_file = tmp_path / "fusion.json"
    fusion_file.write_text(json.dumps({"fusion": {"a": 0.5, "b": 0.5, "layer_start": 2, "layer_end": 40}}))
    out = tmp_path / "out"
    argv = ["--benchmark", "mathvista", "--data", str(FIXTURES / "mathvista"), "--model", str(tiny_checkpoint),
            "--fusion", str(fusion_file), "--out", str(out)]  # fmt: skip
    with pytest.raises(UserError, match=r"fusion\.json: fusion layers \[2, 40\) outside the model's 4 decoder layers"):
        run_eval(argv, tmp_path / "no-params.yaml")
    assert not out.exists()


def test_eval_rejects_unknown_fusion_fields(tmp_path):
    from vift.eval.cli import load_fusion

    path = tmp_path / "fusion.json"
    path.write_text(json.dumps({"fusion": {"alpha": 1.0}}))
    with pytest.raises(UserError, match="unknown fusion field"):
        load_fusion(path)


def test_eval_is_a_vift_command():
    from vift.cli import COMMAND_MODULES

    assert "vift.eval.cli" in COMMAND_MODULES


def test_eval_runs_the_projects_vqa_manifests(ci_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    argv = ["--benchmark", "vqa", "--data", str(ci_data), "--model", str(tiny_checkpoint), "--limit", "5",
            "--max-new-tokens", "3", "--out", str(out)]  # fmt: skip
    assert run_eval(argv, tmp_path / "no-params.yaml") == 0
    rows, metrics = _outputs(out)
    first = [json.loads(line) for line in (ci_data / "test.jsonl").read_text().splitlines()[:5]]
    assert [r["id"] for r in rows] == [f["id"] for f in first] and [r["gold"] for r in rows] == [str(f["answer"]) for f in first]
    assert metrics["n"] == 5 and metrics["breakdown"] == "type"


def test_eval_names_the_model_option_when_the_checkpoint_is_missing(tmp_path):
    argv = [
        "--benchmark",
        "mathvision",
        "--data",
        str(FIXTURES / "mathvision"),
        "--model",
        str(tmp_path / "absent"),
        "--out",
        str(tmp_path / "out"),
    ]
    with pytest.raises(UserError, match=r"^--model .*absent is not a directory"):
        run_eval(argv, tmp_path / "no-params.yaml")
    assert not (tmp_path / "out").exists()
