"""Security regressions: what a hostile client or a hostile folder could do, and no longer can.

Each test reproduces one finding of the adversarial review (issue "Security and bad input") first,
then checks the fix: the served model reads no host files, imports copy only what the manifests
reference, credentials never reach output or run records, and requests are bounded.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from vift.cli import main
from vift.fusion.method import FusionSpec
from vift.registry import pyfunc
from vift.registry.pyfunc import IMAGE_ROOT_ENV, ViftModel, decode_image


def png_bytes(colour: str = "red", size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A PNG whose header claims width x height pixels (100 MP, under PIL's own error limit) over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------
# The served model: requests are data, never paths on the serving host
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory) -> ViftModel:
    fusion = tmp_path_factory.mktemp("fusion") / "fusion.json"
    spec = FusionSpec(mode="additive", positions="question", a=0.5, b=0.5, layer_start=0, layer_end=2)
    fusion.write_text(json.dumps({"fusion": spec.to_dict()}))
    model = ViftModel(max_new_tokens=2)
    model.load_context(SimpleNamespace(artifacts={"model": str(tiny_checkpoint), "fusion": str(fusion)}))
    return model


def refusal(call) -> str:
    with pytest.raises(MlflowException) as caught:
        call()
    assert caught.value.get_http_status_code() == 400
    return caught.value.message


def test_a_host_path_in_a_request_is_not_read_and_existence_is_not_revealed(tmp_path, monkeypatch):
    monkeypatch.delenv(IMAGE_ROOT_ENV, raising=False)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    unreadable = tmp_path / "notes.txt"
    unreadable.write_text("not an image")
    # Before the fix: the PNG was read and answered, the text file said "not a readable image" and a
    # missing file said something else: a file-existence oracle.
    messages = {
        name: refusal(lambda p=path: decode_image(str(p), 0)).replace(str(path)[:60], "<p>")
        for name, path in {"image": secret, "text": unreadable, "missing": tmp_path / "nope.png"}.items()
    }
    assert len(set(messages.values())) == 1, messages
    assert "not base64-encoded image data" in messages["image"] and IMAGE_ROOT_ENV in messages["image"]


def test_paths_are_read_only_under_the_allowed_root_resolved_not_lexically(tmp_path):
    root = tmp_path / "served"
    (root / "in").mkdir(parents=True)
    (root / "in" / "ok.png").write_bytes(png_bytes("blue"))
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes("green"))
    (root / "in" / "link.png").symlink_to(outside)
    (tmp_path / "servedevil").mkdir()
    (tmp_path / "servedevil" / "x.png").write_bytes(png_bytes())

    assert decode_image("in/ok.png", 0, root.resolve()).getpixel((0, 0)) == (0, 0, 255)
    refused = [
        "../outside.png",  # lexical escape
        str(outside),  # absolute path outside
        "in/link.png",  # a link inside the root to a file outside it
        "../servedevil/x.png",  # a sibling whose name starts with the root's name
        "in/missing.png",
    ]
    messages = {refusal(lambda p=p: decode_image(p, 3, root.resolve())).split("'")[2] for p in refused}
    assert messages == {" is not base64 image data nor an image under the allowed root"}


def test_requests_are_bounded_in_rows_question_tokens_image_bytes_pixels_and_new_tokens(served, monkeypatch):
    image = base64.b64encode(png_bytes()).decode()
    question = "How many shapes are there?"

    def predict(images, questions, **params):
        return served.predict(None, pd.DataFrame({"image": images, "question": questions}), params=params)

    assert len(predict([image], [question])) == 1
    assert "at most 64" in refusal(lambda: predict([image] * 65, [question] * 65))
    # 100k characters (78k tokens against a 192-token context took 156 s before): refused unread.
    assert "100,000 characters" in refusal(lambda: predict([image], ["x" * 100_000]))
    words = " ".join(["shape"] * (pyfunc.MAX_QUESTION_TOKENS + 10))
    assert f"at most {pyfunc.MAX_QUESTION_TOKENS}" in refusal(lambda: predict([image], [words]))
    assert "pixels, over the" in refusal(lambda: predict([base64.b64encode(bomb_png()).decode()], [question]))
    with monkeypatch.context() as patched:
        patched.setattr(pyfunc, "MAX_IMAGE_BYTES", 1000)
        assert "MiB limit" in refusal(lambda: predict([png_bytes(size=512)], [question]))
    assert "between 1 and" in refusal(lambda: predict([image], [question], max_new_tokens=0))  # was: 200 with 8
    assert "between 1 and" in refusal(lambda: predict([image], [question], max_new_tokens=10_000))
    assert "question is missing" in refusal(lambda: predict([image], [None]))  # was: the string "None"
    assert "question is missing" in refusal(lambda: predict([image], [float("nan")]))


def test_an_unexpected_failure_reaches_the_client_without_a_stack_trace(served, monkeypatch):
    import vift.fusion.modes as modes

    def broken(*args, **kwargs):
        raise RuntimeError("internal detail /srv/secret/path")

    monkeypatch.setattr(modes, "fused_generate", broken)
    image = base64.b64encode(png_bytes()).decode()
    with pytest.raises(MlflowException) as caught:
        served.predict(None, pd.DataFrame({"image": [image], "question": ["How many?"]}))
    body = caught.value.serialize_as_json()
    assert "RuntimeError" in body and "stack_trace" not in body and "/srv/secret" not in body


# ----------------------------------------------------------------------------------------------
# vift data import: copy what the manifests reference, nothing that links out
# ----------------------------------------------------------------------------------------------


def caption(index: int, image: str) -> str:
    return json.dumps({"id": f"c{index}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A square."}]})  # fmt: skip


def vqa(index: int, image: str | None) -> str:
    record = {"id": f"q{index}", "question": "What colour?", "answer": "red"}
    if image is not None:
        record["image"] = image
    return json.dumps(record)


def small_dataset(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    for index in range(2):
        (root / "img" / f"{index}.png").write_bytes(png_bytes())
    (root / "captions.jsonl").write_text("\n".join(caption(i, f"img/{i}.png") for i in range(2)) + "\n")
    for split in ("calibration", "test"):
        (root / f"{split}.jsonl").write_text("\n".join(vqa(i, f"img/{i}.png") for i in range(2)) + "\n")
    (root / "text_instructions.jsonl").write_text(TEXT_RECORD + "\n")
    return root


TEXT_RECORD = json.dumps({"id": "t0", "conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]})
REQUIRED = {"captions.jsonl", "calibration.jsonl", "test.jsonl", "text_instructions.jsonl"}


def imported_files() -> set[str]:
    from vift.config import load_params

    target = Path(load_params("params/params.yaml").data.import_dir)
    return {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}


def test_import_copies_only_referenced_files_and_no_link_targets(ci_workspace, tmp_path, capsys):
    outside = tmp_path / "host"
    (outside / "secrets").mkdir(parents=True)
    (outside / "secrets" / "key.txt").write_text("PRIVATE")
    source = small_dataset(tmp_path / "external")
    (source / "unused.txt").write_text("not referenced")
    (source / "linked.txt").symlink_to(outside / "secrets" / "key.txt")  # unused link to a host file
    (source / "linked_dir").symlink_to(outside / "secrets", target_is_directory=True)  # linked folder
    assert main(["data", "import", str(source)]) == 0
    assert imported_files() == REQUIRED | {"img/0.png", "img/1.png"}
    assert not list(Path("data/imported").rglob("key.txt"))


@pytest.mark.parametrize("link", ["manifest", "image", "image_folder"])
def test_import_refuses_links_that_resolve_outside_the_folder(ci_workspace, tmp_path, capsys, link):
    source = small_dataset(tmp_path / "external")
    host = tmp_path / "host"
    host.mkdir()
    (host / "system.png").write_bytes(png_bytes("green"))
    (host / "passwd").write_text(caption(9, "img/0.png") + "\n")  # a host file that even parses
    if link == "manifest":
        (source / "captions.jsonl").unlink()
        (source / "captions.jsonl").symlink_to(host / "passwd")
    elif link == "image":
        (source / "img" / "1.png").unlink()
        (source / "img" / "1.png").symlink_to(host / "system.png")
    else:
        (source / "img" / "host").symlink_to(host, target_is_directory=True)
        (source / "test.jsonl").write_text(vqa(0, "img/host/system.png") + "\n")
    params_before = Path("params/params.yaml").read_bytes()
    capsys.readouterr()
    assert main(["data", "import", str(source)]) == 2
    err = capsys.readouterr().err
    assert "links outside" in err and "Traceback" not in err
    assert not Path("data/imported").exists() or not any(Path("data/imported").iterdir())
    assert Path("params/params.yaml").read_bytes() == params_before


def test_importing_the_current_folder_does_not_copy_it_into_itself(ci_workspace, capsys):
    small_dataset(Path("."))  # the workspace itself holds the manifests
    assert main(["data", "import", "."]) == 0
    assert imported_files() == REQUIRED | {"img/0.png", "img/1.png"}


def test_orphaned_temporary_folders_are_removed_and_imports_run_one_at_a_time(ci_workspace, tmp_path):
    from vift import paths
    from vift.config import load_params
    from vift.io import file_lock

    orphan = Path("data/imported/.import-killed.tmp")
    orphan.mkdir(parents=True)
    (orphan / "half.png").write_bytes(b"\x89PNG")
    sources = [small_dataset(tmp_path / f"external{i}") for i in range(2)]
    (sources[1] / "captions.jsonl").write_text(caption(0, "img/0.png") + "\n")  # different content

    finished: list[int] = []

    def run(index: int) -> None:
        assert main(["data", "import", str(sources[index])]) == 0
        finished.append(index)

    with file_lock(paths.IMPORT_LOCK):  # another import holds the workspace
        worker = threading.Thread(target=run, args=(0,))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not finished, "an import must wait for the one in progress"
        assert load_params("params/params.yaml").data.source == "shapetally"
    worker.join(60)
    run(1)
    assert finished == [0, 1]
    assert not orphan.exists()
    assert sorted(p.name for p in Path("data/imported").iterdir() if p.name.startswith(".import-")) == []
    assert len([p for p in Path("data/imported").iterdir()]) == 2


# ----------------------------------------------------------------------------------------------
# Credentials never reach output or run records
# ----------------------------------------------------------------------------------------------


def test_vift_info_does_not_print_the_tracking_password(ci_workspace, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@127.0.0.1:9/")
    capsys.readouterr()
    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and json.loads(out)["tracking_uri"] == "http://***@127.0.0.1:9/"


def test_error_messages_from_the_tracking_client_are_redacted():
    from vift.registry.server import redact_text

    text = "API request to endpoint http://alice:hunter2@mlflow.example:5000/api/2.0 failed; s3://bucket/key"
    assert redact_text(text) == "API request to endpoint http://***@mlflow.example:5000/api/2.0 failed; s3://bucket/key"
