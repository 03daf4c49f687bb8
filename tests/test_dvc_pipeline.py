"""The DVC stage graph, end to end, in a temporary git + DVC repository: `dvc repro`, push to a real
S3-compatible HTTP endpoint (moto), delete everything local, pull, and nothing reruns; reruns are
no-ops; a parameter change reruns only the stages that depend on it; presets switch cleanly.

THE stage graph under test is one variable, ``STAGES``: dvc.yaml's whole graph on the ci preset
(``own_pipeline()``, dvc.yaml's ``data`` stage plus a small metrics stage, is the quick variant
for working on DVC plumbing). Every expectation below (which stages run, which outputs to delete)
is derived from it. Stage tracking goes to the repository's embedded MLflow database, as on a
laptop: ``register`` needs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from storage_support import CLEARED_ENV, MotoEndpoint, cache_object_count, isolated_env, verify_content_addressed

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
PARAMS = "params/params.yaml"
TIMEOUT = 420  # seconds, for any one command (a full ci repro on 2 loaded cores)

METRICS_SCRIPT = '''\
"""Summarise the data stage into reports/metrics.json (a stand-in for `vift stage evaluate`)."""
import json
from pathlib import Path

import yaml

params = yaml.safe_load(Path("params/params.yaml").read_text())
summary = json.loads(Path("data/benchmark/summary.json").read_text())
metrics = {"sizes": summary["sizes"], "eval_batch_size": params["eval"]["batch_size"],
           "text_learning_rate": params["train"]["text"]["learning_rate"]}
Path("reports").mkdir(exist_ok=True)
Path("reports/metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\\n")
'''


def project_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def own_pipeline() -> dict:
    """dvc.yaml's real `data` stage plus a small metrics stage that depends on it and on `eval`."""
    return {
        "data": project_stages()["data"],
        "metrics": {
            "cmd": "python scripts/metrics.py",
            "deps": ["data/benchmark", "scripts/metrics.py"],
            "params": [{PARAMS: ["eval", "train.text.learning_rate"]}],
            "metrics": ["reports/metrics.json"],  # cached: pushed, deleted and pulled like any output
        },
    }


def full_pipeline() -> dict:
    return project_stages()


STAGES = full_pipeline()


# --------------------------------------------------------------------------------------------
# what the stage graph implies


def _entries(stage: dict, kind: str):
    for entry in stage.get(kind, []) or []:
        if isinstance(entry, str):
            yield entry, {}
        else:
            for path, options in entry.items():
                yield path, options or {}


def cached_outputs(stages: dict) -> list[str]:
    """Every output DVC caches (and so pushes/pulls); `cache: false` ones belong in git."""
    return [
        path
        for stage in stages.values()
        for kind in ("outs", "metrics", "plots")
        for path, options in _entries(stage, kind)
        if options.get("cache", True)
    ]


def uncached_outputs(stages: dict) -> list[str]:
    """`cache: false` outputs: DVC expects them in git."""
    return [
        path
        for stage in stages.values()
        for kind in ("outs", "metrics", "plots")
        for path, options in _entries(stage, kind)
        if not options.get("cache", True)
    ]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def stages_reading(stages: dict, param: str) -> set[str]:
    """Stages whose params cover ``param`` (dotted): what `dvc status` reports once it changes."""
    reading = set()
    for name, stage in stages.items():
        for entry in stage.get("params", []) or []:
            keys = entry.get(PARAMS, []) if isinstance(entry, dict) else [entry]
            if any(param == key or param.startswith(f"{key}.") or key.startswith(f"{param}.") for key in keys):
                reading.add(name)
    return reading


def stages_affected_by(stages: dict, param: str) -> set[str]:
    """The stages reading ``param`` plus everything downstream of them: what `dvc repro` reruns."""
    affected = stages_reading(stages, param)
    outs = {name: [p for kind in ("outs", "metrics", "plots") for p, _ in _entries(s, kind)] for name, s in stages.items()}
    changed = True
    while changed:
        changed = False
        for name, stage in stages.items():
            if name in affected:
                continue
            deps = [d for d, _ in _entries(stage, "deps")]
            if any(_under(dep, out) or _under(out, dep) for up in affected for out in outs[up] for dep in deps):
                affected.add(name)
                changed = True
    return affected


def pushed_objects(repo: Path) -> set[str]:
    """Cache objects (md5s) a push must send: the cached outputs in dvc.lock, directories expanded.

    (The cache may hold more: DVC's run cache also stores `cache: false` outputs, which are not pushed.)
    """
    cached = set(cached_outputs(STAGES))
    objects = set()
    for stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] not in cached:
                continue
            objects.add(out["md5"])
            if out["md5"].endswith(".dir"):
                listing = repo / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
                objects.update(entry["md5"] for entry in json.loads(listing.read_text()))
    return objects


# --------------------------------------------------------------------------------------------
# fixtures and helpers


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def dvc(repo: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([BIN / "dvc", *args], repo, env)


def vift(repo: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([BIN / "vift", *args], repo, env)


def changed_stages(repo: Path) -> set[str]:
    """Stages `dvc status` reports as changed (the ones `dvc repro` would run)."""
    return {name.split(":")[-1] for name in json.loads(ok(dvc(repo, "status", "--json")) or "{}")}


def would_run(repo: Path) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", ok(dvc(repo, "repro", "--dry"))))


def assert_nothing_ran(output: str) -> None:
    assert "Running stage" not in output, output
    for name in STAGES:
        assert f"Stage '{name}' didn't change, skipping" in output, output
    assert "Data and pipelines are up to date." in output


@pytest.fixture(scope="module")
def pipeline_template(tmp_path_factory) -> Path:
    """A git + DVC repository with STAGES, the ci preset, the code they depend on, reproduced once."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(isolated_env(root.parent / "env", BIN), VIFT_TRACKING="auto")
    ok(run(["git", "init", "-q"], root, env))
    ok(dvc(root, "init", "-q", env=env))
    (root / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copytree(REPO / "vift", root / "vift", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "scripts").mkdir()
    (root / "scripts" / "metrics.py").write_text(METRICS_SCRIPT)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": STAGES}, sort_keys=False))
    ok(vift(root, "params", "use", "ci", env=env))
    ok(dvc(root, "repro", env=env))
    assert (root / "reports" / "metrics.json").is_file()
    ok(run(["git", "add", "-A"], root, env))
    ok(run(["git", "commit", "-q", "-m", "pipeline"], root, env))
    return root


@pytest.fixture
def workspace(pipeline_template, tmp_path, env, monkeypatch) -> Path:
    """A private copy of the reproduced repository (git history, cache, outputs and all)."""
    monkeypatch.setenv("VIFT_TRACKING", "auto")  # into the copy's own mlflow.db (register needs it)
    root = tmp_path / "repo"
    shutil.copytree(pipeline_template, root, symlinks=True)
    return root


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_push_delete_everything_pull_and_nothing_reruns(workspace):
    repo = workspace
    bucket = "vift-pipeline"
    with MotoEndpoint() as endpoint:
        ok(vift(repo, "storage", "configure", "--endpoint", endpoint.url, "--bucket", bucket, "--create-bucket", "--default"))
        out = ok(vift(repo, "storage", "push"))
        expected = pushed_objects(repo)
        assert f"{len(expected)} file(s) pushed" in out

        metrics = (repo / "reports" / "metrics.json").read_bytes()
        lock = (repo / "dvc.lock").read_bytes()
        outputs = cached_outputs(STAGES)
        for path in outputs:
            target = repo / path
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(repo / ".dvc" / "tmp", ignore_errors=True)
        assert changed_stages(repo) == set(STAGES)  # everything is missing now

        ok(dvc(repo, "pull"))  # plain DVC reads the remote vift configured
        assert "Data and pipelines are up to date." in ok(dvc(repo, "status"))
        assert_nothing_ran(ok(dvc(repo, "repro")))
        assert (repo / "reports" / "metrics.json").read_bytes() == metrics
        assert (repo / "dvc.lock").read_bytes() == lock
        # Every object in the bucket hashes to its key; the pulled cache holds exactly those.
        assert verify_content_addressed(endpoint.objects(bucket), "dvc") == len(expected) == cache_object_count(repo)

        # The endpoint goes away mid-session: a clear error, non-zero exit, the workspace intact.
        endpoint.stop()
        for verb in ("pull", "push"):
            result = vift(repo, "storage", verb)
            assert result.returncode == 1
            assert "endpoint unreachable: connection refused" in result.stderr, result.stderr
        assert (repo / "reports" / "metrics.json").read_bytes() == metrics
        assert changed_stages(repo) == set()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_fresh_clone_pulls_and_reruns_nothing(workspace, tmp_path):
    """What a teammate does: git clone, dvc pull, dvc repro. Everything must come from git + the remote."""
    repo = workspace
    with MotoEndpoint() as endpoint:
        ok(vift(repo, "storage", "configure", "--endpoint", endpoint.url, "--bucket", "vift-clone", "--create-bucket", "--default"))
        ok(vift(repo, "storage", "push"))
        ok(run(["git", "add", "-A"], repo))
        ok(run(["git", "commit", "-q", "-m", "remote"], repo))
        clone = tmp_path / "clone"
        ok(run(["git", "clone", "-q", repo, clone], tmp_path))
        ok(vift(clone, "storage", "pull"))
        missing = [path for path in uncached_outputs(STAGES) if not (clone / path).exists()]
        if missing:
            ignored = ok(run(["git", "check-ignore", *missing], clone)).split()
            pytest.xfail(
                f"`cache: false` outputs {missing} are not versioned anywhere (git-ignored: {ignored}), so a clone "
                "reruns their stages; drop `cache: false` in dvc.yaml or stop ignoring them in .gitignore"
            )
        assert_nothing_ran(ok(dvc(clone, "repro")))
        for path in cached_outputs(STAGES) + uncached_outputs(STAGES):
            if (repo / path).is_file():
                assert (clone / path).read_bytes() == (repo / path).read_bytes()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_reruns_are_noops_and_a_param_change_reruns_only_its_dependents(workspace, tmp_path, monkeypatch):
    from vift.cli import main
    from vift.config import load_params

    repo = workspace
    monkeypatch.chdir(repo)  # for the in-process `vift params use` / `vift data import`
    assert_nothing_ran(ok(dvc(repo, "repro")))
    assert changed_stages(repo) == set()

    # A parameter in one section: only the stages reading it (and what depends on them) rerun.
    expected = stages_affected_by(STAGES, "eval.batch_size")
    assert expected and expected != set(STAGES)
    assert main(["params", "use", "ci", "--set", "eval.batch_size=8"]) == 0
    assert changed_stages(repo) == stages_reading(STAGES, "eval.batch_size")
    out = ok(dvc(repo, "repro"))
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    # Downstream stages rerun only if an upstream output really changed: training is deterministic,
    # so a stage that merely reads eval.batch_size rewrites identical weights and DVC stops there.
    assert stages_reading(STAGES, "eval.batch_size") <= ran <= expected
    for name in set(STAGES) - ran:
        assert f"Stage '{name}' didn't change, skipping" in out

    # A data parameter: the data stage runs (DVC reruns what is downstream once its outputs change).
    assert main(["params", "use", "ci", "--set", "eval.batch_size=8", "--set", "data.seed=1"]) == 0
    assert would_run(repo) == stages_reading(STAGES, "data.seed") == {"data"}
    assert main(["params", "use", "ci", "--set", "eval.batch_size=8"]) == 0  # back: nothing to do

    # DVC experiments override keys of our file with the file prefix (docs/STORAGE.md).
    out = ok(dvc(repo, "exp", "run", "-S", f"{PARAMS}:train.text.learning_rate=1e-4", "-S", f"{PARAMS}:eval.batch_size=4"))
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    reading = stages_reading(STAGES, "eval.batch_size") | stages_reading(STAGES, "train.text.learning_rate")
    assert reading <= ran <= stages_affected_by(STAGES, "eval.batch_size") | stages_affected_by(STAGES, "train.text.learning_rate")
    params = load_params(PARAMS)  # DVC rewrote the file; it is still valid
    assert params.train.text.learning_rate == 1e-4 and params.eval.batch_size == 4
    assert changed_stages(repo) == set()

    # Imported data changes the `data` params (the import's content digest): data reruns.
    from PIL import Image

    source = tmp_path / "external"
    source.mkdir()
    Image.new("RGB", (32, 32), "red").save(source / "red.png")
    vqa = json.dumps({"id": "q0", "image": "red.png", "question": "What colour?", "answer": "red"}) + "\n"
    splits = {
        "captions": {"id": "c0", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]},
        "text_instructions": {"id": "t0", "conversations": [
            {"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
    }  # fmt: skip
    for split, record in splits.items():
        (source / f"{split}.jsonl").write_text(json.dumps(record) + "\n")
    (source / "calibration.jsonl").write_text(vqa)
    (source / "test.jsonl").write_text(vqa)
    assert main(["data", "import", str(source)]) == 0
    # (register reads data.name and data.source: the registered model is named after the data.)
    reading = stages_reading(STAGES, "data.import_dir") | stages_reading(STAGES, "data.name")
    assert changed_stages(repo) == reading == {"data", "register"}


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_an_experiment_on_an_evaluation_parameter_retrains_nothing_and_its_tables_fit_a_terminal(workspace):
    """What a DVC user does after `make demo` (dvc.lock written but not committed): `dvc exp run
    --temp -S` an evaluation parameter. Only evaluation and what depends on it run; the training
    stages come from DVC's run cache; the experiment's MLflow run carries its name."""
    import mlflow

    repo = workspace
    ok(run(["git", "rm", "-q", "--cached", "dvc.lock"], repo))
    ok(run(["git", "commit", "-q", "-m", "as after make demo: dvc.lock untracked"], repo))
    out = ok(dvc(repo, "exp", "run", "--temp", "-S", f"{PARAMS}:eval.batch_size=4"))
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    affected = stages_affected_by(STAGES, "eval.batch_size")
    assert "evaluate" in ran and ran <= affected == {"evaluate", "register"}, out
    for name in set(STAGES) - affected:  # every training stage, restored rather than rerun
        assert f"Stage '{name}' is cached" in out or f"Stage '{name}' didn't change" in out, out
    name = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")  # the repository's, not the temp copy's
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`dvc.exp_name` = '{name}'")
    assert [r.info.run_name for r in runs] == [name]

    # Readable tables: the DVC metric is a few headline numbers, and the experiments table shows
    # what varies (the stages really read ~150 parameters and ~50 code files: docs/STORAGE.md).
    ok(run(["git", "add", "dvc.lock"], repo))
    ok(run(["git", "commit", "-q", "-m", "lock"], repo))
    ok(dvc(repo, "exp", "run", "--temp", "-S", f"{PARAMS}:eval.batch_size=8"))
    metrics = ok(dvc(repo, "metrics", "show"))
    assert max(len(line) for line in metrics.splitlines()) <= 120, metrics
    assert "served.acc" in metrics and "fusion_wins" in metrics
    header = ok(dvc(repo, "exp", "show", "--csv", "--only-changed")).splitlines()[0].split(",")
    assert "eval.batch_size" in header and len(header) <= 60, header


def locked_outputs(repo: Path) -> dict[str, dict[str, str]]:
    """Per stage, each output's hash as dvc.lock records it."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {out["path"]: out["md5"] for out in stage.get("outs", [])} for name, stage in stages.items()}


# A forced rerun is a new pipeline run: register records the new MLflow run and model version.
NEW_RUN_EACH_TIME = {"register"}


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_forced_rerun_reproduces_identical_outputs(workspace):
    """Every output, cached or not, hashes the same after `dvc repro --force` (dvc.lock records both),
    except the registry decision, which names the run that made it."""
    repo = workspace
    before = locked_outputs(repo)
    metrics = (repo / "reports" / "metrics.json").read_bytes()
    out = ok(dvc(repo, "repro", "--force"))
    assert set(re.findall(r"Running stage '([^']+)'", out)) == set(STAGES)
    after = locked_outputs(repo)
    same = set(STAGES) - NEW_RUN_EACH_TIME
    assert same and {s: after[s] for s in same} == {s: before[s] for s in same}  # every output hashes the same
    assert (repo / "reports" / "metrics.json").read_bytes() == metrics


def test_switching_presets_changes_only_what_it_must(tmp_path, monkeypatch):
    from vift.cli import main
    from vift.config import PRESETS_DIR

    monkeypatch.chdir(tmp_path)
    path = tmp_path / PARAMS

    def use(*argv: str) -> bytes:
        assert main(["params", "use", *argv]) == 0
        return path.read_bytes()

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    ci = use("ci")
    assert use("ci") == ci  # deterministic: the same preset never looks changed to DVC
    override = flat(yaml.safe_load(use("ci", "--set", "eval.batch_size=8")))
    base = flat(yaml.safe_load(ci))
    assert {k for k in base if base[k] != override[k]} == {"eval.batch_size"}

    tiny = flat(yaml.safe_load(use("tiny")))
    assert use("ci") == ci  # switching back restores the exact bytes
    preset_keys = set(flat(yaml.safe_load((PRESETS_DIR / "ci.yaml").read_text()))) | set(
        flat(yaml.safe_load((PRESETS_DIR / "tiny.yaml").read_text()))
    )
    differing = {k for k in base if base[k] != tiny[k]}
    assert differing and differing <= preset_keys  # only keys one of the presets sets
