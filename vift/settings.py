"""Where things live: tracking server, DVC remote. Values come from the environment or defaults."""

from __future__ import annotations

import os
from pathlib import Path

from vift import paths


def tracking_uri(workspace: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded sqlite database in ``workspace`` (default: here)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(workspace or '.') / paths.MLFLOW_DB).resolve()}"


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
