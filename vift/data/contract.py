"""The import contract: which splits a data folder must hold, that every record loads, and that it
references only files inside the folder. Shared by the ``data`` stage and ``vift data import``."""

from __future__ import annotations

import shutil
from pathlib import Path

from vift import paths
from vift.data.generate import EVAL_SPLITS, SPLIT_HAS_IMAGES, SPLITS, file_sha256, missing_required
from vift.data.manifests import Manifest, referenced_files
from vift.errors import UserError
from vift.io import atomic_directory, atomic_write_json


def validate_splits(directory: Path, policy: str) -> dict[str, dict]:
    """Load every split present in ``directory``; return counts and problems per split."""
    result = {}
    for split in SPLITS:
        path = directory / f"{split}.jsonl"
        if not path.exists():
            continue
        kind = "vqa" if split in EVAL_SPLITS else "conversation"
        manifest = Manifest(path, kind, directory, policy, image_required=SPLIT_HAS_IMAGES[split])
        for _ in manifest:
            pass
        result[split] = {"loaded": manifest.report.loaded, "skipped": manifest.report.skipped, "problems": manifest.report.problems[:20]}
    return result


def refuse_empty_splits(directory: Path, checked: dict[str, dict]) -> None:
    """A split that is present but has no valid record is an error, not a 0 % row with n = 0."""
    empty = []
    for split, counts in checked.items():
        if counts["loaded"]:
            continue
        why = f"all {counts['skipped']} record(s) invalid, e.g. {counts['problems'][0]}" if counts["skipped"] else "no records"
        empty.append(f"{directory / f'{split}.jsonl'}: {why}")
    if empty:
        raise UserError("\n".join(empty) + "\nfix the records, or remove the manifests of splits you do not provide", exit_code=2)


def check_contract(source: Path) -> None:
    """Every required split is there (the optional ones skip what needs them)."""
    if missing := missing_required(source):
        raise UserError(
            "\n".join(missing) + "\nadd these manifests (the table in docs/STORAGE.md says what each split is for)",
            exit_code=2,
        )


def check_references(source: Path) -> list[str]:
    """The files of ``source`` the split manifests reference (manifests first); links out of it refused."""
    manifests = [f"{s}.jsonl" for s in SPLITS if (source / f"{s}.jsonl").exists()]
    files, problems = referenced_files(source, manifests)
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"{shown}\nnothing was imported: files must lie inside the folder, not link out of it", exit_code=2)
    return files


def copy_references(source: Path, files: list[str], target: Path) -> None:
    """Copy ``files`` (relative to ``source``) into ``target``: contents, never links or other files."""
    for relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, destination)


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
    check_contract(source)
    files = check_references(source)
    with atomic_directory(paths.DATA_DIR) as tmp:
        checked = validate_splits(source, policy)
        refuse_empty_splits(source, checked)
        copy_references(source, files, tmp)
        summary = {
            "world": "import",
            "source": str(source),
            "sizes": {s: v["loaded"] for s, v in checked.items()},
            "sha256": {s: file_sha256(source / f"{s}.jsonl") for s in found},
        }
        atomic_write_json(tmp / "summary.json", summary)
    return summary
