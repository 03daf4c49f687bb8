"""The data-efficiency sweep's results: accuracy against training samples, ViFT beside the baseline.

Each sweep point is a finished pipeline workspace (data -> ... -> evaluate) trained at one
``train.data_fraction``. This module reads what those runs wrote — ``reports/metrics.json``, the
training stages' ``reports/<stage>.json`` and calibration's ``models/fusion.json`` — and writes the sweep's outputs into one directory,
atomically:

- ``data_efficiency.json``: one entry per fraction (training samples per model, steps, the plotted
  rows with accuracy, 95 % interval and n, the paired differences of vift_fused against
  vit_baseline and question_only, the held-out caption phrase F1 after each training stage);
- ``data_efficiency.csv``: one line per (fraction, row), for DVC plots or a spreadsheet;
- ``data_efficiency.md``: the table a person reads, with each point's calibration (its choice, the
  gain on the items it chose on and, k-fold, on held-out items, the mode served);
- ``data_efficiency.png``: accuracy against unique training samples (log scale), intervals as bars.

With seeds (``vift sweep --seeds``), each fraction has one point per seed: the table and the plot
show the mean over seeds with the across-seed 95 % interval (Student t, n - 1 degrees of freedom:
how much the result moves when the data and the training are redrawn), each paired comparison says
in how many seeds its own paired interval lies above or below 0, and a per-seed table follows.

"Training samples" are the distinct records a model was trained on: ViFT sees captions (stage 1
and the stage-2 mix) and text-only instructions; the baseline sees the same captions and visual
instructions. Optimizer steps do not change with the fraction (equal compute at every point), so a
smaller fraction means more passes over fewer records.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from vift import paths
from vift.errors import UserError
from vift.eval.report import configuration_label, percent
from vift.io import atomic_directory

# Rows drawn against training samples, and which model's samples place them on the x axis.
PLOTTED_ROWS = {
    "vift_fused": "vift",
    "vift_unfused": "vift",
    "question_only": "vift",  # the text-prior control: the ViFT model without the image
    "vit_baseline": "vit",
}
FLAT_ROWS = ("majority_per_type",)  # need no training data: a horizontal reference line
# The controls of the ablation, reported as rows too where the evaluation has them (an imported
# data set without scene descriptions or without a baseline may lack some): fusion over another
# item's image and over a black one, and the model answering over its own caption.
CONTROL_ROWS = ("fused_wrong_image", "fused_blank_image", "describe_then_answer")
# Paired differences (same test items) of vift_fused against: the baseline, the text-prior control,
# and the two image controls (a gain they share is not perception).
PAIRED_WITH = ("vit_baseline", "question_only", "fused_wrong_image", "fused_blank_image")  # the main table: the first two
STAGE_REPORTS = ("train_caption", "train_text", "train_vit")
OUTPUT_NAMES = ("data_efficiency.json", "data_efficiency.csv", "data_efficiency.md", "data_efficiency.png")


def _read(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; the sweep point's pipeline did not reach the stage that writes it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); rerun the stage that writes it") from None


def _records(summary: dict, split: str, path: Path) -> int:
    try:
        return int(summary["mixture"][split]["records"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: summary.mixture.{split}.records missing; rerun the stage with this version of vift") from None


def collect_point(workspace: Path, fraction: float, seed: int | None = None) -> dict:
    """One sweep point from a workspace whose pipeline ran through ``evaluate`` (``seed``: the
    replicate's seed, None for the preset's own)."""
    workspace = Path(workspace)
    reports, perception = {}, {}
    for stage in STAGE_REPORTS:
        path = workspace / paths.REPORTS_DIR / f"{stage}.json"
        report = _read(path, f"{stage} report")
        reports[stage] = (report["summary"], path)
        perception[stage] = (report.get("caption_quality") or {}).get("phrase_f1")
        recorded = reports[stage][0].get("data_fraction", 1.0)
        if abs(recorded - fraction) > 1e-9:
            raise UserError(f"{path}: trained at data_fraction {recorded}, expected {fraction}; rerun the sweep point")
    metrics_path = workspace / paths.METRICS_JSON
    metrics = _read(metrics_path, "metrics")
    captions = max(_records(summary, "captions", path) for summary, path in reports.values())
    text_summary, text_path = reports["train_text"]
    vit_summary, vit_path = reports["train_vit"]
    samples = {
        "vift": captions + _records(text_summary, "text_instructions", text_path),
        "vit": captions + _records(vit_summary, "visual_instructions", vit_path),
    }
    missing = [row for row in (*PLOTTED_ROWS, *FLAT_ROWS) if row not in metrics.get("rows", {})]
    if missing:
        raise UserError(f"{metrics_path}: rows {missing} missing; rerun the evaluate stage")
    present = (*PLOTTED_ROWS, *FLAT_ROWS, *(row for row in CONTROL_ROWS if row in metrics["rows"]))
    rows = {row: {key: metrics["rows"][row][key] for key in ("accuracy", "ci95", "n")} for row in present}
    return {
        "fraction": fraction,
        "seed": seed,
        "workspace": str(workspace),
        "samples": samples,
        "captions": captions,
        "steps": {stage: reports[stage][0]["steps"] for stage in STAGE_REPORTS},
        # held-out caption phrase F1 after each stage: how much perception the point's training bought
        "caption_phrase_f1": perception,
        "rows": rows,
        "paired": {other: metrics.get("paired", {}).get(f"vift_fused_vs_{other}") for other in PAIRED_WITH},
        "calibration": calibration_summary(_read(workspace / paths.FUSION_JSON, "calibration result")),
    }


def calibration_summary(result: dict) -> dict:
    """What a point's calibration chose and how far to trust it: the gain over no fusion on the
    items it was chosen on, and on items it was not (k-fold; None where calibration had no folds)."""
    calibration = result.get("calibration", {})
    held_out = calibration.get("cross_validated")
    return {
        "chosen": configuration_label(result["fusion"]),
        "gain": calibration.get("accuracy", 0.0) - calibration.get("unfused_accuracy", 0.0),
        "held_out": None if not held_out else {key: held_out[key] for key in ("folds", "difference", "ci95", "mcnemar_p", "fused_folds")},
        "served": (result.get("serving") or {}).get("mode"),
    }


def summarize(points: list[dict], meta: dict) -> dict:
    points = sorted(points, key=lambda p: (p["fraction"], -1 if p.get("seed") is None else p["seed"]))
    if not points:
        raise UserError("the sweep has no points: give at least one fraction")
    summary = {"meta": meta, "points": points}
    if any(p.get("seed") is not None for p in points):
        summary["across_seeds"] = [across_seeds([p for p in points if p["fraction"] == f]) for f in _fractions(points)]
    return summary


def _fractions(points: list[dict]) -> list[float]:
    return sorted({p["fraction"] for p in points})


def mean_interval(values: list[float]) -> list[float]:
    """The 95 % Student-t interval of the mean of ``values`` (one value: the value itself)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return [mean, mean]
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return [mean - half, mean + half]


def across_seeds(points: list[dict]) -> dict:
    """One fraction's points (one per seed): each row's mean accuracy and across-seed interval, and
    per paired comparison the mean difference, its across-seed interval, and in how many seeds the
    seed's own paired interval lies above / below 0."""
    rows = {}
    controls = [row for row in CONTROL_ROWS if all(row in p["rows"] for p in points)]
    for row in (*PLOTTED_ROWS, *FLAT_ROWS, *controls):
        values = [p["rows"][row]["accuracy"] for p in points]
        low, high = mean_interval(values)
        rows[row] = {
            "accuracy": statistics.fmean(values),
            "ci95": [max(0.0, low), min(1.0, high)],
            "n": sum(p["rows"][row]["n"] for p in points),
            "per_seed": values,
        }
    paired = {}
    for other in PAIRED_WITH:
        comparisons = [p["paired"][other] for p in points if (p.get("paired") or {}).get(other)]
        if not comparisons:
            paired[other] = None
            continue
        differences = [c["difference"] for c in comparisons]
        above = sum(c["ci95"][0] > 0 for c in comparisons)
        below = sum(c["ci95"][1] < 0 for c in comparisons)
        holds = (
            "above 0 in every seed"
            if above == len(comparisons)
            else "below 0 in every seed"
            if below == len(comparisons)
            else "not in every seed"
        )
        paired[other] = {
            "difference": statistics.fmean(differences),
            "ci95": mean_interval(differences),
            "per_seed": differences,
            "seeds_above_zero": above,
            "seeds_below_zero": below,
            "seeds": len(comparisons),
            "holds": holds,
        }
    return {
        "fraction": points[0]["fraction"],
        "seeds": [p.get("seed") for p in points],
        "samples": points[0]["samples"],
        "caption_phrase_f1": {
            stage: None
            if any(p["caption_phrase_f1"].get(stage) is None for p in points)
            else statistics.fmean(p["caption_phrase_f1"][stage] for p in points)
            for stage in points[0].get("caption_phrase_f1", {})
        },  # fmt: skip
        "rows": rows,
        "paired": paired,
    }


def per_fraction(summary: dict) -> list[dict]:
    """One entry per fraction: the point itself, or with seeds the mean over them (:func:`across_seeds`)."""
    return summary.get("across_seeds") or summary["points"]


def table_csv(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["fraction", "row", "samples", "accuracy", "ci95_low", "ci95_high", "n", "seed"])
    for point in summary["points"]:
        for row, model in PLOTTED_ROWS.items():
            values = point["rows"][row]
            writer.writerow(
                [point["fraction"], row, point["samples"][model], f"{values['accuracy']:.6g}",
                 f"{values['ci95'][0]:.6g}", f"{values['ci95'][1]:.6g}", values["n"],
                 "" if point.get("seed") is None else point["seed"]]
            )  # fmt: skip
    return buffer.getvalue()


def _cell(values: dict) -> str:
    return f"{percent(values['accuracy'])} [{percent(values['ci95'][0])}, {percent(values['ci95'][1])}]"


def _difference(paired: dict | None) -> str:
    if not paired:
        return "n/a"
    text = f"{100 * paired['difference']:+.1f} [{100 * paired['ci95'][0]:+.1f}, {100 * paired['ci95'][1]:+.1f}]"
    if "seeds" in paired:  # across seeds: in how many seeds the seed's own paired interval excludes 0
        text += f" (> 0 in {paired['seeds_above_zero']}/{paired['seeds']}, < 0 in {paired['seeds_below_zero']}/{paired['seeds']})"
    return text


def table_markdown(summary: dict) -> str:
    meta = summary["meta"]
    seeded = "across_seeds" in summary
    lines = [
        f"# Data efficiency: {meta.get('preset', '?')}",
        "",
        "Accuracy (%) on the test split, 95 % interval in brackets. Samples: distinct training records "
        "(ViFT: captions + text-only instructions; baseline: captions + visual instructions). Optimizer "
        "steps are the same at every fraction.",
        "",
    ]
    if seeded:
        seeds = ", ".join(str(s) for s in meta.get("seeds") or [])
        lines += [
            f"Seeds {seeds}: the mean over seeds, with the across-seed 95 % interval (Student t); paired "
            "differences add in how many seeds the seed's own paired 95 % interval lies above / below 0. "
            "Each seed redraws the data (its test split too) and every training stage.",
            "",
        ]
    lines += [
        "| fraction | ViFT samples | vift_fused | vift_unfused | question_only | baseline samples | vit_baseline "
        "| fused - vit (paired 95 % CI) | fused - question_only (paired 95 % CI) | caption F1 (caption / text / vit) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in per_fraction(summary):
        cells = {row: _cell(v) for row, v in point["rows"].items()}
        differences = [_difference((point.get("paired") or {}).get(other)) for other in PAIRED_WITH[:2]]
        lines.append(
            f"| {point['fraction']:g} | {point['samples']['vift']} | {cells['vift_fused']} | {cells['vift_unfused']} | "
            f"{cells['question_only']} | {point['samples']['vit']} | {cells['vit_baseline']} | {' | '.join(differences)} | "
            + " / ".join("n/a" if f is None else f"{f:.2f}" for f in point.get("caption_phrase_f1", {}).values())
            + " |"
        )
    majority = per_fraction(summary)[-1]["rows"]["majority_per_type"]["accuracy"]
    lines += ["", f"majority_per_type (no training data): {percent(majority)} %.", ""]
    lines += _controls_table(per_fraction(summary), "## Controls" + (" (mean over seeds)" if seeded else ""), seeded=False)
    if seeded:
        lines += [
            "## Each seed",
            "",
            "| fraction | seed | vift_fused | vift_unfused | question_only | vit_baseline | majority_per_type "
            "| fused - vit (paired 95 % CI) | fused - question_only (paired 95 % CI) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for point in summary["points"]:
            cells = {row: _cell(v) for row, v in point["rows"].items()}
            differences = [_difference((point.get("paired") or {}).get(other)) for other in PAIRED_WITH[:2]]
            lines.append(
                f"| {point['fraction']:g} | {point.get('seed')} | {cells['vift_fused']} | {cells['vift_unfused']} | "
                f"{cells['question_only']} | {cells['vit_baseline']} | {cells['majority_per_type']} | {' | '.join(differences)} |"
            )
        lines.append("")
        lines += _controls_table(summary["points"], "## Controls, each seed", seeded=True)
    return "\n".join(lines + _calibration_table(summary["points"], seeded))


def _calibration_table(points: list[dict], seeded: bool) -> list[str]:
    """Each point's calibration: the choice, its gain over no fusion on the calibration items it
    was chosen on, the same choice rule's gain on held-out folds, and the mode served."""
    if not any(p.get("calibration") for p in points):
        return []
    head = ["fraction", *(["seed"] if seeded else []), "calibration chose", "gain over no fusion (chosen on these items)"]
    head += ["held-out gain (k-fold, paired 95 % CI)", "folds that chose a fusion", "served mode"]
    lines = ["## Calibration" + (", each seed" if seeded else ""), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point in points:
        calibration = point.get("calibration") or {}
        held_out = calibration.get("held_out")
        cells = [f"{point['fraction']:g}", *([str(point.get("seed"))] if seeded else []), calibration.get("chosen", "n/a")]
        cells.append(f"{100 * calibration['gain']:+.1f}" if "gain" in calibration else "n/a")
        cells.append(_difference(held_out) if held_out else "n/a")
        cells.append(f"{held_out['fused_folds']} / {held_out['folds']}" if held_out else "n/a")
        cells.append(calibration.get("served") or "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return ["", *lines, ""]


def _controls_table(points: list[dict], title: str, seeded: bool) -> list[str]:
    """Fusion against its image controls, and describe-then-answer, where the points have them."""
    rows = [row for row in CONTROL_ROWS if all(row in p["rows"] for p in points)]
    if not rows:
        return []
    head = ["fraction", *(["seed"] if seeded else []), "vift_fused", *rows]
    head += ["fused - wrong image (paired 95 % CI)", "fused - blank image (paired 95 % CI)"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point in points:
        cells = [f"{point['fraction']:g}", *([str(point.get("seed"))] if seeded else [])]
        cells += [_cell(point["rows"][row]) for row in ("vift_fused", *rows)]
        cells += [_difference((point.get("paired") or {}).get(other)) for other in ("fused_wrong_image", "fused_blank_image")]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    styles = {"vift_fused": "o-", "vift_unfused": "s--", "question_only": "^:", "vit_baseline": "D-"}
    points = per_fraction(summary)  # with seeds: their mean and across-seed interval
    for row, model in PLOTTED_ROWS.items():
        xs = [p["samples"][model] for p in points]
        ys = [p["rows"][row]["accuracy"] for p in points]
        low = [max(0.0, y - p["rows"][row]["ci95"][0]) for y, p in zip(ys, points)]
        high = [max(0.0, p["rows"][row]["ci95"][1] - y) for y, p in zip(ys, points)]
        axis.errorbar(xs, ys, yerr=[low, high], fmt=styles[row], capsize=3, label=row)
    for row in FLAT_ROWS:
        axis.axhline(points[-1]["rows"][row]["accuracy"], color="grey", linewidth=0.8, linestyle="-.", label=row)
    axis.set_xscale("log", base=2)
    ticks = sorted({p["samples"][model] for p in summary["points"] for model in set(PLOTTED_ROWS.values())})
    axis.set_xticks(ticks, [f"{t:,}" for t in ticks])
    axis.minorticks_off()
    axis.set_xlabel("distinct training samples (captions + instructions)")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1)
    seeds = summary["meta"].get("seeds")
    suffix = f", mean of seeds {', '.join(map(str, seeds))}" if seeds else ""
    axis.set_title(f"Data efficiency ({summary['meta'].get('preset', '?')}), equal optimizer steps{suffix}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_outputs(summary: dict, out_dir: Path) -> Path:
    """Write the four outputs into ``out_dir``; it appears complete or not at all."""
    with atomic_directory(out_dir) as tmp:
        (tmp / "data_efficiency.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (tmp / "data_efficiency.csv").write_text(table_csv(summary))
        (tmp / "data_efficiency.md").write_text(table_markdown(summary))
        plot(summary, tmp / "data_efficiency.png")
    return Path(out_dir)
