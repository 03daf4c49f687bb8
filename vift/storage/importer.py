"""``vift data import DIR``: bring your own manifests (captions, text instructions, VQA) into the pipeline.

What it does, in order (nothing is written unless every step before it passed):

1. finds ``<split>.jsonl`` manifests in ``DIR`` (JSON lines or one JSON array; split names as in
   :data:`vift.data.generate.SPLITS`) and validates every record and image with the same loaders
   and the same :func:`vift.data.contract.validate_splits` the ``data`` stage uses: problems are
   ``file:line: problem``, exit code 2;
2. copies the manifests and the images their records name (nothing else; contents, not links;
   a link that resolves outside ``DIR`` is refused) to ``data/imported/<content digest>/``: the
   same content always lands in the same folder;
3. sets ``data.source: import`` and ``data.import_dir: data/imported/<digest>`` in the parameters
   file. ``dvc repro`` then reruns the ``data`` stage (its ``data`` params changed), which copies
   the import into ``data/benchmark``: a DVC output, cached, and pushed with ``vift storage push``.

Because the digest is part of a tracked parameter, importing different content always reruns the
data stage and everything downstream, and importing the same content again changes nothing.

This module lives in ``vift.storage``, not ``vift.data``, on purpose: ``vift/data`` is a dependency
of the ``data`` stage, and editing this command must not rerun the pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vift import paths
from vift.errors import UserError
from vift.io import file_lock

IMPORT_ROOT = Path("data") / "imported"
IGNORED = (".git", ".dvc", "__pycache__", ".DS_Store", ".ipynb_checkpoints")
MAX_PROBLEMS_SHOWN = 20


@dataclass
class ImportResult:
    directory: Path
    digest: str
    sizes: dict[str, int]
    missing: list[str]
    skipped: int = 0
    unchanged: bool = False
    reused_copy: bool = False
    warnings: list[str] = field(default_factory=list)


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and content, in sorted order (16 hex digits)."""
    from vift.data.generate import file_sha256

    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()[:16]


def _validate(source: Path, bad_records: str) -> tuple[dict[str, int], int]:
    from vift.data.contract import refuse_empty_splits, validate_splits

    checked = validate_splits(source, "skip")  # collect every problem, then decide
    problems = [p for split in checked.values() for p in split["problems"]]
    total = sum(split["skipped"] for split in checked.values())
    refuse_empty_splits(source, checked)
    if total and bad_records == "fail":
        shown = "\n".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n... and {total - min(len(problems), MAX_PROBLEMS_SHOWN)} more" if total > MAX_PROBLEMS_SHOWN else ""
        raise UserError(
            f"{total} invalid record(s) in {source}; nothing was imported:\n{shown}{more}\n"
            "fix them, or import anyway with --bad-records skip (bad records are skipped and counted)",
            exit_code=2,
        )
    return {split: v["loaded"] for split, v in checked.items()}, total


def dataset_name(source: Path) -> str | None:
    """The folder's name as a data set name (the registered model is named after it), or None."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.resolve().name).strip("-._")[:64]
    return name or None


def _remove_orphans() -> None:
    """Temporary folders left by an import that was killed (called with the import lock held)."""
    for orphan in IMPORT_ROOT.glob(".import-*.tmp"):
        shutil.rmtree(orphan, ignore_errors=True)


def import_dataset(source: str | Path, params_file: str | Path, bad_records: str = "fail") -> ImportResult:
    """Validate ``source``, copy what its manifests reference under ``data/imported/<digest>``, point the parameters at it."""
    from vift.config import apply_overrides, load_params, write_params
    from vift.data.contract import check_contract, check_references, copy_references
    from vift.data.generate import SPLITS

    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source}: not a directory (give the folder that holds the <split>.jsonl manifests)", exit_code=2)
    found = [s for s in SPLITS if (source / f"{s}.jsonl").exists()]
    if not found:
        raise UserError(
            f"{source}: holds none of {', '.join(f'{s}.jsonl' for s in SPLITS)} "
            "(training splits: LLaVA conversation records; calibration/test: VQA records; see README 'Manifests')",
            exit_code=2,
        )
    load_params(params_file)  # a missing or invalid params file fails before anything is copied
    check_contract(source)
    files = check_references(source)
    warnings = [
        f"{p}: not a split manifest, not imported (manifests are <split>.jsonl, splits: {', '.join(SPLITS)})"
        for p in sorted(source.glob("*.json*"))
        if p.is_file() and not (p.suffix == ".jsonl" and p.stem in SPLITS) and p.name != "summary.json"
    ]
    sizes, skipped = _validate(source, bad_records)

    IMPORT_ROOT.mkdir(parents=True, exist_ok=True)
    # One import at a time per workspace: concurrent imports would each read the parameters file
    # and the last writer would drop the others' update.
    with file_lock(paths.IMPORT_LOCK):
        _remove_orphans()
        tmp = Path(tempfile.mkdtemp(dir=IMPORT_ROOT, prefix=".import-", suffix=".tmp"))
        created: Path | None = None
        try:
            copy_references(source, files, tmp)
            digest = tree_digest(tmp)
            target = IMPORT_ROOT / digest
            reused = target.is_dir()
            if reused:
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, target)
                created = target
            params = load_params(params_file)
            overrides: dict = {"data.source": "import", "data.import_dir": target.as_posix(), "data.name": dataset_name(source)}
            if bad_records == "skip":
                overrides["data.bad_records"] = "skip"
            updated = apply_overrides(params, overrides)
            unchanged = updated == params
            if not unchanged:
                write_params(updated, params_file)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
    missing = [s for s in SPLITS if s not in found]
    return ImportResult(target, digest, sizes, missing, skipped, unchanged, reused, warnings)


def cmd_import(args: argparse.Namespace) -> int:
    from vift.data.generate import SPLIT_READERS

    result = import_dataset(args.directory, args.params, args.bad_records)
    for warning in result.warnings:
        print(f"warning: {warning}")
    counts = ", ".join(f"{split} {n}" for split, n in result.sizes.items())
    print(f"{args.directory}: valid ({counts})" + (f"; {result.skipped} bad record(s) will be skipped" if result.skipped else ""))
    print(f"  copied to {result.directory}" + (" (identical content was there already)" if result.reused_copy else ""))
    if result.unchanged:
        print(f"  {args.params} already uses this import: nothing to rerun")
    else:
        print(f"  {args.params}: data.source import, data.import_dir {result.directory.as_posix()}")
    for split in result.missing:
        print(f"  {split}: not provided (optional; read by {SPLIT_READERS[split]})")
    print("next: `dvc repro` (reruns the data stage and what depends on it), then `vift storage push`")
    return 0


def add_commands(sub, add_params_option) -> None:
    data = sub.add_parser("data", help="bring external manifests into the pipeline (vift data import DIR)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    imp = data_sub.add_parser(
        "import",
        help="validate external manifests, copy them under data/imported/ and point the params at them",
        description="DIR holds <split>.jsonl manifests (backbone_text, captions, text_instructions, "
        "visual_instructions: LLaVA conversation records; calibration, test: VQA records) and the images they "
        "reference (paths relative to DIR). Invalid records are reported as file:line (exit 2) and nothing is "
        "written. On success the manifests and the images they reference (nothing else; links out of DIR are refused) are copied to data/imported/<content digest>/ and the params file gets "
        "data.source: import and data.import_dir; run `dvc repro` next. See docs/STORAGE.md.",
    )
    imp.add_argument("directory", help="folder with the manifests and images")
    imp.add_argument(
        "--bad-records",
        choices=("fail", "skip"),
        default="fail",
        help="fail (default): any invalid record stops the import; skip: import, and set data.bad_records: skip",
    )
    add_params_option(imp)
    imp.set_defaults(func=cmd_import)
