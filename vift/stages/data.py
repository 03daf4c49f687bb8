"""Stage ``data``: generate ShapeTally, or import external manifests; validate every split."""

from __future__ import annotations

from pathlib import Path

from vift import paths
from vift.config.schema import Params
from vift.data.contract import import_manifests, validate_splits
from vift.data.generate import generate_shapetally
from vift.io import atomic_write_json


def run(params: Params) -> None:
    if params.data.source == "shapetally":
        generate_shapetally(params.data, paths.DATA_DIR)
    else:
        import_manifests(Path(params.data.import_dir), params.data.bad_records)
    report = validate_splits(paths.DATA_DIR, params.data.bad_records)
    atomic_write_json(paths.REPORTS_DIR / "data.json", report)
