"""``vift storage``: configure, check, push and pull DVC remotes (docs/STORAGE.md)."""

from __future__ import annotations

import argparse
import json

from vift.errors import UserError


def _remote_for(args: argparse.Namespace) -> str | None:
    from vift.storage.remote import resolve_remote_name

    name, why = resolve_remote_name(args.remote, getattr(args, "params", None))
    args.remote_reason = why
    return name


def cmd_configure(args: argparse.Namespace) -> int:
    from vift.storage.check import create_bucket
    from vift.storage.remote import configure_s3_remote, resolve_remote_name

    result = configure_s3_remote(
        endpoint=args.endpoint,
        bucket=args.bucket,
        prefix=args.prefix,
        name=args.name,
        region=args.region,
        make_default=args.default,
        local_credentials=args.local_credentials,
        create_bucket=create_bucket if args.create_bucket else None,
    )
    remote = result.remote
    if result.created_bucket is not None:
        print(f"bucket {remote.bucket}: " + ("created" if result.created_bucket else "exists already"))
    print(f"remote {remote.name}: url {remote.url}" + (f", endpointurl {remote.endpoint}" if remote.endpoint else ""))
    print(f"  written to .dvc/config{' (now the default remote)' if result.made_default else ''}")
    if result.wrote_credentials:
        print("  credentials from the environment written to .dvc/config.local (git-ignored, mode 600)")
    if result.moved_secrets:
        print(
            f"  moved {', '.join(result.moved_secrets)} from .dvc/config to .dvc/config.local; "
            "rotate these keys if .dvc/config was ever committed with them"
        )
    try:
        pinned, _ = resolve_remote_name(None, args.params)
    except UserError:  # an invalid params file is not this command's business
        pinned = None
    if pinned and pinned != remote.name and result.made_default:
        print(
            f"  note: storage.remote in {args.params} is {pinned!r}, which `vift storage push/pull` use before the DVC "
            "default; set it to null (or to this remote) to use this one"
        )
    if not result.made_default and not remote.is_default:
        print(f"  not the default remote: use `vift storage push --remote {remote.name}` or rerun with --default")
    print(f"next: `vift storage check --remote {remote.name}`")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from vift.storage.check import check_remote
    from vift.storage.remote import get_remote

    remote = get_remote(_remote_for(args))
    report = check_remote(remote, write_probe=not args.no_write_probe)
    if args.json:
        print(
            json.dumps(
                {
                    "remote": remote.name,
                    "url": remote.url,
                    "endpoint": remote.endpoint,
                    "credentials": report.credentials,
                    "steps": report.steps,
                    "warnings": report.warnings,
                },
                indent=2,
            )
        )
        return 0
    print(f"{remote.describe()}: OK")
    for step in report.steps:
        print(f"  ok: {step}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from vift.storage.transfer import push

    result = push(_remote_for(args), args.targets, args.jobs, check=not args.no_check)
    print(f"{result.transferred} file(s) pushed to {result.remote.describe()}" + ("" if result.transferred else " (everything was there)"))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from vift.storage.transfer import pull

    result = pull(_remote_for(args), args.targets, args.jobs, force=args.force, check=not args.no_check)
    changes = ", ".join(f"{v} file(s) {k}" for k, v in result.details.items() if k != "fetched" and isinstance(v, int) and v)
    print(f"{result.transferred} file(s) fetched from {result.remote.describe()}" + (f"; workspace: {changes}" if changes else ""))
    return 0


def cmd_remotes(args: argparse.Namespace) -> int:
    from vift.storage.remote import credential_source, list_remotes

    rows = []
    for remote in list_remotes():
        rows.append(
            {
                "name": remote.name,
                "url": remote.url,
                "endpoint": remote.endpoint,
                "default": remote.is_default,
                "credentials": credential_source(remote) if remote.is_s3 else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = "*" if row["default"] else " "
        extra = f"  endpoint {row['endpoint']}" if row["endpoint"] else ""
        creds = f"  credentials: {row['credentials'] or 'none found'}" if row["url"].startswith("s3://") else ""
        print(f"{mark} {row['name']:12} {row['url']}{extra}{creds}")
    return 0


def add_commands(sub, add_params_option) -> None:
    storage = sub.add_parser(
        "storage",
        help="DVC remotes: configure an S3 / MinIO remote, check it, push and pull",
        description="DVC remotes: the local default (.dvcstore) and S3-compatible team storage. "
        "Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) "
        "or .dvc/config.local. See docs/STORAGE.md.",
    )
    storage_sub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")

    configure = storage_sub.add_parser(
        "configure",
        help="add or update an S3 remote in .dvc/config (DVC's own config API)",
        description="Write url = s3://BUCKET/PREFIX and endpointurl = URL for remote NAME into .dvc/config. "
        "Never writes credentials there; --local-credentials copies them from the environment into the git-ignored "
        ".dvc/config.local.",
    )
    configure.add_argument("--endpoint", help="S3 endpoint, e.g. http://localhost:9000 (MinIO); omit for AWS S3")
    configure.add_argument("--bucket", required=True, help="bucket name")
    configure.add_argument("--prefix", default="dvc", help="key prefix inside the bucket (default: dvc; '' for none)")
    configure.add_argument("--name", default="s3", help="remote name (default: s3)")
    configure.add_argument("--region", help="bucket region (default: AWS_DEFAULT_REGION, else us-east-1)")
    configure.add_argument("--create-bucket", action="store_true", help="create the bucket first if it is missing")
    configure.add_argument("--default", action="store_true", help="make it the default remote (core.remote)")
    configure.add_argument(
        "--local-credentials",
        action="store_true",
        help="copy AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) from the environment into .dvc/config.local",
    )
    add_params_option(configure)
    configure.set_defaults(func=cmd_configure)

    def remote_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--remote", "-r", help="remote name (default: storage.remote in the params file, else DVC's default remote)")
        add_params_option(p)

    check = storage_sub.add_parser(
        "check",
        help="reach the remote: endpoint, credentials, bucket, a write probe; say what is wrong",
        description="For S3 remotes: DNS + TCP to the endpoint, credentials present, head_bucket, then a small object "
        "written, read back and deleted under the prefix. Exit 1 with the cause: endpoint unreachable, "
        "credentials missing, access denied or bucket missing.",
    )
    remote_option(check)
    check.add_argument("--no-write-probe", action="store_true", help="only check read access (no put/delete)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=cmd_check)

    for verb, helptext in (
        ("push", "check the remote, then dvc push the cached outputs (all, or TARGETS)"),
        ("pull", "check the remote, then dvc pull: fetch into the cache and check out the outputs"),
    ):
        p = storage_sub.add_parser(verb, help=helptext, description=helptext + ". Safe to rerun after an interruption.")
        p.add_argument("targets", nargs="*", help="stages or outputs (default: everything in dvc.yaml / dvc.lock)")
        remote_option(p)
        p.add_argument("--jobs", "-j", type=int, help="parallel transfers (DVC's default: 4 x CPU cores)")
        p.add_argument("--no-check", action="store_true", help="skip the remote check before DVC runs")
        if verb == "pull":
            p.add_argument("--force", "-f", action="store_true", help="overwrite modified workspace outputs")
        p.set_defaults(func=cmd_push if verb == "push" else cmd_pull)

    remotes = storage_sub.add_parser("remotes", help="list the DVC remotes (* = default) and where credentials come from")
    remotes.add_argument("--json", action="store_true", help="print JSON")
    remotes.set_defaults(func=cmd_remotes)
