"""Stage ``evaluate``: the ablation table on the test split, with predictions and plots."""

from __future__ import annotations

import json
import time

from vift import paths
from vift.config.schema import Params
from vift.eval.ablation import perception, run_ablation, summarise
from vift.eval.chains import restatement
from vift.eval.plots import accuracy_bars, accuracy_by_type
from vift.eval.report import ablation_markdown, headline
from vift.eval.runner import load_images, load_vqa
from vift.fusion.modes import MODE_ROWS, FusionFile, Prompts
from vift.io import atomic_directory, atomic_write_json, atomic_write_text
from vift.model.loading import load_model, load_processor


def _loader(path, params: Params):
    def load():
        return (
            load_model(path, params.model.dtype, params.model.trust_remote_code).eval(),
            load_processor(path, params.model.trust_remote_code),
        )

    return load


def run(params: Params) -> None:
    started = time.time()
    read = FusionFile.read(paths.FUSION_JSON)
    fusion_file = read.content  # the calibration summary goes into metrics.json
    fusion = read.spec
    records = load_vqa(paths.manifest("test"), paths.DATA_DIR, params.data.bad_records)
    images = load_images(records, paths.DATA_DIR)
    models = {"caption": _loader(paths.CAPTION_MODEL, params), "vift": _loader(paths.VIFT_MODEL, params)}
    if (paths.VIT_MODEL / "config.json").exists():  # absent when train_vit was skipped (no visual instructions)
        models["vit"] = _loader(paths.VIT_MODEL, params)
    prompts = Prompts.from_params(params.prompts, paths.manifest("captions"))
    rows = run_ablation(
        models, records, images, fusion, params.eval.batch_size, params.eval.max_new_tokens, params.eval.seed, prompts=prompts,
        progress=lambda name: print(f"evaluate: {name}", flush=True),
    )  # fmt: skip
    metrics = summarise(rows, params.eval.bootstrap_samples, params.eval.seed)
    if restated := restatement(rows, records, params.eval.bootstrap_samples, params.eval.seed):
        metrics["restated"] = restated  # reasoning-chain answers: the objects they restate
    seen = perception(models, records, images, prompts.describe, params.eval.batch_size)
    if seen is not None:
        metrics["perception"] = seen
    metrics["fusion"] = fusion_file["fusion"]
    metrics["calibration"] = fusion_file["calibration"]
    # Each file is written atomically, the set is not: the headline files go first and come back
    # last, so a failure in between (a full disk) leaves no old table beside new predictions.
    for stale in (paths.METRICS_JSON, paths.HEADLINE_JSON, paths.ABLATION_MD):
        stale.unlink(missing_ok=True)
    with atomic_directory(paths.PREDICTIONS_DIR) as out:
        for name, items in rows.items():
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in items))
    accuracy_bars(metrics["rows"], paths.PLOTS_DIR / "accuracy.png")
    accuracy_by_type(metrics["rows"], paths.PLOTS_DIR / "accuracy_by_type.png")
    atomic_write_text(
        paths.PLOTS_DIR / "accuracy.csv",
        "row,accuracy,ci_low,ci_high\n"
        + "".join(f"{n},{r['accuracy']:.4f},{r['ci95'][0]:.4f},{r['ci95'][1]:.4f}\n" for n, r in metrics["rows"].items()),
    )
    atomic_write_text(
        paths.ABLATION_MD, ablation_markdown(metrics, fusion_file["fusion"], f"Ablation ({params.preset} preset, test split)")
    )
    atomic_write_json(paths.METRICS_JSON, metrics)
    atomic_write_json(paths.HEADLINE_JSON, headline(metrics, MODE_ROWS[read.mode]))
    print(f"evaluate: {len(rows)} rows in {time.time() - started:.0f} s", flush=True)
