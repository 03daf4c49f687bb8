"""The Prefect pipeline flow: parameters validated before any work, run names, deployments."""

from __future__ import annotations

import pytest

from flows.pipeline import STAGES, PipelineParameters


def test_overrides_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="train.text.learning_rate"):
        PipelineParameters(preset="ci", overrides={"train.text.learning_rate": -1})
    with pytest.raises(ValueError, match="no such parameter"):
        PipelineParameters(preset="ci", overrides={"train.text.no_such_key": 1})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
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
    for deployment in deployments.values():
        assert deployment["entrypoint"] == "flows/pipeline.py:vift_pipeline"
        PipelineParameters.model_validate(deployment["parameters"]["parameters"])  # valid presets and overrides
        for variable in deployment["work_pool"].get("job_variables", {}):
            assert variable in template["variables"]["properties"]
