"""Where things live: tracking server, DVC remote. Values come from the environment or defaults."""

from __future__ import annotations

import os
from pathlib import Path

from vift import paths


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs in (``dvc exp run`` sets these variables), else ``{}``."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return {}
    return {"name": name, "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""), "root": os.environ.get("DVC_ROOT", "")}


def tracking_uri(workspace: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded sqlite database in ``workspace`` (default: here).

    Inside a DVC experiment the embedded database is the repository's own (``DVC_ROOT``), not the
    temporary copy's that ``dvc exp run --temp`` / ``--queue`` runs in and then deletes.
    """
    root = dvc_experiment().get("root") or workspace or "."
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / paths.MLFLOW_DB).resolve()}"


def dvc_remote() -> dict[str, str | None]:
    """The default DVC remote's name and URL (credentials never included)."""
    try:
        from dvc.config import Config

        config = Config.from_cwd(validate=False)
    except Exception:  # noqa: BLE001 - outside a DVC repository there is simply no remote
        return {"name": None, "url": None}
    name = config.get("core", {}).get("remote")
    url = config.get("remote", {}).get(name, {}).get("url") if name else None
    return {"name": name, "url": url}


# MLflow's HTTP client retries a dead server 7 times with a doubling backoff (measured: a register
# stage hung ~496 s after the server was killed). vift's own reachability check already retries
# (VIFT_MLFLOW_RETRIES); MLflow's retries only need to ride out a blip. Request timeouts stay
# MLflow's (120 s): uploading a real checkpoint through a proxied server takes minutes.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def bound_mlflow_http() -> None:
    """Apply :data:`MLFLOW_HTTP_DEFAULTS` where the environment does not set them."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
