"""``vift flow run`` and ``vift serve``: the pipeline flow from the shell, and its deployments."""

from __future__ import annotations

import argparse
import json
import os

import yaml


def _parameters(args: argparse.Namespace):
    from flows.pipeline import PipelineParameters
    from vift.errors import UserError

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE", exit_code=2)
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        return PipelineParameters(preset=args.preset, overrides=overrides, isolate=args.isolate, push=args.push)
    except ValueError as error:
        raise UserError(str(error), exit_code=2) from None


def cmd_flow_run(args: argparse.Namespace) -> int:
    # The ephemeral API server's telemetry heartbeat races the flow for its sqlite database
    # ("database is locked" tracebacks); nothing here should phone home anyway.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import vift_pipeline

    result = vift_pipeline(_parameters(args))
    print(json.dumps(result, indent=2, default=str))
    print("\nWhere to look:")
    print("  Prefect UI:  prefect server start   (then http://127.0.0.1:4200)")
    print("  MLflow UI:   mlflow ui --backend-store-uri sqlite:///mlflow.db")
    print(f"  Report:      {result.get('workspace', '.')}/reports/ablation.md")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(limit=args.limit)
    return 0


def add_commands(sub, add_params_option) -> None:
    flow = sub.add_parser("flow", help="run the Prefect pipeline flow from the shell")
    actions = flow.add_subparsers(dest="flow_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run the vift-pipeline flow (ephemeral Prefect API unless PREFECT_API_URL is set)")
    run.add_argument("--preset", default="tiny", help="preset name (default tiny)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted key; repeatable")
    run.add_argument("--isolate", action="store_true", help="run in an own workspace under .vift/runs/")
    run.add_argument("--push", action="store_true", help="dvc push the outputs at the end")
    run.set_defaults(func=cmd_flow_run)
    serve = sub.add_parser("serve", help="serve the vift deployments so they can be triggered from the Prefect UI")
    serve.add_argument("--limit", type=int, default=2, help="flow runs executed at the same time")
    serve.set_defaults(func=cmd_serve)
