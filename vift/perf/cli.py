"""``vift bench NAME``: benchmarks that report ratios measured in one run against a baseline.

Each benchmark module defines ``add_arguments(parser)`` and ``run(args) -> dict``; the result is
printed as one JSON object (``--json``) or as aligned lines.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHMARKS = {
    "train": "vift.perf.train",
    "fusion": "vift.perf.fusion",
    "gpu": "vift.perf.gpu",
}


def _run(args: argparse.Namespace) -> int:
    result = importlib.import_module(BENCHMARKS[args.benchmark]).run(args)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    return 0


def add_commands(sub, add_params_option) -> None:
    bench = sub.add_parser("bench", help="benchmarks: ratios against a baseline measured in the same run")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        module.add_arguments(parser)
        parser.set_defaults(func=_run)
