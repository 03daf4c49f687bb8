"""Manifest loaders: streaming, validation, file:line messages, skip-or-fail policy."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pytest
from PIL import Image

from vift.data.manifests import (
    LoadReport,
    Manifest,
    caption_instruction,
    check_image,
    image_problem,
    load_rgb,
    referenced_files,
)
from vift.errors import UserError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def broken_manifest(ci_data, tmp_path):
    """Four good caption records, plus a malformed line, a missing image and an escaping path."""
    shutil.copytree(ci_data / "images", tmp_path / "images")
    good = [json.loads(line) for line in (ci_data / "captions.jsonl").read_text().splitlines()[:4]]
    missing = dict(good[0], id="missing", image="images/captions/nope.png")
    escaping = dict(good[0], id="escape", image="../../etc/passwd")
    lines = [json.dumps(good[0]), '{"id": "broken", "conversations": [', json.dumps(good[1]), json.dumps(missing),
             json.dumps(good[2]), json.dumps(escaping), json.dumps(good[3])]  # fmt: skip
    path = tmp_path / "captions.jsonl"
    write_lines(path, lines)
    return path


def test_three_bad_records_give_three_file_line_messages(broken_manifest):
    manifest = Manifest(broken_manifest, "conversation", policy="skip")
    loaded = [r.id for r in manifest]
    assert len(loaded) == 4 and "missing" not in loaded and "escape" not in loaded
    problems = manifest.report.problems
    assert len(problems) == 3 and manifest.report.skipped == 3
    assert problems[0].startswith(f"{broken_manifest}:2: malformed JSON")
    assert problems[1].startswith(f"{broken_manifest}:4: image not found")
    assert problems[2].startswith(f"{broken_manifest}:6: image path '../../etc/passwd' escapes the image root")


def test_fail_policy_stops_at_the_first_bad_record(broken_manifest):
    with pytest.raises(UserError) as caught:
        list(Manifest(broken_manifest, "conversation", policy="fail"))
    assert f"{broken_manifest}:2:" in str(caught.value) and caught.value.exit_code == 2


def test_corrupt_image_is_reported(ci_data, tmp_path):
    record = json.loads((ci_data / "captions.jsonl").read_text().splitlines()[0])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    write_lines(tmp_path / "m.jsonl", [json.dumps(dict(record, image="images/bad.png"))])
    manifest = Manifest(tmp_path / "m.jsonl", "conversation")
    assert list(manifest) == []
    assert "m.jsonl:1: image unreadable or corrupt" in manifest.report.problems[0]


def test_schema_problems_name_the_field(tmp_path):
    records = [
        {"id": "a", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "c", "question": "q?"},
    ]
    write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in records])
    manifest = Manifest(tmp_path / "m.jsonl", "conversation")
    assert list(manifest) == []
    first, second, third = manifest.report.problems
    assert ":1:" in first and "conversations[0].from must be 'human'" in first
    assert ":2:" in second and "<image> token in a record without an image" in second
    assert ":3:" in third and "conversations: Field required" in third


def test_json_array_records_report_their_lines(ci_data, tmp_path):
    records = [json.loads(line) for line in (ci_data / "test.jsonl").read_text().splitlines()[:3]]
    records[1]["answer"] = None
    text = "[\n" + ",\n".join(json.dumps(r, indent=1) for r in records) + "\n]\n"
    (tmp_path / "images").symlink_to(ci_data / "images")
    (tmp_path / "vqa.json").write_text(text)
    manifest = Manifest(tmp_path / "vqa.json", "vqa")
    assert [r.id for r in manifest] == [records[0]["id"], records[2]["id"]]
    second_start = text.splitlines().index("{", 2) + 1
    assert manifest.report.problems[0].startswith(f"{tmp_path / 'vqa.json'}:{second_start}: invalid record: answer")


def _peak_while_streaming(path) -> int:
    tracemalloc.start()
    try:
        for _ in Manifest(path, "conversation", check_images=False):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_streaming_memory_is_flat_in_manifest_size(ci_data, tmp_path, layout):
    lines = (ci_data / "backbone_text.jsonl").read_text().splitlines()[:300]
    small, large = tmp_path / f"small.{layout}", tmp_path / f"large.{layout}"
    for path, copies in ((small, 1), (large, 10)):
        body = lines * copies
        path.write_text("\n".join(body) + "\n" if layout == "jsonl" else "[\n" + ",\n".join(body) + "\n]\n")
    _peak_while_streaming(small)  # warm caches (pydantic, json) before measuring
    ratio = _peak_while_streaming(large) / _peak_while_streaming(small)
    assert ratio <= 1.2, f"peak memory grew {ratio:.2f}x for 10x the records"


# --- Mutation-triage tests (docs/TESTING.md, "Mutation testing"): tmp_path files, tiny images. ---


def vqa(id_, image=None, **extra):
    return dict({"id": id_, "question": f"{id_}?", "answer": "1"}, **({"image": image} if image else {}), **extra)


def png(path, color="red", mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (2, 2), color).save(path)


def loaded(path, kind="vqa", **options):
    manifest = Manifest(path, kind, **options)
    return [r.id for r in manifest], manifest.report


def test_missing_manifest_and_non_utf8_manifest_are_input_errors_naming_the_file(tmp_path):
    for path in (tmp_path / "nope.jsonl", tmp_path):
        with pytest.raises(UserError) as caught:
            list(Manifest(path, "vqa"))
        assert str(caught.value) == f"{path}: manifest not found (or not a regular file)"
        assert caught.value.exit_code == 2
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "caf\xe9", "question": "q", "answer": "a"}\n')
    with pytest.raises(UserError) as caught:
        list(Manifest(tmp_path / "latin1.jsonl", "vqa"))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'latin1.jsonl'}: not UTF-8 text (a byte at or after offset 11 ")
    assert message.endswith("save manifests as UTF-8") and caught.value.exit_code == 2


def test_jsonl_skips_blank_lines_reports_non_objects_and_nesting_and_counts_what_it_loaded(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(vqa("a")), "", "[1, 2]", '"text"', "[" * 10_000, json.dumps(vqa("b")), "   ", json.dumps(vqa("c"))]
    write_lines(path, lines)
    manifest = Manifest(path, "vqa")
    assert manifest.report == LoadReport(path)  # nothing read yet
    assert [r.id for r in manifest] == ["a", "b", "c"]
    assert manifest.report == LoadReport(
        path,
        loaded=3,
        problems=[
            f"{path}:3: expected a JSON object, got list",
            f"{path}:4: expected a JSON object, got str",
            f"{path}:5: JSON nested too deeply",
        ],
    )


def test_validation_problems_name_each_field_by_its_dotted_path_and_join_them(tmp_path):
    write_lines(tmp_path / "v.jsonl", [json.dumps({"id": "a"})])
    assert loaded(tmp_path / "v.jsonl")[1].problems == [
        f"{tmp_path / 'v.jsonl'}:1: invalid record: question: Field required; answer: Field required"
    ]
    records = [
        {"id": "b", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "x"}]},
    ]
    write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in records])
    assert loaded(tmp_path / "c.jsonl", "conversation")[1].problems == [
        f"{tmp_path / 'c.jsonl'}:1: invalid record: conversations.0.value: Field required",
        f"{tmp_path / 'c.jsonl'}:2: invalid record: Value error, <image> token in a record without an image",
    ]


def test_a_json_array_streams_across_read_chunks_and_whitespace_runs(tmp_path):
    """The reader works in 64 KiB chunks: a record and a run of whitespace each span a boundary."""
    long = vqa("long", question="x" * 100_000)
    text = "[\n" + json.dumps(long) + ",\n" + " " * 70_000 + "\n" + json.dumps(vqa("after")) + "\n]\n"
    (tmp_path / "big.json").write_text(text)
    manifest = Manifest(tmp_path / "big.json", "vqa")
    assert [(r.id, len(r.question)) for r in manifest] == [("long", 100_000), ("after", 6)]
    assert manifest.report == LoadReport(tmp_path / "big.json", loaded=2)


def test_a_compact_one_line_json_array_is_an_array(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([vqa("a"), vqa("b")]))
    assert loaded(tmp_path / "a.json") == (["a", "b"], LoadReport(tmp_path / "a.json", loaded=2))


@pytest.mark.parametrize(
    ("text", "ids", "problem"),
    [
        ("[" + json.dumps(vqa("a")) + ", X" + json.dumps(vqa("b")) + "]", ["a"],
         "1: malformed JSON: Expecting value; the records after it were not read"),
        ("[\n" + json.dumps(vqa("a")) + ",\n" + "[" * 10_000 + "\n]", ["a"],
         "3: JSON nested too deeply; the records after it were not read"),
        ("\f[" + json.dumps(vqa("a")) + "]", [], "1: expected a JSON array or JSON lines"),
    ],
    ids=["stray-character", "nested-too-deeply", "form-feed-is-not-json-whitespace"],
)  # fmt: skip
def test_a_broken_json_array_stops_with_one_problem_at_its_line(tmp_path, text, ids, problem):
    (tmp_path / "a.json").write_text(text)
    assert loaded(tmp_path / "a.json") == (ids, LoadReport(tmp_path / "a.json", len(ids), [f"{tmp_path / 'a.json'}:{problem}"]))


@pytest.mark.parametrize(
    ("required", "ids", "problems"),
    [(True, ["with", "with2"], ["3: record 'without': every record of this split needs an image"]),
     (False, ["without"], ["1: record 'with': every record of this split must not have an image",
                           "4: record 'with2': every record of this split must not have an image"]),
     (None, ["with", "without", "with2"], [])],
)  # fmt: skip
def test_image_required_refuses_records_with_or_without_an_image_by_id(tmp_path, required, ids, problems):
    png(tmp_path / "pictures" / "a.png")
    path = tmp_path / "manifests" / "m.jsonl"
    path.parent.mkdir()
    lines = [json.dumps(vqa("with", "a.png")), "", json.dumps(vqa("without")), json.dumps(vqa("with2", "a.png"))]
    write_lines(path, lines)
    manifest = Manifest(path, "vqa", image_root=tmp_path / "pictures", image_required=required)
    records = list(manifest)
    assert [r.id for r in records] == ids
    assert manifest.report == LoadReport(path, len(ids), [f"{path}:{problem}" for problem in problems])
    if records[0].image is not None:
        assert manifest.image_path(records[0]) == tmp_path / "pictures" / "a.png"
    else:
        with pytest.raises(ValueError, match="^record without has no image$"):
            manifest.image_path(records[0])


def test_an_unknown_manifest_kind_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="^unknown manifest kind 'captions'$"):
        Manifest(tmp_path / "m.jsonl", "captions")


def test_an_image_name_too_long_for_the_file_system_is_not_found(tmp_path):
    name = "x" * 300 + ".png"
    write_lines(tmp_path / "m.jsonl", [json.dumps(vqa("a", name))])
    assert loaded(tmp_path / "m.jsonl")[1].problems == [
        f"{tmp_path / 'm.jsonl'}:1: image not found (or not a regular file): {tmp_path / name}"
    ]


def test_image_problem_bounds_are_at_least_one_pixel_each_way_and_at_most_40_megapixels(tmp_path):
    assert image_problem(Image.new("1", (1, 1))) is None
    assert image_problem(Image.new("1", (0, 1))) == "image has no pixels (0x1)"
    assert image_problem(Image.new("1", (1, 0))) == "image has no pixels (1x0)"
    assert image_problem(Image.new("1", (8000, 5000))) is None  # exactly 40,000,000
    assert image_problem(Image.new("1", (5001, 8000))) == (
        "image is 5001x8000 pixels, over the 40,000,000-pixel limit (a decompression bomb?)"
    )
    Image.new("1", (8000, 5001)).save(tmp_path / "bomb.png")
    assert check_image(tmp_path / "bomb.png") == (
        f"{tmp_path / 'bomb.png'}: image is 8000x5001 pixels, over the 40,000,000-pixel limit (a decompression bomb?)"
    )


def test_load_rgb_decodes_any_mode_to_rgb(tmp_path):
    png(tmp_path / "grey.png", color=77, mode="L")
    image = load_rgb(tmp_path / "grey.png")
    assert (image.mode, image.size, image.getpixel((1, 1))) == ("RGB", (2, 2), (77, 77, 77))


def test_caption_instruction_is_the_first_records_prompt_without_the_token_and_needs_a_record(tmp_path):
    record = {"id": "c", "image": "none.png",
              "conversations": [{"from": "human", "value": "<image>\n Describe it. "}, {"from": "gpt", "value": "x"}]}  # fmt: skip
    write_lines(tmp_path / "captions.jsonl", ["{", json.dumps(record)])
    assert caption_instruction(tmp_path / "captions.jsonl") == "Describe it."
    write_lines(tmp_path / "empty.jsonl", ["", "[1]"])
    with pytest.raises(UserError) as caught:
        caption_instruction(tmp_path / "empty.jsonl")
    assert str(caught.value) == f"{tmp_path / 'empty.jsonl'}: no caption records" and caught.value.exit_code == 2


def test_referenced_files_lists_each_existing_image_once_and_refuses_what_resolves_outside(tmp_path):
    data, host = tmp_path / "data", tmp_path / "host"
    png(data / "img" / "a.png")
    png(data / "img" / "b.png")
    png(host / "secret.png")
    (data / "img" / "out.png").symlink_to(host / "secret.png")
    (data / "img" / "loop.png").symlink_to(data / "img" / "loop.png")
    (data / "outside.jsonl").symlink_to(host / "m.jsonl")
    write_lines(host / "m.jsonl", [json.dumps(vqa("h", "img/b.png"))])
    (data / "loop.jsonl").symlink_to(data / "loop.jsonl")
    write_lines(data / "first.jsonl", ['{"broken', "[1]", json.dumps({"id": "n", "image": 3}), json.dumps(vqa("t")),
                                       json.dumps(vqa("e", "../host/secret.png")), json.dumps(vqa("a", "img/a.png")),
                                       json.dumps(vqa("a2", "./img/../img/a.png")), json.dumps(vqa("m", "img/missing.png")),
                                       json.dumps(vqa("o", "img/out.png")), json.dumps(vqa("l", "img/loop.png"))])  # fmt: skip
    write_lines(data / "second.jsonl", [json.dumps(vqa("b", "img/b.png"))])
    manifests = ["outside.jsonl", "loop.jsonl", "first.jsonl", "second.jsonl"]
    files, problems = referenced_files(data, manifests)
    assert files == ["first.jsonl", "img/a.png", "second.jsonl", "img/b.png"]
    assert problems[:3] == [
        f"{data}: outside.jsonl links outside {data}: copy the file into the folder",
        f"{data}: loop.jsonl: cannot be resolved (Symlink loop from '{data / 'loop.jsonl'}')",
        f"{data / 'first.jsonl'}:9: img/out.png links outside {data}: copy the file into the folder",
    ]
    assert problems[3] == f"{data / 'first.jsonl'}:10: img/loop.png: cannot be resolved (Symlink loop from '{data / 'img' / 'loop.png'}')"
    assert len(problems) == 4
