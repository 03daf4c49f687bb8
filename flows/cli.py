"""``vift flow run`` and ``vift serve``: the pipeline flow from the shell, and its deployments."""

from __future__ import annotations

import argparse
import json
import os

from pydantic import ValidationError

from vift.config.load import format_validation_error, parse_overrides
from vift.settings import tracking_uri


def _mlflow_ui(workspace: str | None = None) -> str:
    """Where the run's MLflow records are: the embedded database (isolated runs have their own) or the server."""
    uri = tracking_uri(workspace)
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {uri}"


def _validated(model, source: str, **fields):
    """``model(**fields)``, or a UserError naming each invalid field (exit 2)."""
    from vift.errors import UserError

    try:
        return model(**fields)
    except ValidationError as error:
        raise UserError(format_validation_error(source, error), exit_code=2) from None


def _parameters(args: argparse.Namespace):
    from flows.pipeline import PipelineParameters

    overrides = parse_overrides(args.set or [])
    return _validated(
        PipelineParameters, "pipeline parameters",
        preset=args.preset, data=args.data, overrides=overrides, isolate=args.isolate, push=args.push,
    )  # fmt: skip


def cmd_flow_run(args: argparse.Namespace) -> int:
    # The ephemeral API server's telemetry heartbeat races the flow for its sqlite database
    # ("database is locked" tracebacks); nothing here should phone home anyway.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import vift_pipeline

    result = vift_pipeline(_parameters(args))
    print(json.dumps(result, indent=2, default=str))
    print("\nWhere to look:")
    print("  Prefect UI:  prefect server start   (then http://127.0.0.1:4200)")
    print(f"  MLflow UI:   {_mlflow_ui(result.get('workspace'))}")
    print(f"  Report:      {result.get('workspace', '.')}/reports/ablation.md")
    print("  Next:        vift sweep --preset tiny   (accuracy against training samples, ViFT vs the baseline)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as in cmd_flow_run
    from flows.sweep import SweepParameters, vift_data_efficiency

    parameters = _validated(
        SweepParameters,
        "sweep parameters",
        preset=args.preset,
        data=args.data,
        overrides=parse_overrides(args.set or []),
        fractions=args.fractions,
        seeds=args.seeds,
        push=args.push,
        fan_out=args.fan_out,
    )
    result = vift_data_efficiency(parameters)
    print(json.dumps(result, indent=2, default=str))
    print("\nWhere to look:")
    print(f"  Table:       {result['out']}/data_efficiency.md")
    print(f"  Plot:        {result['out']}/data_efficiency.png")
    print(f"  MLflow UI:   {_mlflow_ui()}")
    return 0


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.25,0.5,1") from None


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 0,1,2") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(limit=args.limit)
    return 0


def add_commands(sub, add_params_option) -> None:
    flow = sub.add_parser("flow", help="run the Prefect pipeline flow from the shell")
    actions = flow.add_subparsers(dest="flow_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run the vift-pipeline flow (ephemeral Prefect API unless PREFECT_API_URL is set)")
    run.add_argument("--preset", default="tiny", help="preset name (default tiny)")
    run.add_argument(
        "--data", choices=("workspace", "preset"), default="workspace",
        help="workspace (default): keep the workspace's imported data (`vift data import`) if it has one; "
        "preset: the preset's ShapeTally data, replacing an import",
    )  # fmt: skip
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted key; repeatable")
    run.add_argument("--isolate", action="store_true", help="run in an own workspace under .vift/runs/")
    run.add_argument("--push", action="store_true", help="dvc push the outputs at the end")
    run.set_defaults(func=cmd_flow_run)
    sweep = sub.add_parser(
        "sweep",
        help="data-efficiency sweep: train ViFT and the baseline on fractions of the data, plot accuracy against samples",
        description="Runs the vift-data-efficiency flow (ephemeral Prefect API unless PREFECT_API_URL is set): one "
        "isolated pipeline per fraction up to evaluate, then the table, plot and MLflow run under reports/sweeps/.",
    )
    sweep.add_argument("--preset", default="tiny", help="preset name (default tiny)")
    sweep.add_argument("--data", choices=("workspace", "preset"), default="workspace", help="as in `vift flow run --data`")
    sweep.add_argument("--fractions", type=_fractions, default=[0.25, 0.5, 1.0], help="comma-separated shares (default 0.25,0.5,1)")
    sweep.add_argument(
        "--seeds", type=_seeds, default=None, metavar="S,S,...",
        help="train every fraction once per seed (data, base and training seeds), report the mean and the "
        "across-seed interval (default: the preset's seeds, one run per fraction)",
    )  # fmt: skip
    sweep.add_argument(
        "--fan-out", type=int, default=0, metavar="N",
        help="run each point as a run of the served vift-pipeline deployment, at most N at a time "
        "(needs PREFECT_API_URL and `vift serve` or a worker pool; default 0: one after another, here)",
    )  # fmt: skip
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted key at every point; repeatable")
    sweep.add_argument("--push", action="store_true", help="dvc push each point's outputs")
    sweep.set_defaults(func=cmd_sweep)
    serve = sub.add_parser("serve", help="serve the vift deployments (pipeline, data-efficiency sweep) for the Prefect UI")
    serve.add_argument("--limit", type=int, default=2, help="flow runs executed at the same time")
    serve.set_defaults(func=cmd_serve)
