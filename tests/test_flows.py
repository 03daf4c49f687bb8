"""The Prefect pipeline flow: parameters validated before any work, run names, deployments."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import STAGES, PipelineParameters
from flows.sweep import FRACTION_KEY, SweepParameters


def test_overrides_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="train.text.learning_rate"):
        PipelineParameters(preset="ci", overrides={"train.text.learning_rate": -1})
    with pytest.raises(ValueError, match="no such parameter"):
        PipelineParameters(preset="ci", overrides={"train.text.no_such_key": 1})
    with pytest.raises(ValueError, match="preset\n  Input should be 'ci', 'paper-7b', 'small' or 'tiny'"):
        PipelineParameters(preset="nope")


def test_run_digest_follows_the_effective_parameters():
    base = PipelineParameters(preset="ci")
    assert base.digest() == PipelineParameters(preset="ci", overrides={}).digest()
    assert base.digest() != PipelineParameters(preset="ci", overrides={"data.seed": 1}).digest()
    # an override equal to the preset's value changes nothing
    assert base.digest() == PipelineParameters(preset="ci", overrides={"data.seed": 0}).digest()


def test_the_flow_runs_every_dvc_stage_in_graph_order():
    import yaml

    from tests.conftest import REPO

    graph = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(STAGES) == set(graph)
    seen: set[str] = set()
    outs = {out if isinstance(out, str) else next(iter(out)): name for name, stage in graph.items() for out in stage.get("outs", [])}
    for stage in STAGES:
        for dep in graph[stage].get("deps", []):
            producer = outs.get(dep)
            assert producer is None or producer in seen, f"{stage} runs before {producer}, which makes {dep}"
        seen.add(stage)


def test_prefect_yaml_declares_the_pipeline_for_worker_pools():
    import json

    import yaml

    from tests.conftest import REPO

    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in declared["deployments"]}
    assert {"vift-pipeline", "vift-pipeline-gpu"} <= set(deployments)
    template = json.loads((REPO / "infra" / "kubernetes" / "base-job-template.json").read_text())
    assert deployments["vift-data-efficiency"]["entrypoint"] == "flows/sweep.py:vift_data_efficiency"
    kinds = {"flows/pipeline.py:vift_pipeline": PipelineParameters, "flows/sweep.py:vift_data_efficiency": SweepParameters}
    for deployment in deployments.values():
        kinds[deployment["entrypoint"]].model_validate(deployment["parameters"]["parameters"])  # valid presets and overrides
        for variable in deployment["work_pool"].get("job_variables", {}):
            assert variable in template["variables"]["properties"]


def test_sweep_points_are_isolated_pipelines_that_stop_after_evaluate():
    sweep = SweepParameters(preset="ci", fractions=[1.0, 0.25], overrides={"data.seed": 3})
    assert sweep.fractions == [0.25, 1.0]
    point = sweep.point(0.25)
    assert point.isolate and point.stop_after == "evaluate"
    assert point.effective().train.data_fraction == 0.25 and point.effective().data.seed == 3
    # the 100 % point is the workspace a plain isolated run of the same parameters uses
    assert sweep.point(1.0).digest() == PipelineParameters(preset="ci", overrides={"data.seed": 3}).digest()
    assert sweep.name() != SweepParameters(preset="ci", fractions=[0.5, 1.0], overrides={"data.seed": 3}).name()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"fractions": []}, "at least one fraction"),
        ({"fractions": [0.0, 1.0]}, r"fractions must lie in \(0, 1\]"),
        ({"fractions": [0.5, 0.5]}, "fractions repeat"),
        ({"overrides": {FRACTION_KEY: 0.5}}, "the sweep sets it per point"),
        ({"overrides": {"train.text.learning_rate": -1}}, "train.text.learning_rate"),
    ],
)
def test_invalid_sweeps_are_rejected_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        SweepParameters(preset="ci", **fields)


def test_a_partial_parameters_object_from_a_client_still_runs_isolated():
    # Prefect merges a run's parameters with the deployment's only at the top level: a REST client
    # sending {"parameters": {"preset": "ci"}} replaces the deployment's whole object. Before, that
    # lost isolate: true and the run rewrote the serving checkout's params.yaml and dvc.lock.
    assert PipelineParameters.model_validate({"preset": "ci"}).isolate is True


def test_the_register_output_survives_a_forced_rerun_that_fails():
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    assert {"reports/registration.json": {"persist": True}} in stages["register"]["outs"]


def test_the_flow_keeps_the_workspace_import_unless_told_to_use_the_preset_data(tmp_path):
    # Before: `vift flow run --preset tiny` rewrote params.yaml from the preset and trained on
    # ShapeTally, silently discarding the user's import.
    from vift.config import apply_overrides, load_preset, write_params

    imported = {"data.source": "import", "data.import_dir": "data/imported/abc", "data.name": "signs"}
    write_params(apply_overrides(load_preset("tiny"), imported), tmp_path / "params" / "params.yaml")
    kept = PipelineParameters(preset="ci", workspace=str(tmp_path))
    effective = kept.effective()
    assert (effective.data.source, effective.data.import_dir, effective.data.name) == ("import", "data/imported/abc", "signs")
    assert effective.train.text.max_steps == load_preset("ci").train.text.max_steps  # training settings: the preset's
    assert kept.name().startswith("ci-import-")
    replaced = PipelineParameters(preset="ci", data="preset", workspace=str(tmp_path))
    assert replaced.effective().data == load_preset("ci").data and replaced.name().startswith("ci-shapetally-")
    assert PipelineParameters(preset="ci", workspace=str(tmp_path / "elsewhere")).effective().data.source == "shapetally"


def test_seeded_sweep_points_set_every_seed_and_keep_the_unseeded_names():
    from flows.sweep import SEED_KEYS

    sweep = SweepParameters(preset="ci", fractions=[0.5, 1.0], seeds=[2, 1])
    assert sweep.seeds == [1, 2] and sweep.points() == [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    effective = sweep.point(0.5, 2).effective()
    assert (effective.seed, effective.data.seed, effective.train.caption.seed, effective.train.text.seed, effective.train.vit.seed) == (
        2,
    ) * 5
    assert effective.eval.seed == PipelineParameters(preset="ci").effective().eval.seed  # the bootstrap's seed stays
    # the seed-1, 100 % point is the workspace of a plain isolated run with those seeds
    assert sweep.point(1.0, 1).digest() == PipelineParameters(preset="ci", overrides=dict.fromkeys(SEED_KEYS, 1)).digest()
    assert sweep.name() != SweepParameters(preset="ci", fractions=[0.5, 1.0], seeds=[1, 3]).name()
    unseeded = SweepParameters(preset="ci", fractions=[0.5, 1.0])
    assert unseeded.points() == [(0.5, None), (1.0, None)] and unseeded.point(1.0).digest() == PipelineParameters(preset="ci").digest()


def test_every_training_seed_of_the_parameters_is_a_seed_key():
    from flows.sweep import SEED_KEYS

    params = PipelineParameters(preset="ci").effective().model_dump()

    def seeds(section, prefix=""):
        for key, value in section.items():
            if isinstance(value, dict):
                yield from seeds(value, f"{prefix}{key}.")
            elif key == "seed":
                yield f"{prefix}{key}"

    assert set(seeds(params)) - {"eval.seed"} == set(SEED_KEYS)


@pytest.mark.parametrize(
    "fields, message",
    [({"seeds": []}, "at least one seed"), ({"seeds": [1, 1]}, "seeds repeat"), ({"seeds": [-1]}, ">= 0"),
     ({"seeds": [0, 1], "overrides": {"data.seed": 3}}, "overrides data.seed: the sweep sets every seed")],
)  # fmt: skip
def test_invalid_seed_lists_are_rejected_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        SweepParameters(preset="ci", **fields)


def test_a_fanned_out_point_that_fails_fails_the_sweep_naming_it(monkeypatch, tmp_path):
    """Each point a run of the pipeline deployment; a failed one stops the sweep with its name."""
    import types

    import prefect.client.orchestration as orchestration
    import prefect.deployments as deployments

    from flows import sweep as sweep_module
    from vift.errors import UserError

    submitted = []

    def run_deployment(name, parameters, timeout):
        submitted.append((name, parameters["parameters"]["overrides"][FRACTION_KEY]))
        return types.SimpleNamespace(id=len(submitted), name=f"run-{len(submitted)}")

    class State:
        def __init__(self, ok):
            self.ok, self.name, self.message = ok, "Completed" if ok else "Failed", "" if ok else "stage train_text failed"

        def is_final(self):
            return True

        def is_completed(self):
            return self.ok

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_flow_run(self, run_id):
            return types.SimpleNamespace(state=State(run_id != 2))

    monkeypatch.setattr(deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client: Client())
    monkeypatch.setattr(sweep_module, "get_run_logger", lambda: types.SimpleNamespace(info=lambda *a: None))
    parameters = SweepParameters(preset="ci", fractions=[0.25, 0.5, 1.0], fan_out=1)
    with pytest.raises(
        UserError, match=r"sweep point train.data_fraction = 0.5, seed None: flow run 2 ended Failed: stage train_text failed"
    ):
        sweep_module.fan_out(parameters, tmp_path, poll_seconds=0)
    assert submitted == [("vift-pipeline/vift-pipeline", 0.25), ("vift-pipeline/vift-pipeline", 0.5)]  # one at a time
    submitted.clear()
    monkeypatch.setattr(Client, "read_flow_run", lambda self, run_id: types.SimpleNamespace(state=State(True)))
    points = sweep_module.fan_out(SweepParameters(preset="ci", fractions=[0.5, 1.0], seeds=[0, 1], fan_out=3), tmp_path, poll_seconds=0)
    assert [(f, s) for f, s, _ in points] == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)] and len(submitted) == 4
    assert points[0][2] == str(
        tmp_path / ".vift" / "runs" / SweepParameters(preset="ci", fractions=[0.5, 1.0], seeds=[0, 1]).point(0.5, 0).name()
    )
