"""``vift eval``: one checkpoint on one benchmark (MathVista / MathVerse / MathVision testmini, or a
VQA manifest), with or without fusion; predictions JSONL + metrics JSON + a summary table."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from vift.errors import UserError

DEFAULT_OUT = Path("reports") / "eval"
# what a run's metrics.json records of how it asked and how it read the answers
BUILT_PROMPT = "Question: {question}[ (Unit: {unit})][\\nChoices:\\n(A) {choice}...]\\n{answer-format rule}"


def _params(path: str):
    from vift.config import load_params
    from vift.config.schema import Params

    # eval does not need the pipeline: without a parameters file the schema's defaults apply
    return load_params(path) if Path(path).is_file() else Params()


def load_fusion(path: str | Path):
    """A FusionSpec from a fusion file (``{"fusion": {...}}`` as the calibrate stage writes it, or the
    bare spec), validated like the ``fusion`` parameters (:class:`vift.fusion.modes.FusionFile`)."""
    from vift.fusion.modes import FusionFile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fusion {path}: no such file (the calibrate stage writes models/fusion.json)")
    return FusionFile.read(path).spec


def _load_registered(reference: str):
    """(model, processor, registered fusion) of a ``models:/`` URI, through the registry's loader."""
    try:
        from vift.registry.loaded import load_registered
    except ImportError:
        load_registered = None
    if load_registered is None:
        raise UserError(
            f"--model {reference}: this installation cannot load registered models; download the checkpoint "
            f"(mlflow artifacts download -u {reference}) and pass its folder",
            exit_code=2,
        )
    pyfunc_model, _ = load_registered(reference)
    inner = pyfunc_model.unwrap_python_model()
    if not all(hasattr(inner, name) for name in ("model", "processor", "fusion")):
        raise UserError(f"--model {reference}: not a ViFT model (no model, processor and fusion); use `vift predict`")
    return inner.model.eval(), inner.processor, inner.fusion


def _load_model(reference: str, dtype: str, trust_remote_code: bool, device: str):
    """(model, processor, fusion registered with the model or None)."""
    import torch

    from vift.model.loading import load_model, load_processor

    if reference.startswith("models:/"):
        return _load_registered(reference)
    try:
        model = load_model(reference, dtype, trust_remote_code).eval()
    except UserError as error:  # its messages name the pipeline's key; here the user typed --model
        raise UserError(str(error).replace("model.base: ", "--model ", 1), error.exit_code) from None
    try:
        processor = load_processor(reference, trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
        raise UserError(f"--model {reference}: the processor does not load ({error})") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"--device {device}: {error}") from None
    return model, processor, None


def _judge(enabled: bool, params):
    if not enabled:
        return None
    from vift.benchmarks.judge import Judge, JudgeConfig

    return Judge(JudgeConfig.from_env(default_model=params.eval.judge.model))


def summary_table(title: str, metrics: dict) -> str:
    def line(name: str, part: dict) -> str:
        low, high = part["ci95"]
        return f"{name:<28} {part['n']:>6} {100 * part['accuracy']:>9.1f} %   {100 * low:5.1f}–{100 * high:5.1f}"

    lines = [title, f"{'type':<28} {'n':>6} {'accuracy':>11}   95 % CI (Wilson)"]
    lines += [line(name, part) for name, part in metrics["by_type"].items()]
    lines.append(line("ALL", metrics))
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    started = time.time()
    params = _params(args.params)
    batch_size = params.eval.batch_size if args.batch_size is None else args.batch_size
    max_new_tokens = params.eval.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    judge_on = params.eval.judge.enabled if args.judge is None else args.judge
    for name, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1", exit_code=2)
    # fail fast on everything the user typed before loading a model
    fusion = None if args.no_fusion or not args.fusion else load_fusion(args.fusion)
    judge = _judge(judge_on, params)
    # the hub's parquet files embed their images: they are written here for the run, then removed
    with tempfile.TemporaryDirectory(prefix="vift-eval-images-") as image_dir:
        return _evaluate(args, started, params, batch_size, max_new_tokens, fusion, judge, Path(image_dir))


def _evaluate(args, started, params, batch_size, max_new_tokens, fusion, judge, image_dir: Path) -> int:
    from vift.benchmarks.formats import load_benchmark
    from vift.benchmarks.generation import CONTROLS, generate_answers
    from vift.benchmarks.scoring import EXTRACTION, make_scorer, no_answer_count, rule_coverage
    from vift.benchmarks.specs import SPECS
    from vift.eval.runner import prediction_rows, score
    from vift.io import atomic_write_json, atomic_write_text
    from vift.scoring.stats import paired_comparison

    records, annotation, data_dir = load_benchmark(
        args.benchmark, args.data, args.file, args.limit, args.breakdown, args.prompt_field, image_dir=image_dir
    )
    out = Path(args.out) if args.out else DEFAULT_OUT / args.benchmark
    if args.benchmark != "vqa" and max_new_tokens < 64:
        print(f"vift eval: note: max_new_tokens={max_new_tokens} leaves no room for reasoning; "
              f"real benchmarks usually need --max-new-tokens 512 (the paper-7b preset)", file=sys.stderr)  # fmt: skip
    model, processor, registered = _load_model(args.model, args.dtype or params.model.dtype, args.trust_remote_code, args.device)
    if fusion is None and registered is not None and not args.no_fusion:
        fusion = registered  # a registered model answers with its own fusion unless told otherwise
    if fusion is not None:
        from vift.model.loading import decoder_layers

        try:
            fusion.layer_range(len(decoder_layers(model)))
        except ValueError as error:
            raise UserError(f"--fusion {args.fusion or args.model}: {error}", exit_code=2) from None

    def progress(done: int, total: int) -> None:
        print(f"vift eval: {done}/{total} answered", file=sys.stderr, flush=True)

    answers = generate_answers(model, processor, records, data_dir, fusion, batch_size, max_new_tokens, progress)
    scorer = make_scorer(args.benchmark, judge)
    workers = judge.config.workers if judge else 1
    rows = prediction_rows(records, answers, scorer, workers=workers)
    metrics = score(rows)
    control_rows = {}
    for control in CONTROLS if args.controls else ():
        print(f"vift eval: control {control}", file=sys.stderr, flush=True)
        responses = generate_answers(
            model, processor, records, data_dir, fusion, batch_size, max_new_tokens, progress, control, params.eval.seed
        )
        control_rows[control] = prediction_rows(records, responses, scorer, workers=workers)
    if control_rows:
        main = [r["correct"] for r in rows]
        metrics["controls"] = {control: score(items) for control, items in control_rows.items()}
        # per comparison: the paired difference with its interval and McNemar p, and the items the
        # main run got right and the control wrong (helped) and the other way round (hurt)
        metrics["paired"] = {
            f"main_vs_{control}": paired_comparison(main, [r["correct"] for r in items], params.eval.bootstrap_samples, params.eval.seed)
            for control, items in control_rows.items()
        }
    metrics.update(
        {
            "benchmark": args.benchmark,
            "annotation_file": str(annotation),
            "model": str(args.model),
            "fusion": fusion.to_dict() if fusion else None,
            "scoring": f"judge ({judge.config.model})" if judge else "rules",
            "breakdown": args.breakdown or SPECS[args.benchmark].breakdowns[0],
            "prompt": args.prompt_field or "built",
            "prompt_template": f"{{{args.prompt_field}}}" if args.prompt_field else BUILT_PROMPT,
            "extraction": EXTRACTION[args.benchmark]
            if judge is None
            else "the judge's extraction, then "
            + ("MathVista's normalisation" if args.benchmark == "mathvista" else "the judge's agreement verdict"),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "no_answer": no_answer_count(rows),
            "rule_coverage": rule_coverage(args.benchmark, records, answers),
            "seconds": round(time.time() - started, 1),
        }
    )
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    for control, items in control_rows.items():
        lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in items)
        atomic_write_text(out / f"predictions_{control}.jsonl", lines)
    atomic_write_json(out / "metrics.json", metrics)
    fused = "none" if fusion is None else f"{fusion.mode} a={fusion.a:g} b={fusion.b:g} w_vis={fusion.w_vis:g} w_text={fusion.w_text:g}"
    title = f"{SPECS[args.benchmark].title}: {len(rows)} items, scoring {metrics['scoring']}, fusion {fused}"
    print(summary_table(title, metrics))
    for control, part in metrics.get("controls", {}).items():
        pair = metrics["paired"][f"main_vs_{control}"]
        low, high = pair["ci95"]
        print(f"control {control:<14} {100 * part['accuracy']:5.1f} %   main - control {100 * pair['difference']:+.1f} pp "
              f"[{100 * low:+.1f}, {100 * high:+.1f}], helped {pair['only_first_correct']}, hurt {pair['only_second_correct']}, "
              f"McNemar p {pair['mcnemar_p']:.3g}")  # fmt: skip
    print(f"predictions: {out / 'predictions.jsonl'}\nmetrics:     {out / 'metrics.json'}")
    return 0


def add_commands(sub, add_params_option) -> None:
    from vift.benchmarks.specs import BENCHMARKS

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on MathVista / MathVerse / MathVision testmini or a VQA manifest",
        description="Answer every item of a benchmark with a local HF checkpoint (plain or fused), score the "
        "answers (rule-based extraction, or the LLM judge), and write predictions.jsonl and metrics.json.",
    )
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="the benchmark's folder (its JSON, or the dataset hub's parquet shards), or the annotation file",
    )
    p.add_argument("--file", metavar="NAME", help="annotation file inside --data (default: found by name, e.g. testmini.json)")
    p.add_argument(
        "--model", required=True, metavar="PATH_OR_URI",
        help="local HF checkpoint directory (safetensors), or models:/NAME@ALIAS (its registered fusion applies "
        "unless --fusion or --no-fusion)",
    )  # fmt: skip
    fusion = p.add_mutually_exclusive_group()
    fusion.add_argument("--fusion", metavar="FILE.json", help="fusion file ({'fusion': {...}}, e.g. models/fusion.json)")
    fusion.add_argument("--no-fusion", action="store_true", help="the plain model (the default for a checkpoint folder without --fusion)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N records")
    p.add_argument(
        "--controls",
        action="store_true",
        help="also answer every item without its image, with another item's image and with a black image (fused as the main "
        "run), and report each with the paired difference and the items fusion helped and hurt",
    )
    p.add_argument("--batch-size", type=int, metavar="B", help="default: eval.batch_size of the parameters")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="default: eval.max_new_tokens of the parameters")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {DEFAULT_OUT}/BENCHMARK)")
    p.add_argument(
        "--judge", action=argparse.BooleanOptionalAction, default=None,
        help="score with the LLM judge (VIFT_JUDGE_BASE_URL, VIFT_JUDGE_API_KEY, VIFT_JUDGE_MODEL); "
        "default: eval.judge.enabled",
    )  # fmt: skip
    p.add_argument("--breakdown", metavar="KEY", help="per-type key (mathvista: category; mathverse: problem_version; mathvision: subject)")
    p.add_argument(
        "--prompt-field",
        metavar="FIELD",
        help="ask the record's own prompt field verbatim (mathvista: query; mathverse: query_cot or query_wo)",
    )
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default: model.dtype of the parameters")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off by default)")
    add_params_option(p)
    p.set_defaults(func=cmd_eval)
