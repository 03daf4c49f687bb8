"""The data-efficiency sweep's summary: what it reads from finished points and what it writes.

The sweep itself runs end to end (real stages, Prefect deployment) in tests/test_flows_e2e.py;
these tests pin the arithmetic and the error paths on reports written here by hand.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from flows import efficiency
from vift.errors import UserError

ROWS = ("vift_fused", "vift_unfused", "question_only", "vit_baseline", "majority_per_type")


def write_point(workspace: Path, fraction: float, captions: int, instructions: int, accuracy: dict[str, float]) -> Path:
    reports = workspace / "reports"
    reports.mkdir(parents=True)
    mixes = {
        "train_caption": {"captions": captions},
        "train_text": {"captions": captions, "text_instructions": instructions},
        "train_vit": {"captions": captions, "visual_instructions": instructions},
    }
    for stage, mixture in mixes.items():
        summary = {"steps": 6, "data_fraction": fraction, "mixture": {split: {"records": n} for split, n in mixture.items()}}
        quality = {"phrase_f1": 0.125 if stage == "train_caption" else 0.25}
        (reports / f"{stage}.json").write_text(json.dumps({"summary": summary, "caption_quality": quality, "history": []}))
    rows = {row: {"accuracy": accuracy[row], "ci95": [accuracy[row] - 0.05, accuracy[row] + 0.05], "n": 100, "by_type": {}} for row in ROWS}
    paired = {
        f"vift_fused_vs_{other}": {"difference": accuracy["vift_fused"] - accuracy[other], "ci95": [-0.1, 0.1]}
        for other in ("vit_baseline", "question_only")
    }
    (reports / "metrics.json").write_text(json.dumps({"rows": rows, "paired": paired}))
    return workspace


def accuracies(fused: float, vit: float) -> dict[str, float]:
    return {"vift_fused": fused, "vift_unfused": 0.15, "question_only": 0.4, "vit_baseline": vit, "majority_per_type": 0.42}


def test_a_point_counts_distinct_captions_once_plus_each_model_s_instructions(tmp_path):
    point = efficiency.collect_point(write_point(tmp_path / "p", 0.5, 60, 50, accuracies(0.4, 0.5)), 0.5)
    assert point["samples"] == {"vift": 110, "vit": 110}
    assert point["rows"]["vit_baseline"]["accuracy"] == 0.5
    assert point["steps"] == {"train_caption": 6, "train_text": 6, "train_vit": 6}


def test_outputs_hold_one_line_per_fraction_and_row_sorted_by_fraction(tmp_path):
    points = [
        efficiency.collect_point(write_point(tmp_path / "full", 1.0, 120, 120, accuracies(0.45, 0.55)), 1.0),
        efficiency.collect_point(write_point(tmp_path / "half", 0.5, 60, 60, accuracies(0.40, 0.48)), 0.5),
    ]
    summary = efficiency.summarize(points, {"preset": "ci", "fractions": [0.5, 1.0], "overrides": {}})
    out = efficiency.write_outputs(summary, tmp_path / "sweep")
    assert sorted(p.name for p in out.iterdir()) == sorted(efficiency.OUTPUT_NAMES)
    lines = list(csv.DictReader((out / "data_efficiency.csv").open()))
    assert len(lines) == 2 * len(efficiency.PLOTTED_ROWS)
    assert [line["fraction"] for line in lines[:: len(efficiency.PLOTTED_ROWS)]] == ["0.5", "1.0"]
    vit = [line for line in lines if line["row"] == "vit_baseline"]
    assert [(int(line["samples"]), float(line["accuracy"])) for line in vit] == [(120, 0.48), (240, 0.55)]
    table = (out / "data_efficiency.md").read_text()
    assert "| 0.5 | 120 | 40.0 [35.0, 45.0]" in table and "| -8.0 [-10.0, +10.0] | +0.0 [-10.0, +10.0] | 0.12 / 0.25 / 0.25 |" in table
    assert (out / "data_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_point_trained_at_another_fraction_is_an_error_naming_the_report(tmp_path):
    workspace = write_point(tmp_path / "p", 0.25, 30, 30, accuracies(0.4, 0.5))
    with pytest.raises(UserError, match=r"train_caption\.json: trained at data_fraction 0\.25, expected 0\.5"):
        efficiency.collect_point(workspace, 0.5)


def test_a_point_without_metrics_is_an_error_and_nothing_is_written(tmp_path):
    workspace = write_point(tmp_path / "p", 1.0, 30, 30, accuracies(0.4, 0.5))
    (workspace / "reports" / "metrics.json").unlink()
    with pytest.raises(UserError, match=r"metrics\.json: metrics not found"):
        efficiency.collect_point(workspace, 1.0)
    (workspace / "reports" / "metrics.json").write_text('{"rows": {\n  "vift_fused": ')
    with pytest.raises(UserError, match=r"metrics\.json:2: not valid JSON"):
        efficiency.collect_point(workspace, 1.0)


def test_failed_writing_leaves_no_output_directory(tmp_path, monkeypatch):
    point = efficiency.collect_point(write_point(tmp_path / "p", 1.0, 30, 30, accuracies(0.4, 0.5)), 1.0)
    summary = efficiency.summarize([point], {"preset": "ci", "fractions": [1.0], "overrides": {}})

    def broken_plot(summary, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(efficiency, "plot", broken_plot)
    with pytest.raises(RuntimeError):
        efficiency.write_outputs(summary, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists() and not list(tmp_path.glob(".sweep*"))
