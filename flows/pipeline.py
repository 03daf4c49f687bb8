"""The ``vift-pipeline`` Prefect flow: the DVC stage graph, one task per stage, run through DVC.

Thin by design: every stage is ``dvc repro --single-item <stage>`` in a workspace, so DVC's cache
and dvc.lock decide what reruns and nothing is implemented twice. Parameters (a preset plus dotted
overrides) are validated before any work. With ``isolate`` each run gets its own workspace under
``.vift/runs/<preset>-<hash>/`` sharing the DVC cache, so concurrent runs with different parameters
never touch each other's outputs, and a rerun with the same parameters resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vift.config import ACTIVE_PARAMS, Params, apply_overrides, available_presets, load_params, load_preset, write_params
from vift.errors import UserError
from vift.paths import ABLATION_MD, METRICS_JSON, REGISTRATION_JSON, STAGES, STATE_DIR

StageName = Literal[STAGES]  # vift.paths.STAGES: dvc.yaml's stages, in order
NETWORK_STAGES = {"register"}  # talk to the tracking server: retried with backoff
RUNS_DIR = STATE_DIR / "runs"
PIPELINE_DEPLOYMENT = "vift-pipeline"  # the deployment's name (flows/deployments.py, prefect.yaml)
PresetName = Literal[tuple(available_presets())]  # a dropdown in the Prefect run form
DataChoice = Literal["workspace", "preset"]
DATA_HELP = (
    "workspace: the data (and prompts) of the workspace's params.yaml when it is an import (`vift data import`), "
    "else the preset's; preset: the preset's data section (ShapeTally), replacing an import"
)


def workspace_import(workspace: str | Path) -> Params | None:
    """``workspace``'s active parameters if their data is an import, else None."""
    path = Path(workspace) / ACTIVE_PARAMS
    if not path.is_file():
        return None
    params = load_params(path)
    return params if params.data.source == "import" else None


class PipelineParameters(BaseModel):
    """What a person sets in the Prefect UI: a preset and dotted-key overrides."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName = Field("tiny", description="training and model settings: a preset in params/presets/")
    data: DataChoice = Field("workspace", description=DATA_HELP)
    overrides: dict[str, Any] = Field(default_factory=dict, description='dotted keys, e.g. {"train.text.learning_rate": 1e-4}')
    # True by default: Prefect merges a run's parameters with the deployment's only at the top
    # level, so a client sending {"parameters": {"preset": "ci"}} gets these defaults, and must
    # never rewrite the serving checkout. `vift flow run` passes its --isolate flag explicitly.
    isolate: bool = Field(True, description="run in an own workspace under .vift/runs/ (false: in the checkout itself)")
    push: bool = Field(False, description="dvc push the outputs at the end")
    workspace: str = Field(".", description="the repository to run in (or to copy for isolated runs)")
    stop_after: StageName = Field("register", description="the last stage to run (the sweep stops after evaluate)")

    @model_validator(mode="after")
    def _params_are_valid(self) -> PipelineParameters:
        self.effective()
        return self

    def effective(self) -> Params:
        """The preset, with the workspace's imported data unless ``data`` is "preset", then the overrides."""
        try:
            params = load_preset(self.preset)
            imported = workspace_import(self.workspace) if self.data == "workspace" else None
            if imported is not None:  # the data, and how to prompt over it, belong to the data set
                params = params.model_copy(update={"data": imported.data, "prompts": imported.prompts})
            return apply_overrides(params, self.overrides) if self.overrides else params
        except UserError as error:
            raise ValueError(str(error)) from None

    def digest(self, effective: Params | None = None) -> str:
        effective = effective or self.effective()
        text = json.dumps(effective.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def name(self) -> str:
        """The flow run's and the isolated workspace's name: preset, data source and the digest."""
        effective = self.effective()  # reads the preset and the workspace's params file: once
        return f"{self.preset}-{effective.data.source}-{self.digest(effective)}"


def run_name() -> str:
    """Flow run name: the preset and a short hash of the effective parameters."""
    raw = flow_run.parameters.get("parameters") or {}
    parameters = raw if isinstance(raw, PipelineParameters) else PipelineParameters.model_validate(raw)
    return parameters.name()


def _run(command: list[str], cwd: Path) -> str:
    """Run a command in ``cwd`` with this interpreter's bin/ first on PATH (dvc, vift)."""
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", " ".join(command), cwd)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    output = (completed.stdout + completed.stderr).strip()
    if output:
        logger.info(output[-4000:])
    if completed.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {completed.returncode}):\n{output[-2000:]}")
    return output


def copy_worktree(source: Path, target: Path) -> None:
    """Copy the files git tracks or would track (not ignored) from ``source`` to ``target``: what a
    clone with the working tree's edits holds. A ``dvc.lock`` already in ``target`` is kept: a
    resumed run keeps its own record of how far it got."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=source, capture_output=True, check=True).stdout
    for relative in filter(None, listed.decode().split("\0")):
        if relative.startswith(str(RUNS_DIR)) or not (source / relative).is_file():
            continue
        if relative == "dvc.lock" and (target / relative).exists():
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target / relative)


@task(name="prepare workspace")
def prepare_workspace(parameters: PipelineParameters, name: str) -> str:
    """The repository itself, or an isolated copy of its tracked and unignored files sharing the DVC cache."""
    source = Path(parameters.workspace).resolve()
    effective = parameters.effective()
    replaced = workspace_import(source)
    if replaced is not None and effective.data.import_dir != replaced.data.import_dir:
        get_run_logger().warning(
            "This run does NOT use the workspace's imported data (data.import_dir %s): it uses %s. "
            "Run with data=workspace (`vift flow run --data workspace`) to train on the import.",
            replaced.data.import_dir,
            effective.data.import_dir or f"the preset's {effective.data.source} data",
        )
    if not parameters.isolate:
        write_params(effective, source / ACTIVE_PARAMS)
        return str(source)
    target = source / RUNS_DIR / name
    copy_worktree(source, target)
    if effective.data.import_dir and not Path(effective.data.import_dir).is_absolute():
        # data/ is git-ignored, so the copy lacks the import: link it (imports can be large).
        link = target / effective.data.import_dir
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source / effective.data.import_dir, target_is_directory=True)
    if not (target / ".git").exists():
        _run(["git", "init", "-q"], target)
    cache = source / ".dvc" / "cache"
    # Each isolated workspace tracks into its own embedded MLflow database unless MLFLOW_TRACKING_URI
    # names a server (settings.tracking_uri): two concurrent runs never share one sqlite file.
    _run(["dvc", "config", "--local", "cache.dir", str(cache)], target)
    write_params(effective, target / ACTIVE_PARAMS)
    return str(target)


@task(name="dvc stage", task_run_name="stage {stage}")
def reproduce_stage(workspace: str, stage: str) -> str:
    return _run(["dvc", "repro", "--single-item", stage], Path(workspace))


reproduce_network_stage = reproduce_stage.with_options(
    name="dvc stage (network)", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5)
)


@task(name="dvc push", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5))
def push_outputs(workspace: str) -> str:
    return _run(["dvc", "push"], Path(workspace))


@task(name="publish artifacts")
def publish_artifacts(workspace: str) -> dict:
    """The ablation table, the metrics, the MLflow run and the registration decision, in the UI."""
    root = Path(workspace)
    published: dict[str, Any] = {"workspace": workspace}
    ablation = root / ABLATION_MD
    if ablation.exists():
        create_markdown_artifact(key="ablation-table", markdown=ablation.read_text(), description="vift ablation")
    metrics_file = root / METRICS_JSON
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        published["metrics"] = {name: row["accuracy"] for name, row in metrics["rows"].items()}
        create_table_artifact(
            key="metrics",
            table=[
                {
                    "row": n,
                    "accuracy": round(r["accuracy"], 4),
                    "ci95_low": round(r["ci95"][0], 4),
                    "ci95_high": round(r["ci95"][1], 4),
                    "n": r["n"],
                }
                for n, r in metrics["rows"].items()
            ],
            description="accuracy per ablation row",
        )
    registration = root / REGISTRATION_JSON
    if registration.exists():
        decision = json.loads(registration.read_text())
        published["registration"] = decision
        create_markdown_artifact(
            key="registration", markdown="```json\n" + json.dumps(decision, indent=2) + "\n```", description="registry decision"
        )
        link = decision.get("run_url")  # None for the embedded sqlite store: no UI to link to
        if link:
            create_link_artifact(key="mlflow-run", link=link, description="MLflow run")
    return published


@flow(name="vift-pipeline", flow_run_name=run_name, log_prints=True)
def vift_pipeline(parameters: PipelineParameters = PipelineParameters()) -> dict:
    """Run the vift stage graph (data → base → training → calibration → evaluation → registration)."""
    workspace = prepare_workspace(parameters, parameters.name())
    for stage in STAGES[: STAGES.index(parameters.stop_after) + 1]:
        (reproduce_network_stage if stage in NETWORK_STAGES else reproduce_stage)(workspace, stage)
    if parameters.push:
        push_outputs(workspace)
    return publish_artifacts(workspace)
