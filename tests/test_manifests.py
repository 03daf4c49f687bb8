"""Manifest loaders: streaming, validation, file:line messages, skip-or-fail policy."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pytest

from vift.data.manifests import Manifest
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
