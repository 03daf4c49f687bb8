"""Deployments served by ``vift serve``: they appear in the Prefect UI and can be triggered there."""

from __future__ import annotations

from prefect import serve

from flows.pipeline import PIPELINE_DEPLOYMENT, PipelineParameters, vift_pipeline
from flows.sweep import SweepParameters, vift_data_efficiency

SWEEP_DEPLOYMENT = "vift-data-efficiency"


def deployments():
    return [
        vift_pipeline.to_deployment(
            name=PIPELINE_DEPLOYMENT,
            parameters={"parameters": PipelineParameters(preset="tiny", isolate=True).model_dump()},
            description="The vift stage graph on a preset plus overrides; each run in its own workspace.",
            tags=["vift"],
        ),
        vift_data_efficiency.to_deployment(
            name=SWEEP_DEPLOYMENT,
            parameters={"parameters": SweepParameters(preset="tiny").model_dump()},
            description="ViFT and the visual-instruction baseline on fractions of the training data; "
            "accuracy against training samples under reports/sweeps/.",
            tags=["vift", "sweep"],
        ),
    ]


def serve_deployments(limit: int = 2) -> None:
    serve(*deployments(), limit=limit)
