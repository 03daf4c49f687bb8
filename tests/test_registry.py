"""MLflow tracking and the model registry: run grouping, what is logged, the pyfunc model, the
champion gate, idempotent registration, unreachable servers, and (e2e) a real `mlflow server`
with artifacts proxied to S3 (moto), pulled by a fresh `vift predict` process and by
`mlflow models serve`.

Inputs of the register stage (models/vift, models/fusion.json, reports/metrics.json) are built
here from the ci tiny model, with accuracies chosen to exercise the gate.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from storage_support import free_port

from tests.conftest import widened
from vift.cli import main
from vift.config import write_params
from vift.data.manifests import Manifest
from vift.errors import UserError
from vift.fusion.method import FusionSpec, fused_generate
from vift.registry import gate, outputs, server, tracking
from vift.registry.pyfunc import ViftModel

BIN = Path(sys.executable).parent
FUSION = FusionSpec(mode="additive", positions="question", a=0.6, b=0.3, layer_start=1, layer_end=3)
MAX_NEW_TOKENS = 4


# ----------------------------------------------------------------------------------------------
# Fixtures: a saved model, workspaces, a tracking store
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tiny_lvlm, tmp_path_factory) -> Path:
    """The ci tiny LLaVA with a wider init (so fused and plain answers differ), saved once."""
    model, processor = tiny_lvlm
    model = widened(model, seed=3)
    out = tmp_path_factory.mktemp("saved") / "vift"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def items(ci_data):
    """Three test images (paths) and their questions."""
    records = list(Manifest(ci_data / "test.jsonl", "vqa"))[:3]
    return [ci_data / r.image for r in records], [r.question for r in records]


@pytest.fixture(scope="module")
def expected(saved_model, items):
    """Answers computed directly with fused_generate: fused (FUSION) and plain (None)."""
    from vift.model.loading import load_model, load_processor

    model, processor = load_model(saved_model).eval(), load_processor(saved_model)
    images = [Image.open(p).convert("RGB") for p in items[0]]
    fused = fused_generate(model, processor, images, items[1], FUSION, max_new_tokens=MAX_NEW_TOKENS)
    plain = fused_generate(model, processor, images, items[1], None, max_new_tokens=MAX_NEW_TOKENS)
    # The single-item requests of the e2e test: no padding, so compare with a batch of one.
    fused_one = fused_generate(model, processor, images[:1], items[1][:1], FUSION, max_new_tokens=MAX_NEW_TOKENS)
    plain_one = fused_generate(model, processor, images[:1], items[1][:1], None, max_new_tokens=MAX_NEW_TOKENS)
    return {"fused": fused, "plain": plain, "fused_one": fused_one, "plain_one": plain_one}


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One embedded store for the module's non-server tests (each test uses its own model name)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def metrics_payload(accuracy: float, spread: float = 0.05) -> dict:
    rows = {
        "vift_fused": {"accuracy": accuracy, "ci95": [accuracy - 0.1, accuracy + 0.1], "n": 48, "by_type": {"count_plus": accuracy}},
        "vift_unfused": {"accuracy": 0.3, "ci95": [0.2, 0.4], "n": 48, "by_type": {"count_plus": 0.3}},
        "question_only": {"accuracy": 0.25, "ci95": [0.15, 0.35], "n": 48, "by_type": {}},
        "majority_per_type": {"accuracy": 0.3, "ci95": [0.2, 0.4], "n": 48, "by_type": {}},
    }
    evidence = {
        control: {
            "difference": accuracy - base,
            "ci95": [accuracy - base - spread, accuracy - base + spread],
            "mcnemar_p": 0.001 if accuracy - base > spread else 0.4,
        }
        for control, base in (("question_only", 0.25), ("majority_per_type", 0.3))
    }
    return {"rows": rows, "evidence": {"vift_fused": evidence}}


def make_workspace(root: Path, saved_model: Path, ci_data: Path, params, accuracy: float) -> Path:
    """A workspace holding what the register stage reads, plus a training report."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(saved_model, root / "models" / "vift")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "benchmark").symlink_to(ci_data, target_is_directory=True)
    (root / "models" / "fusion.json").write_text(
        json.dumps({"fusion": FUSION.to_dict(), "calibration": {"accuracy": 0.5, "n": 24}, "search": []})
    )
    reports = root / "reports"
    (reports / "plots").mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics_payload(accuracy)))
    (reports / "ablation.md").write_text("| row | accuracy |\n| --- | --- |\n| vift_fused | x |\n")
    (reports / "plots" / "calibration_heatmap.png").write_bytes(b"\x89PNG fake")
    (reports / "train_text.json").write_text(
        json.dumps({"seconds": 1.5, "history": [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3} for s in (1, 2, 3)]})
    )
    write_params(params, root / "params" / "params.yaml")
    return root


def params_for(ci_params, name: str, **registry):
    params = ci_params.model_copy(deep=True)
    params.registry.model_name = name
    for key, value in registry.items():
        setattr(params.registry, key, value)
    return params


def register(workspace: Path) -> dict:
    assert main(["stage", "register", "--params", str(workspace / "params" / "params.yaml")]) == 0
    return json.loads((workspace / "reports" / "registration.json").read_text())


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ----------------------------------------------------------------------------------------------
# The pyfunc model
# ----------------------------------------------------------------------------------------------


def test_pyfunc_predict_accepts_path_bytes_and_base64_and_fusion_off_is_the_plain_model(
    saved_model, items, expected, tmp_path, monkeypatch
):
    import pandas as pd

    from vift.registry.pyfunc import IMAGE_ROOT_ENV

    fusion_file = tmp_path / "fusion.json"
    fusion_file.write_text(json.dumps({"fusion": FUSION.to_dict(), "calibration": {}}))
    model = ViftModel(max_new_tokens=MAX_NEW_TOKENS)
    model.load_context(SimpleNamespace(artifacts={"model": str(saved_model), "fusion": str(fusion_file)}))
    paths, questions = items
    root = Path(os.path.commonpath([p.resolve() for p in paths]))
    monkeypatch.setenv(IMAGE_ROOT_ENV, str(root))  # paths are read only under an explicit root
    as_bytes = [p.read_bytes() for p in paths]
    forms = {
        "path": [str(p.resolve().relative_to(root)) for p in paths],
        "bytes": as_bytes,
        "base64": [base64.b64encode(b).decode() for b in as_bytes],
        "data_uri": ["data:image/png;base64," + base64.b64encode(b).decode() for b in as_bytes],
    }
    answers = {name: model.predict(None, pd.DataFrame({"image": images, "question": questions})) for name, images in forms.items()}
    for name, got in answers.items():
        assert got == expected["fused"], name
    plain = model.predict(None, pd.DataFrame({"image": forms["base64"], "question": questions}), params={"fusion": False})
    assert plain == expected["plain"]
    assert expected["fused"] != expected["plain"], "the test model should answer differently with fusion"


def test_pyfunc_rejects_unreadable_images_clearly(saved_model, tmp_path):
    from mlflow.exceptions import MlflowException

    from vift.registry.pyfunc import decode_image

    with pytest.raises(MlflowException, match="row 2: image 'no/such/file.png' is not base64-encoded image data"):
        decode_image("no/such/file.png", 2)
    with pytest.raises(MlflowException, match="not a readable image"):
        decode_image(b"definitely not a png", 0)


# ----------------------------------------------------------------------------------------------
# Tracking: run grouping, what is logged, ranks, unreachable servers
# ----------------------------------------------------------------------------------------------


def test_stages_share_one_run_until_registration_or_a_change(ci_params, sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.chdir(tmp_path)
    params = params_for(ci_params, "grouping")
    with tracking.stage_run("data", params) as first:
        pass
    with tracking.stage_run("base", params) as second:
        pass
    assert first.new and not second.new and second.run_id == first.run_id
    state = json.loads((tmp_path / ".vift" / "mlflow_run.json").read_text())
    assert state["run_id"] == first.run_id and set(state["stages"]) == {"data", "base"}

    with tracking.stage_run("base", params) as rerun:  # a stage re-run is a new pipeline run
        pass
    assert rerun.new and rerun.run_id != first.run_id and "already ran" in rerun.reason

    changed = params.model_copy(deep=True)
    changed.eval.max_new_tokens = 5
    with tracking.stage_run("evaluate", changed) as other:
        pass
    assert other.new and other.reason == "parameters changed since the recorded run"

    run = client_for(sqlite_uri).get_run(first.run_id)
    assert run.data.params["registry.model_name"] == "grouping"
    assert run.data.params["train.text.trainable"] == '["projector", "language_model"]'
    assert run.data.tags["vift.preset"] == "ci" and run.info.status == "FINISHED"


def test_a_stage_logs_its_outputs_with_steps_and_a_failed_stage_is_marked(ci_params, sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.chdir(tmp_path)
    params = params_for(ci_params, "logging")
    reports = tmp_path / "reports"
    with tracking.stage_run("train_text", params) as handle:
        reports.mkdir()
        (reports / "train_text.json").write_text(
            json.dumps({"seconds": 2.0, "history": [{"step": s, "loss": 1.0 / s, "grad_norm": 0.5} for s in (10, 20, 30)]})
        )
    with tracking.stage_run("evaluate", params):
        (reports / "metrics.json").write_text(json.dumps(metrics_payload(0.6)))
        (reports / "ablation.md").write_text("table\n")
        (reports / "predictions").mkdir()
        (reports / "predictions" / "vift_fused.jsonl").write_text("{}\n")
    client = client_for(sqlite_uri)
    history = client.get_metric_history(handle.run_id, "train_text/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]
    assert len(client.get_metric_history(handle.run_id, "train_text/grad_norm")) == 3
    metrics = client.get_run(handle.run_id).data.metrics
    assert metrics["eval/vift_fused/accuracy"] == 0.6
    assert metrics["eval/vift_fused/ci95_low"] == pytest.approx(0.5)
    assert metrics["eval/vift_fused/ci95_high"] == pytest.approx(0.7)
    assert metrics["eval/question_only/accuracy"] == 0.25
    logged = {a.path for a in client.list_artifacts(handle.run_id, "reports")}
    assert {"reports/metrics.json", "reports/ablation.md", "reports/train_text.json"} <= logged
    assert [a.path for a in client.list_artifacts(handle.run_id, "predictions")] == ["predictions/vift_fused.jsonl"]

    with pytest.raises(RuntimeError), tracking.stage_run("calibrate", params) as failing:
        raise RuntimeError("boom")
    assert failing.run_id == handle.run_id
    assert client.get_run(handle.run_id).info.status == "FAILED"
    state = json.loads((tmp_path / ".vift" / "mlflow_run.json").read_text())
    assert "calibrate" not in state["stages"]  # a failed stage may be re-run in the same run


def test_only_rank_zero_logs(ci_params, sqlite_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.chdir(tmp_path)
    assert server.is_main_process({}) and server.is_main_process({"RANK": "0", "LOCAL_RANK": "0"})
    assert not server.is_main_process({"RANK": "3", "LOCAL_RANK": "0"})
    assert not server.is_main_process({"LOCAL_RANK": "1"})
    monkeypatch.setenv("RANK", "1")
    with tracking.stage_run("train_text", params_for(ci_params, "ranks")) as handle:
        assert handle is None
    assert not (tmp_path / ".vift").exists()


def test_unreachable_server_is_a_clear_user_error_and_other_stages_still_run(ci_params, tmp_path, monkeypatch, capsys):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("VIFT_TRACKING_RETRIES", "3")
    monkeypatch.setenv("VIFT_TRACKING_BACKOFF", "0.05")
    monkeypatch.chdir(tmp_path)
    params = params_for(ci_params, "unreachable")
    write_params(params, tmp_path / "params.yaml")

    started = time.monotonic()
    assert main(["stage", "register", "--params", str(tmp_path / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable (3 attempt(s)" in err
    assert "re-run `vift stage register`" in err
    assert time.monotonic() - started < 30

    # A training stage still succeeds, untracked, and keeps its outputs.
    with tracking.stage_run("train_text", params) as handle:
        assert handle is None
        (tmp_path / "out.txt").write_text("kept")
    assert (tmp_path / "out.txt").read_text() == "kept"
    assert "the stage runs (or ran) untracked" in capsys.readouterr().err

    monkeypatch.setenv("VIFT_TRACKING", "required")
    with pytest.raises(UserError, match="unreachable"), tracking.stage_run("train_text", params):
        pass


def test_credentials_are_not_shown_and_dvc_lock_hashes_become_tags(tmp_path):
    assert server.redact("https://alice:s3cret@mlflow.example.com:5000") == "https://***@mlflow.example.com:5000"
    assert (
        server.run_link("https://alice:s3cret@mlflow.example.com:5000/mlflow/", "7", "abc")
        == "https://mlflow.example.com:5000/mlflow/#/experiments/7/runs/abc"
    )
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  data:\n    cmd: vift stage data\n    outs:\n    - path: data/benchmark\n"
        "      hash: md5\n      md5: abc.dir\n    - path: reports/data.json\n      md5: zzz\n  calibrate:\n"
        "    outs:\n    - path: models/fusion.json\n      hash: md5\n      md5: def\n"
    )
    assert outputs.dvc_lock_hashes(tmp_path) == {"data/benchmark": "abc.dir", "models/fusion.json": "def"}


# ----------------------------------------------------------------------------------------------
# Registration and the champion gate
# ----------------------------------------------------------------------------------------------


def test_gate_decision_rules():
    assert gate.decide(0.5, None, 0.0, None).promote  # no champion yet
    assert gate.decide(0.61, 0.5, 0.1, "1").promote
    assert not gate.decide(0.6, 0.5, 0.1, "1").promote  # by more than the margin, strictly
    assert not gate.decide(0.5, 0.5, 0.0, "1").promote
    assert not gate.decide(0.9, None, 0.0, "1").promote  # champion without an accuracy tag


def test_the_gate_needs_evidence_against_the_question_alone_and_the_majority_guess():
    passing = metrics_payload(0.5)["evidence"]["vift_fused"]
    assert gate.evidence_failure(passing, "vift_fused") is None
    straddling = metrics_payload(0.32, spread=0.05)["evidence"]["vift_fused"]  # vs majority: [-0.03, +0.07]
    failure = gate.evidence_failure(straddling, "vift_fused")
    assert not failure.promote
    assert "majority_per_type = +0.0200, 95 % CI [-0.0300, +0.0700], McNemar p = 0.4: not above 0" in failure.reason
    assert "question_only" not in failure.reason  # that one is beaten: [+0.02, +0.12]
    assert "re-run the evaluate stage" in gate.evidence_failure(None, "vift_fused").reason
    assert "no comparison with majority_per_type" in gate.evidence_failure({"question_only": passing["question_only"]}, "x").reason
    one_sided = {c: {**passing[c], "mcnemar_p": 0.125} for c in passing}  # bootstrap above 0, McNemar not
    assert "McNemar p = 0.125" in gate.evidence_failure(one_sided, "vift_fused").reason


@pytest.mark.slow
def test_register_gate_and_idempotency(ci_params, ci_data, saved_model, items, expected, sqlite_uri, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    name = "gate-test"
    params = params_for(ci_params, name, margin=0.05)
    workspace = make_workspace(tmp_path, saved_model, ci_data, params, accuracy=0.50)
    monkeypatch.chdir(workspace)
    client = client_for(sqlite_uri)

    def versions():
        return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))

    def alias(a):
        return str(client.get_model_version_by_alias(name, a).version)

    first = register(workspace)
    assert first["action"] == "registered" and first["version"] == "1"
    assert first["aliases"] == {"candidate": "1", "champion": "1"} and first["gate"]["promoted"]
    assert set(first["backfilled_stages"]) >= {"calibrate", "evaluate", "train_text"}
    run = client.get_run(first["run_id"])
    assert run.data.metrics["eval/vift_fused/accuracy"] == 0.5
    assert [m.step for m in client.get_metric_history(first["run_id"], "train_text/loss")] == [1, 2, 3]
    fusion_artifacts = {a.path for a in client.list_artifacts(first["run_id"], "fusion")}
    assert {"fusion/fusion.json", "fusion/calibration_heatmap.png"} <= fusion_artifacts
    assert run.data.tags["vift.registered_version"] == "1"
    v1 = client.get_model_version(name, "1")
    assert v1.tags["vift.run_id"] == first["run_id"] and v1.tags["accuracy.vift_fused"] == "0.5"
    # Tags hold lineage and what the gate compares; every row's metrics are on the logged model.
    assert not any(key.startswith("accuracy.") for key in v1.tags if key not in ("accuracy.vift_fused", "accuracy.served"))
    logged = {m.key: m.value for m in client.get_logged_model(v1.source.removeprefix("models:/")).metrics}
    assert logged["question_only.accuracy"] == 0.25 and logged["vift_fused.ci95_low"] == pytest.approx(0.4)

    # The registered model answers like fused_generate, and params switch fusion off. It is
    # models-from-code: it loads with pickle deserialization forbidden, and no pickle is stored.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    assert not list(local.rglob("*.pkl")) and (local / "served_model.py").is_file()
    frame = pd.DataFrame({"image": [p.read_bytes() for p in items[0]], "question": items[1]})
    assert model.predict(frame, params={"max_new_tokens": MAX_NEW_TOKENS}) == expected["fused"]
    assert model.predict(frame, params={"fusion": False, "max_new_tokens": MAX_NEW_TOKENS}) == expected["plain"]
    assert model.metadata.get_params_schema().to_dict()[0]["name"] in {"fusion", "max_new_tokens"}

    # Re-running register for the same run registers nothing.
    again = register(workspace)
    assert again["action"] == "already_registered" and again["version"] == "1" and again["aliases_moved"] == []
    # ... and reports the gate decided at registration, details included (not a generic stub).
    assert again["gate"]["reason"] == f"decided when this version was registered: {first['gate']['reason']}"
    assert again["gate"]["champion_version_before"] == first["gate"]["champion_version_before"]
    assert first["run_url"] is None  # the embedded sqlite store has no UI to link to
    assert versions() == [1]

    # The next pipeline run (here: evaluate re-runs) scores worse: candidate only.
    with tracking.stage_run("evaluate", params) as evaluate:
        (workspace / "reports" / "metrics.json").write_text(json.dumps(metrics_payload(0.40)))
    assert evaluate.new and evaluate.run_id != first["run_id"]
    worse = register(workspace)
    assert worse["version"] == "2" and worse["aliases_moved"] == ["candidate"]
    assert worse["gate"]["champion_accuracy_before"] == 0.5 and not worse["gate"]["promoted"]
    assert "does not beat champion 0.5000 by more than the margin 0.05" in worse["gate"]["reason"]
    assert (alias("candidate"), alias("champion")) == ("2", "1")

    # A better one moves champion.
    with tracking.stage_run("evaluate", params):
        (workspace / "reports" / "metrics.json").write_text(json.dumps(metrics_payload(0.70)))
    better = register(workspace)
    assert better["version"] == "3" and better["aliases_moved"] == ["candidate", "champion"]
    assert (alias("candidate"), alias("champion")) == ("3", "3")
    assert versions() == [1, 2, 3]


@pytest.mark.slow
def test_a_version_that_loses_to_its_controls_is_never_champion(ci_params, ci_data, saved_model, sqlite_uri, tmp_path, monkeypatch):
    # Before: the first version became champion although its verdict said fusion beat no control.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    name = "loses-to-controls"
    workspace = make_workspace(tmp_path, saved_model, ci_data, params_for(ci_params, name), accuracy=0.28)
    monkeypatch.chdir(workspace)
    report = register(workspace)
    assert report["action"] == "registered" and report["aliases"] == {"candidate": "1", "champion": None}
    assert not report["gate"]["promoted"] and report["gate"]["reason"].startswith("kept as candidate: does not beat its controls")
    client = client_for(sqlite_uri)
    version = client.get_model_version(name, "1")
    assert version.tags["vift.gate"] == "kept" and "majority_per_type" in version.tags["vift.gate_decision"]
    # The model card: what a person reads in the MLflow UI, on the version and (no champion yet) the model.
    card = version.description
    assert card.startswith(f"# {name} version 1") and "**served mode**: `fused` (row `vift_fused`" in card
    assert "**gate**: candidate: kept as candidate" in card and "| vift_fused | 28.0 |" in card
    assert client.get_registered_model(name).description == card


def test_the_registered_model_is_named_after_the_data(ci_params):
    params = ci_params.model_copy(deep=True)
    params.registry.model_name = None
    assert params.registered_model_name() == "vift-shapetally"
    params.data = params.data.model_copy(update={"source": "import", "import_dir": "data/imported/x", "name": "street-signs"})
    assert params.registered_model_name() == "vift-street-signs"
    params.registry.model_name = "mine"
    assert params.registered_model_name() == "mine"


def test_register_names_the_missing_input(ci_params, sqlite_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.chdir(tmp_path)
    write_params(params_for(ci_params, "missing"), tmp_path / "params.yaml")
    assert main(["stage", "register", "--params", str(tmp_path / "params.yaml")]) == 1
    assert "models/vift" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# e2e: a real tracking server with artifacts proxied to S3 (moto), consumers in fresh processes
# ----------------------------------------------------------------------------------------------


def wait_http(url: str, deadline_s: float, process: subprocess.Popen | None = None) -> None:
    import requests

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode} before {url} answered")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {deadline_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def read_log(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (sqlite backend), artifacts proxied to moto's S3 server."""
    import boto3
    from moto.server import ThreadedMotoServer

    tmp = tmp_path_factory.mktemp("mlflow-server")
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    s3_url = "http://{}:{}".format(*s3.get_host_and_port())
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket.create_bucket(Bucket="vift-artifacts")
    port = free_port()
    # No background job runner: the test needs the tracking API and the artifact proxy only.
    env = {**os.environ, **credentials, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--artifacts-destination", "s3://vift-artifacts/mlartifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 120, server)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n{read_log(log)}") from None
        yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", s3=bucket, bucket="vift-artifacts", log=log)
    finally:
        stop(server)
        s3.stop()


def clean_env(**extra) -> dict:
    """The environment of a consumer elsewhere: no AWS credentials, the venv first on PATH."""
    drop = ("AWS_", "MLFLOW_", "VIFT_", "RANK", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.mark.e2e
@pytest.mark.slow
def test_registered_on_a_server_pulled_by_a_fresh_process_and_served(
    mlflow_server, ci_params, ci_data, saved_model, items, expected, tmp_path, monkeypatch, capsys
):
    import requests

    name = "vift-e2e"
    # A password in the tracking URI (the server ignores it) must reach no output and no record.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri.replace("http://", "http://alice:hunter2@"))
    workspace = make_workspace(tmp_path / "ws", saved_model, ci_data, params_for(ci_params, name), accuracy=0.55)
    monkeypatch.chdir(workspace)
    capsys.readouterr()
    report = register(workspace)
    assert report["version"] == "1" and report["aliases"]["champion"] == "1"
    printed = capsys.readouterr()
    records = [(workspace / ".vift" / "mlflow_run.json").read_text(), (workspace / "reports" / "registration.json").read_text()]
    assert "hunter2" not in printed.out + printed.err + "".join(records)
    assert report["run_url"].startswith(f"{mlflow_server.uri}/#/experiments/")
    keys = [o["Key"] for o in mlflow_server.s3.list_objects_v2(Bucket=mlflow_server.bucket).get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), "artifacts should be proxied to S3"
    monkeypatch.chdir(tmp_path)

    # Start the scoring server first (slowest), pull with `vift predict` meanwhile.
    port = free_port()
    serve_log = tmp_path / "serve.log"
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    with open(serve_log, "wb") as out:
        serve = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        command = [str(BIN / "vift"), "predict", "--model", f"models:/{name}@champion", "--json",
                   "--max-new-tokens", str(MAX_NEW_TOKENS), "--question", items[1][0]]  # fmt: skip
        for path in items[0][:1]:
            command += ["--image", str(path)]
        done = subprocess.run(command, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        answer = json.loads(done.stdout)
        assert answer["version"] == "1" and answer["fusion"] is True
        assert [a["answer"] for a in answer["answers"]] == expected["fused_one"]

        # --no-fusion (in this process, to save a start-up): the plain model's answer.
        capsys.readouterr()
        assert main([*command[1:], "--no-fusion"]) == 0
        assert [a["answer"] for a in json.loads(capsys.readouterr().out)["answers"]] == expected["plain_one"]

        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 240, serve)
        except (RuntimeError, TimeoutError) as error:
            raise AssertionError(f"{error}\n{read_log(serve_log)}") from None
        image = base64.b64encode(items[0][0].read_bytes()).decode()
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            json={
                "dataframe_split": {"columns": ["image", "question"], "data": [[image, items[1][0]]]},
                "params": {"max_new_tokens": MAX_NEW_TOKENS},
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == expected["fused_one"]

        # Requests are data: a host path is refused like any non-image string, an over-long
        # question before it is tokenized; HTTP 400, no stack trace in the body.
        for image_field, question in (("/etc/hostname", items[1][0]), (image, "x" * 100_000)):
            refused = requests.post(
                f"http://127.0.0.1:{port}/invocations",
                json={"dataframe_split": {"columns": ["image", "question"], "data": [[image_field, question]]}},
                timeout=60,
            )
            assert refused.status_code == 400, refused.text[:500]
            assert "stack_trace" not in refused.text and "Traceback" not in refused.text
    finally:
        stop(serve)


@pytest.mark.e2e
def test_predict_names_a_missing_model(mlflow_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", "--model", "models:/no-such-model@champion", "--image", str(image), "--question", "q"]) == 1
    assert "models:/no-such-model@champion: no such registered model version" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["jsonl", "json array"])
def test_the_input_example_is_the_first_test_item_with_an_image_in_either_manifest_layout(tmp_path, ci_data, layout):
    from vift.registry.gate import _example

    records = [json.loads(line) for line in (ci_data / "test.jsonl").read_text().splitlines()[:3]]
    data = tmp_path / "data" / "benchmark"
    for record in records:
        (data / record["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ci_data / record["image"], data / record["image"])
    text = json.dumps(records) if layout == "json array" else "".join(json.dumps(r) + "\n" for r in records)
    (data / "test.jsonl").write_text(text)
    assert _example(tmp_path) == (data / records[0]["image"], records[0]["question"])
    records[0]["image"] = "../../outside.png"  # escapes the data root: skipped, the next item is used
    (data / "test.jsonl").write_text(json.dumps(records))
    assert _example(tmp_path) == (data / records[1]["image"], records[1]["question"])
    assert _example(tmp_path / "empty") == (None, "How many shapes are there?")


def test_inside_a_dvc_experiment_tracking_goes_to_the_repositorys_database_not_the_temporary_copy(tmp_path, monkeypatch):
    from vift.registry.tracking import embedded_artifact_root
    from vift.settings import dvc_experiment, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp1"
    assert dvc_experiment() == {} and tracking_uri(copy) == f"sqlite:///{copy / 'mlflow.db'}"
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-oval")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert dvc_experiment() == {"name": "bushy-oval", "baseline_rev": "abc123", "root": str(tmp_path / "repo")}
    uri = tracking_uri(copy)
    assert uri == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert embedded_artifact_root(uri) == (tmp_path / "repo" / "mlruns").as_uri()
    assert embedded_artifact_root("http://mlflow:5000") is None
