"""The ``vift`` command line."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from pathlib import Path

from vift import __version__
from vift.errors import UserError

# Failures of the machine, not of vift: a message naming the file, never a traceback. Writes are
# atomic, so whatever was being written is simply not there.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full; free space and rerun (nothing half-written was kept)",
    errno.EDQUOT: "the disk quota is exceeded; free space and rerun (nothing half-written was kept)",
    errno.EACCES: "permission denied; make the folder writable (or run where you may write) and rerun",
    errno.EPERM: "operation not permitted; check the folder's owner and permissions",
    errno.EROFS: "the file system is read-only; run in a writable workspace",
}


def _offline_defaults() -> None:
    # No machine of ours reaches a model hub; fail fast instead of waiting on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from vift.registry.server import QUIET_URLS, redact
    from vift.settings import bound_mlflow_http

    bound_mlflow_http()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if redact(uri) != uri:  # MLflow would print "View run at <uri>", password included
        os.environ[QUIET_URLS] = "true"


def cmd_info(args: argparse.Namespace) -> int:
    from vift.config import ACTIVE_PARAMS, load_params
    from vift.registry.server import redact
    from vift.settings import dvc_remote, tracking_uri

    params_file = Path(args.params)
    params = load_params(params_file) if params_file.exists() else None
    remote = dvc_remote()
    info = {
        "version": __version__,
        "tracking_uri": redact(tracking_uri()),
        "registered_model": params.registered_model_name() if params else None,
        "dvc_remote": redact(remote["url"]) if remote["url"] else None,
        "dvc_remote_name": remote["name"],
        "params_file": str(params_file),
        "params_file_exists": params_file.exists(),
        "preset": params.preset if params else None,
        "default_params_file": str(ACTIVE_PARAMS),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20} {value}")
    return 0


def cmd_params_show(args: argparse.Namespace) -> int:
    import yaml

    from vift.config import load_params, load_preset

    params = load_preset(args.preset) if args.preset else load_params(args.params)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, default_flow_style=None), end="")
    return 0


def cmd_params_validate(args: argparse.Namespace) -> int:
    from vift.config import load_params

    params = load_params(args.file)
    print(f"{args.file}: valid (preset {params.preset})")
    return 0


def cmd_params_use(args: argparse.Namespace) -> int:
    from vift.config import apply_overrides, load_preset, write_params

    params = load_preset(args.preset)
    if args.set:
        params = apply_overrides(params, args.set)
    path = write_params(params, args.params)
    print(f"{path}: preset {params.preset}" + (f" with {len(args.set)} override(s)" if args.set else ""))
    return 0


def cmd_params_presets(args: argparse.Namespace) -> int:
    from vift.config import available_presets

    print("\n".join(available_presets()))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from vift.config import load_params
    from vift.stages import run_stage

    params = load_params(args.params)
    if args.dry_run:
        from vift.train.launch import TRAINING_STAGES, format_plan, plan_launch

        if args.name in TRAINING_STAGES:
            print(format_plan(plan_launch(params, args.name, args.params)))
        else:
            print(f"stage {args.name}: runs in this process (only training stages launch under accelerate)")
        return 0
    from vift.registry.tracking import stage_run

    with stage_run(args.name, params):  # the workspace's MLflow run (docs/REGISTRY.md); never required offline
        run_stage(args.name, params)
    return 0


# Command groups that live beside the code they drive; each module defines
# ``add_commands(subparsers, add_params_option)``.
COMMAND_MODULES: tuple[str, ...] = (
    "vift.registry.cli",
    "vift.eval.cli",
    "vift.storage.cli",
    "vift.storage.importer",
    "flows.cli",
    "vift.perf.cli",
    "vift.model.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from vift.config import ACTIVE_PARAMS
    from vift.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="vift",
        description="Visual instruction-free fine-tuning of vision-language models: pipeline, tracking, registry.",
    )
    parser.add_argument("--version", action="version", version=f"vift {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_params_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", default=str(ACTIVE_PARAMS), help=f"parameters file (default {ACTIVE_PARAMS})")

    info = sub.add_parser("info", help="where things live: tracking URI, model name, DVC remote, params")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    add_params_option(info)
    info.set_defaults(func=cmd_info)

    params = sub.add_parser("params", help="show, validate or switch parameter files and presets")
    params_sub = params.add_subparsers(dest="params_command", required=True, metavar="ACTION")
    show = params_sub.add_parser("show", help="print the effective parameters (every key)")
    add_params_option(show)
    show.add_argument("--preset", help="show a preset instead of the active file")
    show.set_defaults(func=cmd_params_show)
    validate = params_sub.add_parser("validate", help="validate a parameters file; exit 2 if invalid")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_params_validate)
    use = params_sub.add_parser("use", help="make a preset (plus overrides) the active parameters file")
    use.add_argument("preset")
    use.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted key; repeatable")
    add_params_option(use)
    use.set_defaults(func=cmd_params_use)
    presets = params_sub.add_parser("presets", help="list the presets")
    presets.set_defaults(func=cmd_params_presets)

    stage = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGES)
    add_params_option(stage)
    stage.add_argument("--dry-run", action="store_true", help="print how the stage would run (launch plan, effective arguments)")
    stage.set_defaults(func=cmd_stage)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, add_params_option)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        from vift.registry.server import redact_text

        print(f"vift: error: {redact_text(str(error))}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"vift: error: {where}{error.strerror}: {_ENVIRONMENT_ERRNOS[error.errno]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
