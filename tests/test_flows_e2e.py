"""The pipeline flow for real: a `prefect server start` process on 127.0.0.1, the deployments served
by `vift serve`, flow runs created through the API the way the UI creates them (ci preset)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from storage_support import free_port

from tests.conftest import REPO

BIN = Path(sys.executable).parent
DEPLOYMENT = "vift-pipeline/vift-pipeline"
SWEEP_DEPLOYMENT = "vift-data-efficiency/vift-data-efficiency"
RUN_TIMEOUT = 900


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def make_project(root: Path, env: dict) -> Path:
    """A git repository holding the project's files (what a clone has), with no outputs yet."""
    from flows.pipeline import copy_worktree

    root.mkdir(parents=True)
    copy_worktree(REPO, root)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"],
    ):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    return env


@pytest.fixture(scope="module")
def prefect_server(environment, tmp_path_factory):
    port = free_port()
    env = dict(environment, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'prefect.db'}")
    log = open(tmp_path_factory.mktemp("logs") / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy():
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return server.poll() is not None and pytest.fail(f"prefect server exited: {Path(log.name).read_text()[-2000:]}")

    try:
        wait_until(healthy, 120, "prefect server health")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def served_project(prefect_server, environment, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("served") / "project", environment)
    env = dict(environment, PREFECT_API_URL=prefect_server)
    log = open(project.parent / "serve.log", "w")
    serve = subprocess.Popen(
        [str(BIN / "vift"), "serve", "--limit", "2"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        with api_client(prefect_server) as client:
            wait_until(lambda: _deployment(client) and _deployment(client, SWEEP_DEPLOYMENT), 120, "the served deployments")
        yield project, prefect_server
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def api_client(url: str):
    """A sync Prefect client for the test server (settings are read once, so set them explicitly)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def _deployment(client, name=DEPLOYMENT):
    try:
        return client.read_deployment_by_name(name)
    except Exception:  # noqa: BLE001 - not registered yet
        return None


def _final_state(client, run_id):
    run = client.read_flow_run(run_id)
    return run if run.state and run.state.is_final() else None


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_two_concurrent_ui_runs_complete_with_their_own_outputs_artifacts_and_mlflow_runs(served_project):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    project, url = served_project
    with api_client(url) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        runs = [
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"parameters": {"preset": "ci", "overrides": {"data.seed": seed, "seed": seed}, "isolate": True}}
            )
            for seed in (1, 2)
        ]
        finished = [wait_until(lambda r=run: _final_state(client, r.id), RUN_TIMEOUT, f"flow run {run.name}", 3) for run in runs]
        for run in finished:
            assert run.state.is_completed(), f"{run.name}: {run.state.message}"
        names = [run.name for run in finished]
        assert names[0] != names[1] and all(name.startswith("ci-") for name in names)
        metrics = []
        for run in finished:
            workspace = project / ".vift" / "runs" / run.name
            content = json.loads((workspace / "reports" / "metrics.json").read_text())
            metrics.append(content["rows"])
            # ShapeTally's test records carry reference descriptions: the perception table is there.
            assert set(content["perception"]) == {"caption", "vift", "vit"}
            assert all(row["n"] == content["rows"]["vift_fused"]["n"] for row in content["perception"].values())
            assert (workspace / "dvc.lock").is_file() and (workspace / "models" / "vift" / "model.safetensors").is_file()
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            assert {"ablation-table", "metrics", "registration"} <= {a.key for a in artifacts}
        assert metrics[0]["majority_per_type"] != metrics[1]["majority_per_type"]
    for run in finished:  # each isolated workspace tracks into its own embedded database
        with sqlite3.connect(project / ".vift" / "runs" / run.name / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] >= 1


@pytest.mark.e2e
@pytest.mark.parametrize(
    "deployment, parameters, field",
    [
        (DEPLOYMENT, {"preset": "ci", "overrides": {"train.text.learning_rate": -1}}, "train.text.learning_rate"),
        (SWEEP_DEPLOYMENT, {"preset": "ci", "fractions": [0.0, 1.0]}, "fractions"),
    ],
    ids=["pipeline", "sweep"],
)
def test_invalid_parameters_from_the_api_are_rejected_with_the_field_named(served_project, deployment, parameters, field):
    _, url = served_project
    with api_client(url) as client:
        run = client.create_flow_run_from_deployment(client.read_deployment_by_name(deployment).id, parameters={"parameters": parameters})
        final = wait_until(lambda: _final_state(client, run.id), 120, "the invalid run to end", 1)
    assert not final.state.is_completed()
    assert field in (final.state.message or "")


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_the_served_sweep_trains_each_fraction_in_its_own_workspace_and_plots_accuracy_against_samples(served_project):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.sweep import SweepParameters

    project, url = served_project
    with api_client(url) as client:
        deployment = client.read_deployment_by_name(SWEEP_DEPLOYMENT)
        # fan_out: each point is a run of the pipeline deployment (a work pool would run them in parallel)
        sweep = {"preset": "ci", "fractions": [1.0, 0.5], "fan_out": 2}
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"parameters": sweep})
        final = wait_until(lambda: _final_state(client, run.id), RUN_TIMEOUT, "the sweep run", 3)
        assert final.state.is_completed(), final.state.message
        assert final.name.startswith("data-efficiency-ci-")
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert {"data-efficiency", "data-efficiency-points"} <= {a.key for a in artifacts}
        pipeline = client.read_deployment_by_name(DEPLOYMENT)
        point_names = {SweepParameters(**sweep, workspace=str(project)).point(f).name() for f in sweep["fractions"]}
        point_runs = [r for r in client.read_flow_runs(limit=200) if r.deployment_id == pipeline.id and r.name in point_names]
        assert {r.name for r in point_runs} == point_names and all(r.state.is_completed() for r in point_runs)
    out = project / "reports" / "sweeps" / final.name
    summary = json.loads((out / "data_efficiency.json").read_text())
    points = summary["points"]
    assert [p["fraction"] for p in points] == [0.5, 1.0]
    # ci: 120 captions, 120 text and 120 visual instructions; half of each at 0.5.
    assert [p["samples"] for p in points] == [{"vift": 120, "vit": 120}, {"vift": 240, "vit": 240}]
    workspaces = [Path(p["workspace"]) for p in points]
    assert len(set(workspaces)) == 2 and all(w.parent == project / ".vift" / "runs" for w in workspaces)
    weights = [(w / "models" / "vift" / "model.safetensors").read_bytes() for w in workspaces]
    assert weights[0] != weights[1]
    for point, workspace in zip(points, workspaces):
        rows = json.loads((workspace / "reports" / "metrics.json").read_text())["rows"]
        assert point["rows"]["vit_baseline"]["accuracy"] == rows["vit_baseline"]["accuracy"]
        assert not (workspace / "reports" / "registration.json").exists()  # sweep points are not registered
    lines = (out / "data_efficiency.csv").read_text().splitlines()
    assert lines[0].startswith("fraction,row,samples,accuracy") and len(lines) == 1 + 2 * 4
    assert (out / "data_efficiency.png").stat().st_size > 1000
    with sqlite3.connect(project / "mlflow.db") as db:
        steps = db.execute(
            "select m.step from metrics m join runs r on m.run_uuid = r.run_uuid where r.name = ? and m.key = 'vift_fused.accuracy' order by m.step",
            (final.name,),
        ).fetchall()
    assert [step for (step,) in steps] == [120, 240]


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_a_run_killed_during_train_text_resumes_after_train_caption(environment, tmp_path):
    project = make_project(tmp_path / "project", environment)
    command = [str(BIN / "vift"), "flow", "run", "--preset", "ci", "--isolate"]
    first = subprocess.Popen(
        command, cwd=project, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    runs = project / ".vift" / "runs"

    def train_text_started():
        locks = list(runs.glob("*/dvc.lock"))
        return locks and "train_caption:" in locks[0].read_text()

    try:
        wait_until(train_text_started, RUN_TIMEOUT, "train_caption to finish")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    lock = next(runs.glob("*/dvc.lock")).read_text()
    assert "train_text:" not in lock and "evaluate:" not in lock
    second = subprocess.run(command, cwd=project, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    for stage in ("data", "base", "train_caption"):
        assert f"Stage '{stage}' didn't change, skipping" in log
    assert "Running stage 'train_text'" in log


def write_own_dataset(root: Path) -> Path:
    """A new user's folder: pictures of one coloured shape each, captions, text-only instructions,
    calibration and test VQA. No backbone text, no visual instructions, no reference descriptions."""
    from PIL import Image, ImageDraw

    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square"]
    (root / "pictures").mkdir(parents=True)

    def picture(index: int) -> tuple[str, str, str]:
        colour, shape = colours[index % 4], shapes[(index // 4) % 2]
        image = Image.new("RGB", (40, 40), "white")
        draw = ImageDraw.Draw(image)
        box = (8 + index % 3, 8, 32, 32 - index % 3)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        name = f"pictures/{index:03d}.png"
        image.save(root / name)
        return name, colour, shape

    def lines(records) -> str:
        return "".join(json.dumps(r) + "\n" for r in records)

    captions, calibration, test = [], [], []
    for index in range(64):
        name, colour, shape = picture(index)
        if index < 40:
            captions.append({"id": f"cap{index}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"A {colour} {shape} on a white background."}]})  # fmt: skip
        else:
            item = {"id": f"q{index}", "image": name, "question": "What colour is the shape?", "answer": colour, "type": "colour"}
            (calibration if index < 48 else test).append(item)
    text = [{"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"A picture shows a {colours[i % 4]} {shapes[i % 2]}. What colour is the shape?"},
        {"from": "gpt", "value": colours[i % 4]}]} for i in range(40)]  # fmt: skip
    for split, records in (("captions", captions), ("text_instructions", text), ("calibration", calibration), ("test", test)):
        (root / f"{split}.jsonl").write_text(lines(records))
    return root


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_own_data_imported_then_the_flow_trains_on_it_without_baseline_and_names_the_model_after_it(environment, tmp_path):
    project = make_project(tmp_path / "project", environment)
    source = write_own_dataset(tmp_path / "street-shapes")
    vift = str(BIN / "vift")
    template = "prompts.over_description=A picture shows {description} {question}"  # as the text instructions ask
    for command in ([vift, "params", "use", "ci", "--set", template], [vift, "data", "import", str(source)]):
        done = subprocess.run(command, cwd=project, env=environment, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert "visual_instructions: not provided (optional; read by train_vit" in done.stdout
    # What the README presents as the way to run: the preset chooses training settings, not the data.
    run = subprocess.run(
        [vift, "flow", "run", "--preset", "ci"], cwd=project, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    summary = json.loads((project / "data" / "benchmark" / "summary.json").read_text())
    assert summary["world"] == "import" and summary["sizes"] == {"captions": 40, "text_instructions": 40, "calibration": 8, "test": 16}
    assert json.loads((project / "reports" / "train_vit.json").read_text())["summary"]["skipped"].endswith(
        "the vit_baseline row is left out)"
    )
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert "vit_baseline" not in metrics["rows"] and "oracle_description" not in metrics["rows"]
    assert {"vift_fused", "question_only", "majority_per_type", "describe_then_answer"} <= set(metrics["rows"])
    assert all(row["n"] == 16 for row in metrics["rows"].values())
    base = json.loads((project / "reports" / "base.json").read_text())
    assert base["pretrain_split"] == "text_instructions" and "skipped" in base["text_accuracy"]

    serving = json.loads((project / "models" / "fusion.json").read_text())["serving"]
    assert set(serving["accuracy"]) == {"plain", "fused", "describe_then_answer"}
    # The data set's prompts travel with it: the captions' own instruction, the template set above.
    assert serving["prompts"] == {"describe": "What is in the picture?", "over_description": "A picture shows {description} {question}"}
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["model_name"] == "vift-street-shapes" and registration["served_mode"] == serving["mode"]
    row = {"plain": "vift_unfused", "fused": "vift_fused", "describe_then_answer": "describe_then_answer"}[serving["mode"]]
    assert registration["gate_row"] == row
    evidence = metrics["evidence"][row]
    beats_controls = all(evidence[c]["ci95"][0] > 0 and evidence[c]["mcnemar_p"] < 0.05 for c in ("question_only", "majority_per_type"))
    assert registration["gate"]["promoted"] == beats_controls
    if not beats_controls:
        assert registration["aliases"]["champion"] is None
        assert registration["gate"]["reason"].startswith("kept as candidate: does not beat its controls")
