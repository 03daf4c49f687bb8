"""Stage ``calibrate``: choose the fusion configuration of the stage-2 model on the calibration split."""

from __future__ import annotations

import csv
import io
import time

from rich.progress import Progress

from vift import paths
from vift.config.load import ACTIVE_PARAMS
from vift.config.schema import Params
from vift.errors import UserError
from vift.eval.plots import calibration_heatmap
from vift.eval.report import configuration_label
from vift.eval.runner import load_images, load_vqa
from vift.fusion.calibrate import Calibrator, search
from vift.fusion.method import FusionSpec
from vift.fusion.modes import MODES, Prompts, answer, choose_mode
from vift.io import atomic_write_json, atomic_write_text
from vift.model.loading import load_model, load_processor
from vift.scoring.answers import score_answer
from vift.scoring.stats import paired_comparison


def serving_mode(model, processor, records, images, fusion: FusionSpec, params: Params) -> dict:
    """Every inference mode on the calibration split, and the one to serve (:func:`choose_mode`)."""
    questions = [r.question for r in records]
    prompts = Prompts.from_params(params.prompts, paths.manifest("captions"))
    correct = {}
    for mode in MODES:
        answers = answer(
            model, processor, images, questions, mode, fusion, params.fusion.calibrate.batch_size, params.eval.max_new_tokens, prompts
        )
        correct[mode] = [bool(score_answer(r, a)["correct"]) for r, a in zip(records, answers)]
    chosen = choose_mode(correct, lambda a, b: paired_comparison(a, b, params.eval.bootstrap_samples, params.eval.seed))
    return {**chosen, "prompts": prompts.to_dict()}  # the served model asks the same way


def start_spec(params: Params, num_layers: int) -> FusionSpec:
    """``params.fusion`` as a configuration of this model: the search's seed, or the fixed fusion."""
    spec = FusionSpec.from_dict(params.fusion.model_dump())
    try:
        spec.layer_range(num_layers)
    except ValueError as error:
        raise UserError(f"{ACTIVE_PARAMS}: fusion.layer_start / fusion.layer_end: {error}", exit_code=2) from None
    return spec


def run(params: Params) -> None:
    started = time.time()
    model = load_model(paths.VIFT_MODEL, params.model.dtype, params.model.trust_remote_code).eval()
    processor = load_processor(paths.VIFT_MODEL, params.model.trust_remote_code)
    records = load_vqa(paths.manifest("calibration"), paths.DATA_DIR, params.data.bad_records)
    calibrator_images = load_images(records, paths.DATA_DIR)
    calibrator = Calibrator(model, processor, records, calibrator_images, params.fusion.calibrate.batch_size, params.eval.max_new_tokens)
    with Progress() as progress:
        task = progress.add_task("calibrating fusion", total=params.fusion.calibrate.budget)
        result = search(
            calibrator, params.fusion.calibrate, lambda done, total: progress.update(task, completed=done),
            params.eval.bootstrap_samples, params.eval.seed, start_spec(params, calibrator.num_layers),
        )  # fmt: skip
    # Timings go to the log, not into outputs: outputs must be byte-identical when rerun.
    print(f"calibrate: {result['calibration']['evaluated']} configurations in {time.time() - started:.0f} s", flush=True)
    if held_out := result["calibration"]["cross_validated"]:
        low, high = held_out["ci95"]
        print(
            f"calibrate: held-out gain of the choice over no fusion ({held_out['folds']} folds): "
            f"{100 * held_out['difference']:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}], McNemar p {held_out['mcnemar_p']:.3g}"
            + (" -> no fusion kept (fusion.calibrate.require_held_out_gain)" if held_out["kept_neutral"] else ""),
            flush=True,
        )
    result["serving"] = serving_mode(model, processor, records, calibrator_images, FusionSpec.from_dict(result["fusion"]), params)
    print(f"calibrate: serving mode {result['serving']['mode']} ({result['serving']['accuracy']})", flush=True)
    calibration_heatmap(result, paths.PLOTS_DIR / "calibration_heatmap.png")
    table = io.StringIO()
    rows = [{"configuration": configuration_label(row), **row} for row in result["search"]]
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths.PLOTS_DIR / "calibration.csv", table.getvalue())
    atomic_write_json(paths.FUSION_JSON, result)
