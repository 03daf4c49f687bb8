"""Deployments served by ``vift serve``: they appear in the Prefect UI and can be triggered there."""

from __future__ import annotations

from prefect import serve

from flows.pipeline import PipelineParameters, vift_pipeline

PIPELINE_DEPLOYMENT = "vift-pipeline"


def deployments():
    return [
        vift_pipeline.to_deployment(
            name=PIPELINE_DEPLOYMENT,
            parameters={"parameters": PipelineParameters(preset="tiny", isolate=True).model_dump()},
            description="The vift stage graph on a preset plus overrides; each run in its own workspace.",
            tags=["vift"],
        ),
    ]


def serve_deployments(limit: int = 2) -> None:
    serve(*deployments(), limit=limit)
