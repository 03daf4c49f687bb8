"""Property-based fuzzing of everything a user or a client hands us: parameter files, --set
overrides, manifests (with their images) and prediction requests.

The property, for every generated case: success, or a clear refusal (exit 2 / HTTP 400) that
wrote nothing; never a traceback. Runs derandomized in the default suite (about 1,300 cases);
``VIFT_FUZZ_EXAMPLES=N`` raises the count per test and ``VIFT_FUZZ_RANDOM=1`` explores new cases.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from PIL import Image

from vift.cli import main
from vift.config.schema import Params
from vift.data.generate import REQUIRED_SPLITS


def fuzz_settings(examples: int):
    return settings(
        max_examples=int(os.environ.get("VIFT_FUZZ_EXAMPLES", examples)),
        deadline=None,
        derandomize=not os.environ.get("VIFT_FUZZ_RANDOM"),
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def mostly(good, bad):
    """Three draws in four from ``good`` (``one_of`` would merge repeated branches into one)."""
    return st.integers(0, 3).flatmap(lambda pick: bad if pick == 0 else good)


def quiet_main(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)  # any exception other than a handled one fails the test: that is the property
    except SystemExit as exit_:  # argparse's own refusal (e.g. `--set -=`): usage and exit 2, no traceback
        code = exit_.code
    event(f"exit {code}")  # --hypothesis-show-statistics: how many cases passed and how many were refused
    captured = capsys.readouterr()
    return code, captured.err


# ----------------------------------------------------------------------------------------------
# Values: what YAML and JSON can carry, hostile corners included
# ----------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=10**20, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "auto", "tiny", "compose", "additive", "1e-4", "-1", "null", "../etc/passwd", "é", "\x00"]),
    st.text(max_size=20),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12
)


def schema_paths(model: type = Params, prefix: str = "") -> list[str]:
    """Every dotted key of the parameter schema (sections and leaves)."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            out.extend(schema_paths(annotation, f"{key}."))
    return out


KEYS = schema_paths()


@st.composite
def params_documents(draw) -> bytes:
    """A parameters file: a real preset with random keys replaced, or random text or bytes."""
    kind = draw(st.sampled_from(["edited", "edited", "edited", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    document = Params().model_dump(mode="json")
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=0, max_size=3)):
        node = document
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else {}
        current = node.get(parts[-1])
        plausible = (
            st.sampled_from([current, current * 2, current + 1])
            if isinstance(current, (int, float)) and not isinstance(current, bool)
            else st.just(current)
        )
        node[parts[-1]] = draw(mostly(plausible, values))
    text = yaml.safe_dump(document, allow_unicode=True)
    if draw(st.booleans()):  # duplicate a line: a duplicate key, or a harmless repeat
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        lines.insert(index, lines[index])
        text = "\n".join(lines) + "\n"
    return text.encode("utf-8", "surrogatepass")


@fuzz_settings(400)
@given(document=params_documents())
def test_any_parameters_file_validates_or_is_refused_with_exit_2(tmp_path, capsys, document):
    path = tmp_path / "params.yaml"
    path.write_bytes(document)
    code, err = quiet_main(["params", "validate", str(path)], capsys)
    assert code in (0, 2)
    if code == 2:
        assert str(path) in err and "Traceback" not in err


@fuzz_settings(250)
@given(
    key=mostly(st.sampled_from(KEYS), st.text(max_size=20)),
    value=mostly(st.sampled_from(["1", "2", "0.5", "1e-4", "true", "tiny", "null", "[0, 2]", "[]", "{}"]), st.text(max_size=40)),
)
def test_any_override_applies_or_is_refused_and_the_active_file_is_kept(ci_workspace, capsys, key, value):
    active = Path("params/params.yaml")
    before = active.read_bytes()
    code, err = quiet_main(["params", "use", "ci", "--set", f"{key}={value}"], capsys)
    assert code in (0, 2)
    if code == 2:
        assert active.read_bytes() == before and "Traceback" not in err
    else:
        active.write_bytes(before)


# ----------------------------------------------------------------------------------------------
# Manifests and their images
# ----------------------------------------------------------------------------------------------


def png(colour: str = "red", size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {"ok.png": png(), "truncated.png": png(size=64)[:40], "text.png": b"not an image", "empty.png": b""}
IMAGE_NAMES = [*IMAGES, "missing.png", "../outside.png", "/etc/hostname", "sub/../ok.png", "a" * 300 + ".png", ""]
SPLIT_NAMES = ["captions", "text_instructions", "visual_instructions", "backbone_text", "calibration", "test"]

turn = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "system", 1]),
        "value": st.one_of(st.text(max_size=20), st.just("<image>\nDescribe."), values),
    }
)
record = st.dictionaries(
    st.sampled_from(["id", "image", "conversations", "question", "answer", "choices", "type", "extra"]),
    st.one_of(values, st.sampled_from(IMAGE_NAMES), st.lists(turn, max_size=3)),
    max_size=6,
)
good_caption = {"id": "c0", "image": "ok.png", "conversations": [
    {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Red."}]}  # fmt: skip
good_vqa = {"id": "q0", "image": "ok.png", "question": "What colour?", "answer": "red"}
good_text = {"id": "t0", "conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]}
GOOD = {
    "captions": good_caption, "visual_instructions": good_caption, "text_instructions": good_text,
    "backbone_text": good_text, "calibration": good_vqa, "test": good_vqa,
}  # fmt: skip
garbage = st.one_of(
    record.map(json.dumps),
    st.sampled_from([json.dumps(good_caption), json.dumps(good_vqa), json.dumps(good_text)]),  # maybe the wrong split
    st.sampled_from(["[", "{}", "null", "[1, 2]", "\x00", "1" * 5000]),
    st.text(max_size=60).filter(lambda t: "\n" not in t and "\r" not in t),
)


def split_lines(split: str):
    return st.lists(mostly(st.just(json.dumps(GOOD[split])), garbage), max_size=5)


manifest_sets = st.lists(st.sampled_from(SPLIT_NAMES), min_size=1, max_size=3, unique=True).flatmap(
    lambda splits: st.fixed_dictionaries({split: split_lines(split) for split in splits})
)


@fuzz_settings(250)
@given(
    manifests=manifest_sets,
    as_array=st.booleans(),
    skip=st.booleans(),
)
def test_any_manifest_folder_imports_or_is_refused_and_nothing_is_written(ci_workspace, tmp_path, capsys, manifests, as_array, skip):
    source = tmp_path / "source"
    shutil.rmtree(source, ignore_errors=True)  # one folder, rewritten for every example
    source.mkdir()
    for name, data in IMAGES.items():
        (source / name).write_bytes(data)
    for split in REQUIRED_SPLITS:  # the data contract; the drawn manifests replace some of them
        manifests.setdefault(split, [json.dumps(GOOD[split])])
    for split, split_lines in manifests.items():
        if as_array:
            body = "[\n" + ",\n".join(split_lines) + "\n]\n"
        else:
            body = "".join(f"{line}\n" for line in split_lines)
        (source / f"{split}.jsonl").write_text(body, encoding="utf-8", errors="surrogatepass")
    active = Path("params/params.yaml")
    before = active.read_bytes()
    imported_before = sorted(Path("data/imported").glob("*")) if Path("data/imported").exists() else []
    code, err = quiet_main(["data", "import", str(source), *(["--bad-records", "skip"] if skip else [])], capsys)
    assert code in (0, 2), err
    if code == 2:
        assert "Traceback" not in err
        assert active.read_bytes() == before
        assert (sorted(Path("data/imported").glob("*")) if Path("data/imported").exists() else []) == imported_before


# ----------------------------------------------------------------------------------------------
# Prediction requests (the served model's input checks; generation itself is stubbed)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    from vift.fusion.method import FusionSpec
    from vift.registry.pyfunc import ViftModel

    fusion = tmp_path_factory.mktemp("fusion") / "fusion.json"
    fusion.write_text(json.dumps({"fusion": FusionSpec().to_dict()}))
    model = ViftModel(max_new_tokens=2)
    model.load_context(SimpleNamespace(artifacts={"model": str(tiny_checkpoint), "fusion": str(fusion)}))
    return model


image_values = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(
        [
            base64.b64encode(png()).decode(),
            "data:image/png;base64," + base64.b64encode(png()).decode(),
            png(),
            "/etc/passwd",
            "../../../etc/hostname",
            "data:,",
            "data:image/png;base64,!!!",
        ]
    ),  # fmt: skip
    st.none(),
    st.integers(),
    st.floats(),
)
questions = st.one_of(st.text(max_size=80), st.none(), st.integers(), st.floats(), st.just("x " * 2000), st.just(""))
request_params = mostly(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "max_new_tokens": st.one_of(st.integers(-5, 10**9), st.floats(), st.text(max_size=5), st.booleans(), st.none()),
            "fusion": st.one_of(st.booleans(), st.text(max_size=5), st.integers()),
            "mode": st.one_of(st.sampled_from(["", "plain", "fused", "describe_then_answer"]), st.text(max_size=8), st.integers()),
        },
    ),
)


valid_image = st.just(base64.b64encode(png()).decode())
valid_question = st.sampled_from(["How many shapes are there?", "What colour is it?", "é?"])


@fuzz_settings(400)
@given(
    rows=st.lists(
        st.tuples(mostly(valid_image, image_values), mostly(valid_question, questions)),
        min_size=1,
        max_size=3,
    ),
    params=request_params,
)
def test_any_prediction_request_is_answered_or_refused_with_a_4xx_and_no_stack_trace(served, monkeypatch, rows, params):
    import vift.fusion.modes as modes

    monkeypatch.setattr(modes, "fused_generate", lambda model, processor, images, questions, *a, **k: ["4"] * len(questions))
    monkeypatch.delenv("VIFT_SERVE_IMAGE_ROOT", raising=False)
    frame = pd.DataFrame({"image": [r[0] for r in rows], "question": [r[1] for r in rows]})
    try:
        answers = served.predict(None, frame, params=params)
    except MlflowException as error:
        event(
            "refused: " + error.message.split(":")[0][:30] + " " + error.message.split(":")[1][:40]
            if ":" in error.message
            else error.message[:60]
        )
        assert 400 <= error.get_http_status_code() < 500, error.message
        assert "stack_trace" not in error.serialize_as_json()
        return
    event("answered")
    assert answers == ["4"] * len(rows)
    assert all(isinstance(q, str) and q.strip() for q in frame["question"])
    assert not any(isinstance(q, float) and math.isnan(q) for q in frame["question"])
