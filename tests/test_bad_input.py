"""Bad input found by the adversarial review: each case ends in a clear message and exit 2 (exit 1
for a failing machine), names the file, line or field, and writes nothing. Never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from vift.cli import main

PARAMS = Path("params/params.yaml")


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


# ----------------------------------------------------------------------------------------------
# Parameter files and --set values
# ----------------------------------------------------------------------------------------------


def active_with(text_edit) -> str:
    return text_edit(PARAMS.read_text())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("data:\n  seed: 1\n  seed: 2\n", "params.yaml:3: not valid YAML: duplicate key 'seed' (first on line 2)"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        ("seed: " + "9" * 5000 + "\n", "unreadable value"),
        ("data: {seed: 1\n", "params.yaml:2: not valid YAML"),
        ("train:\n  text:\n    learning_rate: .inf\n", "train.text.learning_rate: Input should be a finite number"),
        ("fusion:\n  a: .nan\n", "fusion.a: Input should be a finite number"),
        ("fusion:\n  calibrate:\n    weights: [0.5, .nan]\n", "fusion.calibrate.weights.1: Input should be a finite number"),
        ("eval:\n  batch_size: true\n", "eval.batch_size: expected a number, not the boolean true"),
        ("train:\n  text:\n    learning_rate: true\n", "expected a number, not the boolean true"),
        ("fusion:\n  calibrate:\n    layer_ranges: []\n", "layer_ranges must list at least one"),
        ("fusion:\n  calibrate:\n    layer_ranges: [[3, 1]]\n", "layer_ranges[0] = [3, 1]: need 0 <= start < end"),
        ("fusion:\n  calibrate:\n    weights: []\n", "weights must list at least one value"),
        ("fusion:\n  calibrate:\n    modes: []\n", "modes must list at least one value"),
    ],
    ids=[
        "duplicate-key",
        "deep-nesting",
        "huge-int",
        "yaml-error",
        "inf-lr",
        "nan-weight",
        "nan-in-list",
        "bool-int",
        "bool-float",
        "empty-ranges",
        "inverted-range",
        "empty-weights",
        "empty-modes",
    ],  # fmt: skip
)
def test_bad_parameter_files_exit_2_with_the_field(tmp_path, capsys, content, expected):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    code, err = run(capsys, "params", "validate", path)
    assert code == 2
    assert expected in err


def test_a_non_utf8_parameter_file_is_named(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\npreset: \xff\xfe\n")
    code, err = run(capsys, "params", "validate", path)
    assert code == 2 and f"{path}: not UTF-8 text" in err


def test_learning_rates_written_as_1e_minus_4_still_work(tmp_path, capsys):
    # PyYAML reads 1e-4 (no dot) as a string; the schema must keep accepting what users write.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  text:\n    learning_rate: 1e-4\n")
    assert run(capsys, "params", "validate", path)[0] == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.batch_size=[1, 2", "override 'eval.batch_size=[1, 2':1: not valid YAML"),
        ("fusion.a=.nan", "fusion.a: Input should be a finite number"),
        ("eval.max_new_tokens=true", "expected a number, not the boolean true"),
        ("seed={a: 1, a: 2}", "duplicate key 'a'"),
    ],
)
def test_bad_overrides_exit_2_and_leave_the_active_file_alone(ci_workspace, capsys, override, expected):
    before = PARAMS.read_bytes()
    code, err = run(capsys, "params", "use", "ci", "--set", override)
    assert code == 2 and expected in err
    assert PARAMS.read_bytes() == before


def test_a_full_disk_or_read_only_folder_is_a_message_not_a_traceback(ci_workspace, capsys, monkeypatch):
    before = PARAMS.read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", full)
        code, err = run(capsys, "params", "use", "tiny")
    assert code == 1 and "params.yaml: No space left on device: the disk is full" in err
    assert PARAMS.read_bytes() == before
    assert not [p for p in PARAMS.parent.iterdir() if p.name.endswith(".tmp")], "no half-written file is left"


# ----------------------------------------------------------------------------------------------
# Manifests and images
# ----------------------------------------------------------------------------------------------


def png(path: Path, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)


def caption(index: int, image: str | None = "img/0.png") -> dict:
    record = {"id": f"c{index}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + "Describe."}, {"from": "gpt", "value": "Red."}]}  # fmt: skip
    if image:
        record["image"] = image
    return record


def vqa(index: int, image: str | None = "img/0.png") -> dict:
    record = {"id": f"q{index}", "question": "What colour?", "answer": "red"}
    if image:
        record["image"] = image
    return record


def write_lines(path: Path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "external"
    png(root / "img" / "0.png")
    write_lines(root / "captions.jsonl", [caption(i) for i in range(3)])
    write_lines(root / "calibration.jsonl", [vqa(i) for i in range(2)])
    write_lines(root / "test.jsonl", [vqa(i) for i in range(3)])
    write_lines(root / "text_instructions.jsonl", [caption(i, image=None) for i in range(2)])
    return root


def import_fails(capsys, source: Path, *expected: str) -> str:
    before = PARAMS.read_bytes()
    code, err = run(capsys, "data", "import", source)
    assert code == 2, err
    for text in expected:
        assert text in err, err
    assert PARAMS.read_bytes() == before
    assert not Path("data/imported").exists() or not [p for p in Path("data/imported").iterdir()]
    return err


def test_the_valid_dataset_imports(ci_workspace, dataset, capsys):
    assert run(capsys, "data", "import", dataset)[0] == 0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"id": "broken", ', "captions.jsonl:2: malformed JSON"),
        ("[" * 100_000 + "]" * 100_000, "captions.jsonl:2: JSON nested too deeply"),
        ('{"id": ' + "9" * 5000 + "}", "captions.jsonl:2: unreadable JSON value"),
        (json.dumps(caption(7, "a/" * 3000 + "x.png")), "captions.jsonl:2: image not found"),
    ],
    ids=["malformed", "deep-nesting", "huge-int", "over-long-path"],
)
def test_hostile_manifest_lines_are_reported_by_file_and_line(ci_workspace, dataset, capsys, line, expected):
    write_lines(dataset / "captions.jsonl", [caption(0), line, caption(2)])
    import_fails(capsys, dataset, expected)


def test_a_non_utf8_manifest_is_named(ci_workspace, dataset, capsys):
    (dataset / "test.jsonl").write_bytes(json.dumps(vqa(0)).encode() + b"\n\xff\xfe\xfa\n")
    import_fails(capsys, dataset, "test.jsonl: not UTF-8 text")


def test_images_are_decoded_at_validation_and_pixel_bombs_refused(ci_workspace, dataset, capsys):
    from tests.test_security import bomb_png

    data = (dataset / "img" / "0.png").read_bytes()
    (dataset / "img" / "truncated.png").write_bytes(data[: len(data) // 2])  # a valid header over half the data
    (dataset / "img" / "bomb.png").write_bytes(bomb_png())
    write_lines(dataset / "captions.jsonl", [caption(0), caption(1, "img/truncated.png"), caption(2, "img/bomb.png")])
    import_fails(capsys, dataset, "captions.jsonl:2: image unreadable or corrupt", "captions.jsonl:3:", "over the 40,000,000-pixel limit")


def test_split_roles_are_enforced(ci_workspace, dataset, capsys):
    # Text instructions made of image records would silently turn ViFT into visual instruction tuning.
    write_lines(dataset / "text_instructions.jsonl", [caption(0)])
    import_fails(capsys, dataset, "text_instructions.jsonl:1: record 'c0': every record of this split must not have an image")
    write_lines(dataset / "text_instructions.jsonl", [caption(0, image=None)])
    write_lines(dataset / "test.jsonl", [vqa(0), vqa(1, image=None)])  # crashed `evaluate` before
    import_fails(capsys, dataset, "test.jsonl:2: record 'q1': every record of this split needs an image")


def test_an_all_bad_split_is_refused_even_when_skipping(ci_workspace, dataset, capsys):
    # Before: imported, then every row of the table read 0.0 % with n = 0.
    write_lines(dataset / "test.jsonl", [vqa(0, "img/missing.png"), vqa(1, "img/missing.png")])
    import_fails(capsys, dataset, "test.jsonl: all 2 record(s) invalid")
    before = PARAMS.read_bytes()
    assert run(capsys, "data", "import", dataset, "--bad-records", "skip")[0] == 2
    assert PARAMS.read_bytes() == before


def test_named_pipes_symlink_loops_and_broken_links_in_the_folder(ci_workspace, dataset, capsys):
    os.mkfifo(dataset / "img" / "pipe.png")
    (dataset / "img" / "loop.png").symlink_to(dataset / "img" / "loop.png")
    (dataset / "img" / "broken.png").symlink_to(dataset / "img" / "gone.png")
    write_lines(dataset / "captions.jsonl", [caption(0, "img/pipe.png"), caption(1, "img/broken.png"), caption(2)])
    import_fails(capsys, dataset, "captions.jsonl:1: image not found (or not a regular file)", "captions.jsonl:2:")
    write_lines(dataset / "captions.jsonl", [caption(0, "img/loop.png"), caption(2)])
    import_fails(capsys, dataset, "img/loop.png: cannot be resolved")
    # The unreferenced pipe and links are simply not copied.
    write_lines(dataset / "captions.jsonl", [caption(0)])
    assert run(capsys, "data", "import", dataset)[0] == 0


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    # 3**30 leaves if expanded; YAML aliases share one object, so only a walk that expands it hangs.
    names = [f"k{i}" for i in range(31)]
    lines = [f"{names[0]}: &{names[0]} [x, x, x]"]
    lines += [f"{n}: &{n} [*{p}, *{p}, *{p}]" for p, n in zip(names, names[1:])]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, "params", "validate", path)
    assert code == 2 and f"{path}: invalid parameters" in err and "k0: Extra inputs are not permitted" in err


@pytest.mark.parametrize("split", ["captions", "text_instructions", "calibration", "test"])
def test_a_required_split_missing_fails_at_import_naming_who_reads_it(ci_workspace, dataset, capsys, split):
    (dataset / f"{split}.jsonl").unlink()
    import_fails(capsys, dataset, f"{split}.jsonl: missing; read by", "docs/STORAGE.md")
