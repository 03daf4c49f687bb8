"""What a training stage leaves for people and tools: per-step metrics, loss curves, a summary.

- ``reports/<stage>.json``: ``summary`` (steps, samples, tokens, final loss, mixture, ...) and
  ``history`` (one entry per logged step), for the MLflow registry code and for ``dvc metrics``.
  It holds no timings, so the same inputs give the same file (a DVC output);
- ``reports/<stage>_run.json``: how this run went (seconds, samples/s, tokens/s overall and per
  logged step, the step it resumed from); not a DVC output;
- ``reports/plots/<stage>_loss.csv`` (columns ``step,loss``): DVC plots data;
- ``reports/plots/<stage>_loss.png``: the same curve, for a person.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from vift import paths
from vift.io import atomic_write_json, atomic_write_text

# Not "epoch": the Trainer sees the whole schedule as one epoch (see GroupedBatchSampler).
HISTORY_KEYS = ("step", "loss", "grad_norm", "learning_rate", "num_input_tokens_seen")


def report_path(stage: str) -> Path:
    return paths.REPORTS_DIR / f"{stage}.json"


def run_report_path(stage: str) -> Path:
    return paths.REPORTS_DIR / f"{stage}_run.json"


def loss_csv_path(stage: str) -> Path:
    return paths.PLOTS_DIR / f"{stage}_loss.csv"


def loss_png_path(stage: str) -> Path:
    return paths.PLOTS_DIR / f"{stage}_loss.png"


def step_history(log_history: list[dict]) -> list[dict]:
    """The Trainer's log entries for training steps (those with a loss), restricted to known keys."""
    return [{k: entry[k] for k in HISTORY_KEYS if k in entry} for entry in log_history if "loss" in entry]


def write_loss_csv(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss"])
    for entry in history:
        writer.writerow([entry["step"], f"{entry['loss']:.6g}"])
    atomic_write_text(path, buffer.getvalue())


def write_loss_png(path: Path, history: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([e["step"] for e in history], [e["loss"] for e in history], marker=".", linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (assistant tokens)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    plt.close(figure)
    tmp.replace(path)


def write_stage_report(stage: str, summary: dict, log_history: list[dict], extra: dict, run: dict) -> None:
    """Write the JSON reports and both loss plots of ``stage``; ``run`` holds this run's timings."""
    history = step_history(log_history)
    atomic_write_json(report_path(stage), {"stage": stage, "summary": summary, **extra, "history": history})
    throughput = [{"step": e["step"], "tokens_per_second": e["tokens_per_second"]} for e in log_history if "tokens_per_second" in e]
    atomic_write_json(run_report_path(stage), {"stage": stage, **run, "history": throughput})
    write_loss_csv(loss_csv_path(stage), history)
    write_loss_png(loss_png_path(stage), history, f"{stage}: training loss")
