"""Stage ``calibrate``: choose the fusion configuration of the stage-2 model on the calibration split."""

from __future__ import annotations

import csv
import io
import time

from rich.progress import Progress

from vift import paths
from vift.config.schema import Params
from vift.eval.plots import calibration_heatmap
from vift.eval.runner import load_images, load_vqa
from vift.fusion.calibrate import Calibrator, search
from vift.io import atomic_write_json, atomic_write_text
from vift.model.loading import load_model, load_processor


def run(params: Params) -> None:
    started = time.time()
    model = load_model(paths.VIFT_MODEL, params.model.dtype, params.model.trust_remote_code).eval()
    processor = load_processor(paths.VIFT_MODEL, params.model.trust_remote_code)
    records = load_vqa(paths.manifest("calibration"), paths.DATA_DIR, params.data.bad_records)
    calibrator = Calibrator(
        model, processor, records, load_images(records, paths.DATA_DIR), params.fusion.calibrate.batch_size, params.eval.max_new_tokens
    )
    with Progress() as progress:
        task = progress.add_task("calibrating fusion", total=params.fusion.calibrate.budget)
        result = search(calibrator, params.fusion.calibrate, lambda done, total: progress.update(task, completed=done))
    # Timings go to the log, not into outputs: outputs must be byte-identical when rerun.
    print(f"calibrate: {result['calibration']['evaluated']} configurations in {time.time() - started:.0f} s", flush=True)
    calibration_heatmap(result, paths.PLOTS_DIR / "calibration_heatmap.png")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in result["search"] for k in row)))
    writer.writeheader()
    writer.writerows(result["search"])
    atomic_write_text(paths.PLOTS_DIR / "calibration.csv", table.getvalue())
    atomic_write_json(paths.FUSION_JSON, result)
