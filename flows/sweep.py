"""The ``vift-data-efficiency`` Prefect flow: ViFT and the baseline trained on fractions of the data.

Each fraction is one ``vift-pipeline`` subflow in its own isolated workspace (``isolate``), run up
to ``evaluate`` with ``train.data_fraction`` set: the stages run through DVC as always, so ``data``
and ``base`` come from the shared cache after the first point, a point that finished before is
skipped, and the 100 % point is the same workspace as a plain isolated pipeline run of the same
parameters. Nothing is registered (a sweep point is not a release candidate).

The flow then reads each point's reports (:mod:`flows.efficiency`), writes the table and the
plot to ``reports/sweeps/<sweep name>/``, logs one MLflow run (accuracy per row against training
samples as the metric step, the outputs as artifacts) and publishes the table as Prefect artifacts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows import efficiency
from flows.pipeline import DATA_HELP, DataChoice, PipelineParameters, PresetName, vift_pipeline
from vift import paths
from vift.errors import UserError

FRACTION_KEY = "train.data_fraction"
SWEEPS_DIR = paths.REPORTS_DIR / "sweeps"


class SweepParameters(BaseModel):
    """What a person sets in the Prefect UI: the pipeline's preset and overrides, and the fractions."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName = Field("tiny", description="training and model settings: a preset in params/presets/")
    data: DataChoice = Field("workspace", description=DATA_HELP)
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied at every fraction")
    fractions: list[float] = Field([0.25, 0.5, 1.0], description="shares of the caption and instruction records, each in (0, 1]")
    push: bool = Field(False, description="dvc push each point's outputs")
    workspace: str = Field(".", description="the repository whose isolated copies run the points")

    @field_validator("fractions")
    @classmethod
    def _fractions_are_shares(cls, fractions: list[float]) -> list[float]:
        if not fractions:
            raise ValueError("give at least one fraction")
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must lie in (0, 1]; got {bad}")
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"fractions repeat: {fractions}")
        return sorted(fractions)

    @model_validator(mode="after")
    def _points_are_valid(self) -> SweepParameters:
        if FRACTION_KEY in self.overrides:
            raise ValueError(f"overrides.{FRACTION_KEY}: the sweep sets it per point; list the values in fractions")
        for fraction in self.fractions:
            self.point(fraction)  # every point's parameters validate before any work
        return self

    def point(self, fraction: float) -> PipelineParameters:
        return PipelineParameters(
            preset=self.preset,
            data=self.data,
            overrides={**self.overrides, FRACTION_KEY: fraction},
            isolate=True,
            push=self.push,
            workspace=self.workspace,
            stop_after="evaluate",
        )

    def name(self) -> str:
        base = self.point(self.fractions[-1]).effective().model_dump(mode="json")
        base["train"].pop("data_fraction")
        text = json.dumps({"params": base, "fractions": self.fractions}, sort_keys=True)
        return f"data-efficiency-{self.preset}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def sweep_run_name() -> str:
    raw = flow_run.parameters.get("parameters") or {}
    parameters = raw if isinstance(raw, SweepParameters) else SweepParameters.model_validate(raw)
    return parameters.name()


@task(name="collect sweep", task_run_name="collect {name}")
def collect(points: list[tuple[float, str]], meta: dict, out_dir: str, name: str) -> dict:
    summary = efficiency.summarize([efficiency.collect_point(Path(w), f) for f, w in points], meta)
    efficiency.write_outputs(summary, Path(out_dir))
    return summary


@task(name="track sweep")
def track(summary: dict, out_dir: str, name: str, experiment: str, root: str) -> str | None:
    """One MLflow run for the sweep: accuracy per row with training samples as the step.

    Tracking is not needed for the sweep to succeed (its outputs are on disk): in the default
    ``auto`` mode an unreachable server is a warning; ``VIFT_TRACKING=required`` makes it an error.
    """
    from vift.registry import server
    from vift.registry.tracking import experiment_id_for
    from vift.settings import tracking_uri

    mode = server.tracking_mode()
    if mode == "off":
        return None
    uri = tracking_uri(root)
    try:
        client = server.connect(uri)
        with server.guard(uri, "log the data-efficiency sweep"):
            run = client.create_run(experiment_id_for(client, experiment), run_name=name, tags={"vift.kind": "data-efficiency-sweep"})
            run_id = run.info.run_id
            meta = summary["meta"]
            client.log_param(run_id, "preset", meta["preset"])
            client.log_param(run_id, "fractions", json.dumps(meta["fractions"]))
            client.log_param(run_id, "overrides", json.dumps(meta["overrides"], sort_keys=True)[:6000])
            for point in summary["points"]:
                for row, model in efficiency.PLOTTED_ROWS.items():
                    client.log_metric(run_id, f"{row}.accuracy", point["rows"][row]["accuracy"], step=point["samples"][model])
            client.log_artifacts(run_id, out_dir, artifact_path="data_efficiency")
            client.set_terminated(run_id)
    except UserError as error:

        def untracked(detail: str) -> None:
            get_run_logger().warning("the sweep ran untracked: %s", detail)

        server.tolerate(error, mode == "required", uri, "while logging the sweep", untracked)
        return None
    return run_id


@flow(name="vift-data-efficiency", flow_run_name=sweep_run_name, log_prints=True)
def vift_data_efficiency(parameters: SweepParameters = SweepParameters()) -> dict:
    """Train and evaluate ViFT and the visual-instruction baseline on fractions of the training data."""
    logger = get_run_logger()
    name = parameters.name()
    root = Path(parameters.workspace).resolve()
    points = []
    for fraction in parameters.fractions:
        logger.info("sweep point: %s = %g", FRACTION_KEY, fraction)
        result = vift_pipeline(parameters.point(fraction))
        points.append((fraction, result["workspace"]))
    meta = {"name": name, "preset": parameters.preset, "fractions": parameters.fractions, "overrides": parameters.overrides}
    out_dir = root / SWEEPS_DIR / name
    summary = collect(points, meta, str(out_dir), name)
    experiment = parameters.point(parameters.fractions[-1]).effective().registry.experiment
    run_id = track(summary, str(out_dir), name, experiment, str(root))
    create_markdown_artifact(
        key="data-efficiency", markdown=efficiency.table_markdown(summary), description="accuracy against training samples"
    )
    create_table_artifact(
        key="data-efficiency-points",
        table=[
            {"fraction": p["fraction"], "row": row, "samples": p["samples"][model], "accuracy": round(p["rows"][row]["accuracy"], 4)}
            for p in summary["points"]
            for row, model in efficiency.PLOTTED_ROWS.items()
        ],  # fmt: skip
        description="one line per fraction and row",
    )
    return {"out": str(out_dir), "mlflow_run_id": run_id, "points": [{"fraction": f, "workspace": w} for f, w in points]}
