"""Stage ``data``: generate ShapeTally, or import external manifests; validate every split."""

from __future__ import annotations

import shutil
from pathlib import Path

from vift import paths
from vift.config.schema import Params
from vift.data.generate import EVAL_SPLITS, SPLITS, file_sha256, generate_shapetally
from vift.data.manifests import Manifest
from vift.errors import UserError
from vift.io import atomic_directory, atomic_write_json


def validate_splits(directory: Path, policy: str) -> dict[str, dict]:
    """Load every split present in ``directory``; return counts and problems per split."""
    result = {}
    for split in SPLITS:
        path = directory / f"{split}.jsonl"
        if not path.exists():
            continue
        manifest = Manifest(path, "vqa" if split in EVAL_SPLITS else "conversation", directory, policy)
        for _ in manifest:
            pass
        result[split] = {"loaded": manifest.report.loaded, "skipped": manifest.report.skipped, "problems": manifest.report.problems[:20]}
    return result


def import_manifests(source: Path, policy: str) -> dict:
    """Copy ``<split>.jsonl`` manifests and what they reference from ``source`` into the data dir."""
    if not source.is_dir():
        raise UserError(
            f"data.import_dir: {source} is not a directory; in a fresh clone, run `vift data import` on the "
            "original folder again to restore it"
        )
    found = [s for s in SPLITS if (source / f"{s}.jsonl").is_file()]
    if not found:
        raise UserError(f"data.import_dir: {source} holds none of {', '.join(f'{s}.jsonl' for s in SPLITS)}")
    with atomic_directory(paths.DATA_DIR) as tmp:
        checked = validate_splits(source, policy)
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        summary = {
            "world": "import",
            "source": str(source),
            "sizes": {s: v["loaded"] for s, v in checked.items()},
            "sha256": {s: file_sha256(source / f"{s}.jsonl") for s in found},
        }
        atomic_write_json(tmp / "summary.json", summary)
    return summary


def run(params: Params) -> None:
    if params.data.source == "shapetally":
        generate_shapetally(params.data, paths.DATA_DIR)
    else:
        import_manifests(Path(params.data.import_dir), params.data.bad_records)
    report = validate_splits(paths.DATA_DIR, params.data.bad_records)
    atomic_write_json(paths.REPORTS_DIR / "data.json", report)
