"""The benchmarks' dataset-hub parquet layouts: the same records as the JSON layouts, images embedded,
shards, the official rule-based scoring, and `vift eval` on a hub folder.

The parquet fixtures are written here, from the hand-written JSON fixtures, in the hub's schemas:
MathVista and MathVision keep a relative ``image`` path beside ``decoded_image`` (the hub's image
feature, a struct of ``bytes`` and ``path``); MathVerse embeds its image in ``image`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_benchmarks import FIXTURES, run_eval

from vift.benchmarks.formats import load_benchmark
from vift.benchmarks.scoring import rule_coverage, rule_score
from vift.data.manifests import VQARecord
from vift.errors import UserError

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLUMNS = {
    "mathvista": {"pid": pa.string(), "question": pa.string(), "image": pa.string(), "decoded_image": IMAGE,
                  "choices": pa.list_(pa.string()), "unit": pa.string(), "precision": pa.float64(),
                  "answer": pa.string(), "question_type": pa.string(), "answer_type": pa.string(), "metadata": None,
                  "query": pa.string()},
    "mathverse": {"sample_index": pa.string(), "problem_index": pa.string(), "problem_version": pa.string(),
                  "question": pa.string(), "image": IMAGE, "answer": pa.string(), "question_type": pa.string(),
                  "metadata": None, "query_wo": pa.string(), "query_cot": pa.string(),
                  "question_for_eval": pa.string()},
    "mathvision": {"id": pa.string(), "question": pa.string(), "options": pa.list_(pa.string()),
                   "image": pa.string(), "decoded_image": IMAGE, "answer": pa.string(), "solution": pa.string(),
                   "level": pa.int64(), "subject": pa.string()},
}  # fmt: skip
HUB_FILES = {
    "mathvista": "data/testmini-00000-of-00001-5b0d7b1e9a3c.parquet",
    "mathverse": "testmini.parquet",
    "mathvision": "data/testmini-00000-of-00001-f8ff70fcb2f2.parquet",
}


def json_records(benchmark: str) -> list[dict]:
    folder = FIXTURES / benchmark
    if benchmark == "mathvista":
        return list(json.loads((folder / "testmini.json").read_text()).values())
    if benchmark == "mathverse":
        return json.loads((folder / "testmini.json").read_text())
    return [json.loads(line) for line in (folder / "testmini.jsonl").read_text().splitlines() if line.strip()]


def hub_rows(benchmark: str) -> list[dict]:
    """The JSON fixture's records as the hub stores them: image bytes embedded."""
    loaded = {r.id: r for r in load_benchmark(benchmark, FIXTURES / benchmark)[0]}
    key = {"mathvista": "pid", "mathverse": "sample_index", "mathvision": "id"}[benchmark]
    rows = []
    for raw in json_records(benchmark):
        image_file = loaded[str(raw[key])].image
        embedded = {"bytes": (FIXTURES / benchmark / image_file).read_bytes(), "path": Path(image_file).name} if image_file else None
        row = dict(raw)
        if benchmark == "mathverse":
            row["image"] = embedded  # MathVerse: the image feature itself; Text Only rows have none
        else:
            row["decoded_image"] = embedded
        rows.append(row)
    return rows


def write_hub(benchmark: str, rows: list[dict], path: Path) -> Path:
    fields = []
    for name, kind in COLUMNS[benchmark].items():
        kind = kind or pa.array([r.get(name) for r in rows]).type  # metadata: a struct, as the hub infers it
        fields.append(pa.field(name, kind))
    schema = pa.schema(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema), path)
    return path


def hub_folder(benchmark: str, root: Path, rows: list[dict] | None = None) -> Path:
    folder = root / f"{benchmark}-hub"
    write_hub(benchmark, hub_rows(benchmark) if rows is None else rows, folder / HUB_FILES[benchmark])
    return folder


@pytest.mark.parametrize("benchmark", ["mathvista", "mathverse", "mathvision"])
def test_hub_parquet_gives_the_same_records_as_the_json_layout(benchmark, tmp_path):
    folder = hub_folder(benchmark, tmp_path)
    records, annotation, image_dir = load_benchmark(benchmark, folder, image_dir=tmp_path / "images")
    assert annotation == folder / HUB_FILES[benchmark]
    expected = load_benchmark(benchmark, FIXTURES / benchmark)[0]
    assert [r.id for r in records] == [r.id for r in expected]
    for got, want in zip(records, expected):
        assert got.model_dump(exclude={"image"}) == want.model_dump(exclude={"image"})
        if want.image is None:
            assert got.image is None  # MathVerse Text Only: asked without an image
        else:  # the embedded bytes, written into the image folder
            assert (image_dir / got.image).read_bytes() == (FIXTURES / benchmark / want.image).read_bytes()
    if benchmark == "mathverse":
        assert {r.type for r in records} >= {"Vision Only", "Text Dominant"}


def test_every_shard_of_a_split_is_read_in_order_and_a_missing_one_is_an_error(tmp_path):
    rows = hub_rows("mathvista")
    folder = tmp_path / "mathvista"
    write_hub("mathvista", rows[:3], folder / "data" / "testmini-00000-of-00002-aa11.parquet")
    second = write_hub("mathvista", rows[3:], folder / "data" / "testmini-00001-of-00002-bb22.parquet")
    write_hub("mathvista", rows[:1], folder / "data" / "test-00000-of-00001-cc33.parquet")  # another split
    records, annotation, _ = load_benchmark("mathvista", folder, image_dir=tmp_path / "images")
    assert [r.id for r in records] == ["1", "2", "3", "4"] and annotation.name.startswith("testmini-00000")
    assert [r.id for r in load_benchmark("mathvista", folder, limit=2, image_dir=tmp_path / "i2")[0]] == ["1", "2"]
    second.unlink()
    with pytest.raises(UserError, match=r"shard testmini-00001-of-00002\*\.parquet of this split is missing") as error:
        load_benchmark("mathvista", folder, image_dir=tmp_path / "images")
    assert error.value.exit_code == 2


def test_text_only_file_is_read_with_file(tmp_path):
    rows = [r for r in hub_rows("mathverse") if r["problem_version"] == "Text Only"]
    folder = hub_folder("mathverse", tmp_path)
    write_hub("mathverse", rows, folder / "testmini_text_only.parquet")
    records, _, _ = load_benchmark("mathverse", folder, file="testmini_text_only.parquet", image_dir=tmp_path / "images")
    assert [(r.id, r.image, r.type) for r in records] == [("3", None, "Text Only")]


def _with(rows: list[dict], index: int, **changes) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[index].update(changes)
    return rows


@pytest.mark.parametrize(
    "benchmark, rows, expected",
    [
        ("mathvista", lambda r: _with(r, 1, decoded_image={"bytes": b"\x89PNG\r\n not really", "path": "2.png"}),
         ["row 1", "embedded image unreadable"]),
        # no bytes: the relative path is looked up in the data folder, and may not leave it
        ("mathvista", lambda r: _with(r, 0, decoded_image=None, image="../../../etc/passwd"), ["row 0", "escapes the data folder"]),
        # the struct's own path is the uploader's file name, never opened here
        ("mathvision", lambda r: _with(r, 0, image=None, decoded_image={"bytes": None, "path": "/etc/hostname"}),
         ["row 0", "field 'image' is missing"]),
        ("mathvision", lambda r: _with(r, 2, answer="E", options=["1", "2"]), ["row 2", "not an option letter"]),
        ("mathvista", lambda r: _with(r, 2, precision=None), ["row 2", "needs a precision"]),
    ],
    ids=["corrupt-embedded-image", "escaping-path", "struct-path-not-opened", "bad-answer", "float-without-precision"],
)  # fmt: skip
def test_bad_hub_rows_name_the_file_the_row_and_the_problem(benchmark, rows, expected, tmp_path):
    folder = hub_folder(benchmark, tmp_path, rows(hub_rows(benchmark)))
    with pytest.raises(UserError) as error:
        load_benchmark(benchmark, folder, image_dir=tmp_path / "images")
    assert error.value.exit_code == 2
    assert str(folder / HUB_FILES[benchmark]) in str(error.value)
    for part in expected:
        assert part in str(error.value)


def test_a_corrupt_parquet_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "mathvision"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "testmini-00000-of-00001-0.parquet").write_bytes(b"PAR1 this is no parquet PAR1")
    with pytest.raises(UserError, match="not a readable parquet file") as error:
        load_benchmark("mathvision", folder, image_dir=tmp_path / "images")
    assert error.value.exit_code == 2


# --- official rule-based scoring ---------------------------------------------------------------------


def _record(**fields) -> VQARecord:
    return VQARecord(id="1", question="Q", **fields)


@pytest.mark.parametrize(
    "record, response, extracted, correct",
    [
        # MathVista: a stated answer that is neither letter nor option text → the nearest option
        (dict(answer="equal to", choices=["larger than", "equal to", "smaller than"], benchmark="mathvista"),
         "So the answer is: equal.", "B", True),
        # ... but prose that states no answer is no answer (no guessing from the whole response)
        (dict(answer="equal to", choices=["larger than", "equal to", "smaller than"], benchmark="mathvista"),
         "It looks equal to me", "", False),
        # MathVerse and MathVision do not map a stated answer to the nearest option
        (dict(answer="B", choices=["larger than", "equal to", "smaller than"], benchmark="mathverse"),
         "So the answer is: equal.", "", False),
        # MathVista floats: str(round(x, precision)) against the gold string
        (dict(answer="1.5", benchmark="mathvista", answer_type="float", precision=1), "It is 1.46.", "1.46", True),
        (dict(answer="1.50", benchmark="mathvista", answer_type="float", precision=2), "It is 1.5.", "1.5", False),
        # MathVista integers: str(int(float(x)))
        (dict(answer="3", benchmark="mathvista", answer_type="integer"), "About 3.7 apples", "3.7", True),
        # MathVision: numbers equal to 2 decimals; MathVerse: relative tolerance 1e-4
        (dict(answer="0.33", benchmark="mathvision", answer_type="text"), "The answer is 1/3", "1/3", True),
        (dict(answer="0.33", benchmark="mathverse", answer_type="text"), "The answer is 1/3", "1/3", False),
        # MathVision multiple choice: the gold option's text counts
        (dict(answer="B", choices=["3", "4", "5"], benchmark="mathvision"), "The answer is 4", "B", True),
    ],
)  # fmt: skip
def test_official_rule_scoring(record, response, extracted, correct):
    result = rule_score(_record(**record), response)
    assert (result["extracted"], result["correct"]) == (extracted, correct)


def test_rule_coverage_is_the_share_of_responses_the_rules_read():
    records = [_record(answer="5", benchmark="mathverse", answer_type="text")] * 4
    assert rule_coverage("mathverse", records, ["5", "six", "The answer is 7", "no idea"]) == 0.5
    assert rule_coverage("mathverse", [], []) is None


# --- vift eval on a hub folder -----------------------------------------------------------------------


def test_eval_command_reads_a_hub_parquet_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import tempfile

    folder = hub_folder("mathvista", tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    argv = ["--benchmark", "mathvista", "--data", str(folder), "--model", str(tiny_checkpoint),
            "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert run_eval(argv, tmp_path / "no-params.yaml") == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["id"] for r in rows] == ["1", "2", "3", "4"] and metrics["n"] == 4
    assert metrics["annotation_file"] == str(folder / HUB_FILES["mathvista"])
    assert metrics["rule_coverage"] == pytest.approx(sum(bool(r["extracted"]) for r in rows) / 4)
    assert metrics["prompt_template"].startswith("Question: {question}") and metrics["max_new_tokens"] == 4
    assert metrics["extraction"].startswith("rules:") and "edit distance" in metrics["extraction"]
    assert list((tmp_path / "tmp").iterdir()) == []  # the embedded images were written for the run only
    assert "MathVista testmini: 4 items" in capsys.readouterr().out
