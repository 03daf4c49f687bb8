"""The ``vift-data-efficiency`` Prefect flow: ViFT and the baseline trained on fractions of the data.

With ``seeds``, every fraction is trained once per seed (all of :data:`SEED_KEYS` set to it: the
data generator, the pretraining and every training stage), and the table reports the mean and the
across-seed interval, and whether each paired comparison holds in every seed.

Each point (a fraction, and a seed when seeds are given) is one ``vift-pipeline`` subflow in its own isolated workspace (``isolate``), run up
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
from flows.pipeline import DATA_HELP, PIPELINE_DEPLOYMENT, RUNS_DIR, DataChoice, PipelineParameters, PresetName, vift_pipeline
from vift import paths
from vift.errors import UserError

FRACTION_KEY = "train.data_fraction"
# Every seed a replicate changes: the data (its test split included: a data seed is a new draw of the
# world, never a choice made on the test split), the base model, the three training stages. Not
# eval.seed: that one seeds the bootstrap of the intervals, the same for every replicate.
SEED_KEYS = ("seed", "data.seed", "train.caption.seed", "train.text.seed", "train.vit.seed")
SWEEPS_DIR = paths.REPORTS_DIR / "sweeps"


class SweepParameters(BaseModel):
    """What a person sets in the Prefect UI: the pipeline's preset and overrides, and the fractions."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName = Field("tiny", description="training and model settings: a preset in params/presets/")
    data: DataChoice = Field("workspace", description=DATA_HELP)
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied at every fraction")
    fractions: list[float] = Field([0.25, 0.5, 1.0], description="shares of the caption and instruction records, each in (0, 1]")
    seeds: list[int] | None = Field(
        None, description=f"replicates: each fraction once per seed ({', '.join(SEED_KEYS)} set to it); none: the preset's seeds"
    )
    push: bool = Field(False, description="dvc push each point's outputs")
    workspace: str = Field(".", description="the repository whose isolated copies run the points")
    fan_out: int = Field(
        0, ge=0, le=64,
        description="0: the points run here, one after another (subflows); N: each point is a run of the "
        f"{PIPELINE_DEPLOYMENT} deployment, at most N at a time, so a work pool runs them in parallel (its "
        "workers must share this workspace's filesystem, or push to and pull from the DVC remote)",
    )  # fmt: skip

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

    @field_validator("seeds")
    @classmethod
    def _seeds_are_distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is None:
            return None
        if not seeds:
            raise ValueError("give at least one seed (or none at all for the preset's own)")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        if any(seed < 0 for seed in seeds):
            raise ValueError(f"seeds must be >= 0; got {seeds}")
        return sorted(seeds)

    @model_validator(mode="after")
    def _points_are_valid(self) -> SweepParameters:
        if FRACTION_KEY in self.overrides:
            raise ValueError(f"overrides.{FRACTION_KEY}: the sweep sets it per point; list the values in fractions")
        if self.seeds is not None and (clash := sorted(set(SEED_KEYS) & set(self.overrides))):
            raise ValueError(f"overrides {', '.join(clash)}: the sweep sets every seed per point; list the values in seeds")
        for fraction, seed in self.points():
            self.point(fraction, seed)  # every point's parameters validate before any work
        return self

    def points(self) -> list[tuple[float, int | None]]:
        """``(fraction, seed)`` of every point, fraction-major; seed None: the preset's own."""
        return [(fraction, seed) for fraction in self.fractions for seed in (self.seeds or [None])]

    def point(self, fraction: float, seed: int | None = None) -> PipelineParameters:
        seeded = {} if seed is None else dict.fromkeys(SEED_KEYS, seed)
        return PipelineParameters(
            preset=self.preset,
            data=self.data,
            overrides={**self.overrides, **seeded, FRACTION_KEY: fraction},
            isolate=True,
            push=self.push,
            workspace=self.workspace,
            stop_after="evaluate",
        )

    def name(self) -> str:
        base = self.point(self.fractions[-1]).effective().model_dump(mode="json")
        base["train"].pop("data_fraction")
        identity = {"params": base, "fractions": self.fractions}
        if self.seeds is not None:
            identity["seeds"] = self.seeds  # the points set them: the preset's values do not matter
            for key in SEED_KEYS:
                *parents, leaf = key.split(".")
                section = base
                for parent in parents:
                    section = section[parent]
                section.pop(leaf)
        text = json.dumps(identity, sort_keys=True)
        return f"data-efficiency-{self.preset}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def sweep_run_name() -> str:
    raw = flow_run.parameters.get("parameters") or {}
    parameters = raw if isinstance(raw, SweepParameters) else SweepParameters.model_validate(raw)
    return parameters.name()


@task(name="collect sweep", task_run_name="collect {name}")
def collect(points: list[tuple[float, int | None, str]], meta: dict, out_dir: str, name: str) -> dict:
    summary = efficiency.summarize([efficiency.collect_point(Path(w), f, s) for f, s, w in points], meta)
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
            client.log_param(run_id, "seeds", json.dumps(meta.get("seeds")))
            client.log_param(run_id, "overrides", json.dumps(meta["overrides"], sort_keys=True)[:6000])
            for point in efficiency.per_fraction(summary):  # with seeds: their mean; each seed's under its own key
                for row, model in efficiency.PLOTTED_ROWS.items():
                    client.log_metric(run_id, f"{row}.accuracy", point["rows"][row]["accuracy"], step=point["samples"][model])
            for point in summary["points"]:
                if point.get("seed") is not None:
                    for row, model in efficiency.PLOTTED_ROWS.items():
                        accuracy = point["rows"][row]["accuracy"]
                        client.log_metric(run_id, f"{row}.accuracy.seed{point['seed']}", accuracy, step=point["samples"][model])
            client.log_artifacts(run_id, out_dir, artifact_path="data_efficiency")
            client.set_terminated(run_id)
    except UserError as error:

        def untracked(detail: str) -> None:
            get_run_logger().warning("the sweep ran untracked: %s", detail)

        server.tolerate(error, mode == "required", uri, "while logging the sweep", untracked)
        return None
    return run_id


def fan_out(parameters: SweepParameters, root: Path, poll_seconds: float = 2.0) -> list[tuple[float, int | None, str]]:
    """Run every point as a run of the pipeline deployment, at most ``parameters.fan_out`` at a time.

    Each point is an isolated pipeline run stopping after ``evaluate``, as a subflow would be; its
    workspace is ``<workspace>/.vift/runs/<its name>``, read back here once the run completed. A
    point that fails fails the sweep, naming the point and its run.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    deployment = f"{vift_pipeline.name}/{PIPELINE_DEPLOYMENT}"
    waiting = list(parameters.points())
    running: dict[Any, tuple[float, int | None, PipelineParameters]] = {}
    done: dict[tuple[float, int | None], str] = {}
    with get_client(sync_client=True) as client:
        while waiting or running:
            while waiting and len(running) < parameters.fan_out:
                fraction, seed = waiting.pop(0)
                point = parameters.point(fraction, seed)
                run = run_deployment(deployment, parameters={"parameters": point.model_dump(mode="json")}, timeout=0)
                logger.info(
                    "sweep point %s = %g%s: flow run %s", FRACTION_KEY, fraction, "" if seed is None else f", seed {seed}", run.name
                )
                running[run.id] = (fraction, seed, point)
            time.sleep(poll_seconds)
            for run_id in list(running):
                state = client.read_flow_run(run_id).state
                if state is None or not state.is_final():
                    continue
                fraction, seed, point = running.pop(run_id)
                if not state.is_completed():
                    raise UserError(
                        f"sweep point {FRACTION_KEY} = {fraction:g}, seed {seed}: flow run {run_id} ended {state.name}: {state.message}"
                    )
                done[(fraction, seed)] = str(root / RUNS_DIR / point.name())
    return [(fraction, seed, done[(fraction, seed)]) for fraction, seed in parameters.points()]


@flow(name="vift-data-efficiency", flow_run_name=sweep_run_name, log_prints=True)
def vift_data_efficiency(parameters: SweepParameters = SweepParameters()) -> dict:
    """Train and evaluate ViFT and the visual-instruction baseline on fractions of the training data."""
    logger = get_run_logger()
    name = parameters.name()
    root = Path(parameters.workspace).resolve()
    if parameters.fan_out:
        points = fan_out(parameters, root)
    else:
        points = []
        for fraction, seed in parameters.points():
            logger.info("sweep point: %s = %g%s", FRACTION_KEY, fraction, "" if seed is None else f", seed {seed}")
            result = vift_pipeline(parameters.point(fraction, seed))
            points.append((fraction, seed, result["workspace"]))
    meta = {
        "name": name, "preset": parameters.preset, "fractions": parameters.fractions, "seeds": parameters.seeds,
        "overrides": parameters.overrides,
    }  # fmt: skip
    out_dir = root / SWEEPS_DIR / name
    summary = collect(points, meta, str(out_dir), name)
    experiment = parameters.point(*parameters.points()[-1]).effective().registry.experiment
    run_id = track(summary, str(out_dir), name, experiment, str(root))
    create_markdown_artifact(
        key="data-efficiency", markdown=efficiency.table_markdown(summary), description="accuracy against training samples"
    )
    create_table_artifact(
        key="data-efficiency-points",
        table=[
            {
                "fraction": p["fraction"],
                "seed": p.get("seed"),
                "row": row,
                "samples": p["samples"][model],
                "accuracy": round(p["rows"][row]["accuracy"], 4),
            }
            for p in summary["points"]
            for row, model in efficiency.PLOTTED_ROWS.items()
        ],  # fmt: skip
        description="one line per point (fraction, seed) and row",
    )
    return {
        "out": str(out_dir), "mlflow_run_id": run_id,
        "points": [{"fraction": f, "seed": s, "workspace": w} for f, s, w in points],
    }  # fmt: skip
