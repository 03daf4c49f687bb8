"""Stage ``register``: a registered model version of the pipeline run, the alias gate, registration.json."""

from __future__ import annotations

from vift.config.schema import Params


def run(params: Params) -> None:
    from vift.paths import REGISTRATION_JSON
    from vift.registry.gate import register_run
    from vift.registry.tracking import stage_run

    # `vift stage register` already runs inside the workspace's MLflow run; called directly
    # (library use), this opens it. Registration needs tracking, so it is never skipped here.
    with stage_run("register", params) as handle:
        if handle is None:
            from vift.errors import UserError

            raise UserError("register: MLflow tracking is off (VIFT_TRACKING=off or a non-zero RANK); nothing registered")
        report = register_run(params, handle)
    aliases = ", ".join(f"{alias} -> v{version}" for alias, version in report["aliases"].items() if version)
    print(
        f"register: {report['model_name']} version {report['version']} ({report['action']}); "
        f"{report['gate']['reason']}; aliases: {aliases}; see {REGISTRATION_JSON}"
    )
