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
CONTROLS = ("fused_wrong_image", "fused_blank_image", "describe_then_answer")


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
    present = [row for row in (*ROWS, *CONTROLS) if row in accuracy]
    rows = {
        row: {"accuracy": accuracy[row], "ci95": [accuracy[row] - 0.05, accuracy[row] + 0.05], "n": 100, "by_type": {}} for row in present
    }
    paired = {
        f"vift_fused_vs_{other}": {"difference": accuracy["vift_fused"] - accuracy[other], "ci95": [-0.1, 0.1]}
        for other in ("vit_baseline", "question_only", "fused_wrong_image", "fused_blank_image")
        if other in accuracy
    }
    (reports / "metrics.json").write_text(json.dumps({"rows": rows, "paired": paired}))
    (workspace / "models").mkdir()
    (workspace / "models" / "fusion.json").write_text(json.dumps(FUSION))
    return workspace


NO_FUSION = {"mode": "additive", "positions": "question", "a": 0.0, "b": 0.0, "w_vis": 1.0, "w_text": 0.0, "layer_start": 0, "layer_end": 4}
FUSION = {  # what the calibrate stage writes (the parts the sweep reads)
    "fusion": {**NO_FUSION, "a": 1.0, "b": 0.5, "layer_start": 2, "preserve_norm": True},
    "calibration": {
        "accuracy": 0.3,
        "unfused_accuracy": 0.05,
        "cross_validated": {
            "folds": 5,
            "difference": 0.125,
            "ci95": [0.0625, 0.1875],
            "mcnemar_p": 0.001,
            "fused_folds": 4,
            "same_choice_folds": 3,
        },
    },
    "serving": {"mode": "describe_then_answer"},
}


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


def seeded_point(tmp_path: Path, seed: int, fused: float, question_only: float, paired_ci: tuple[float, float]) -> dict:
    acc = {**accuracies(fused, 0.5), "question_only": question_only}
    workspace = write_point(tmp_path / f"seed{seed}", 1.0, 120, 120, acc)
    metrics = json.loads((workspace / "reports" / "metrics.json").read_text())
    metrics["paired"]["vift_fused_vs_question_only"]["ci95"] = list(paired_ci)
    (workspace / "reports" / "metrics.json").write_text(json.dumps(metrics))
    return efficiency.collect_point(workspace, 1.0, seed)


def test_seeds_give_the_mean_the_across_seed_t_interval_and_how_many_seeds_agree(tmp_path):
    from scipy import stats

    points = [
        seeded_point(tmp_path, 2, 0.46, 0.44, (0.01, 0.03)),
        seeded_point(tmp_path, 0, 0.40, 0.44, (-0.06, -0.02)),
        seeded_point(tmp_path, 1, 0.43, 0.44, (-0.03, 0.01)),
    ]
    summary = efficiency.summarize(points, {"preset": "ci", "fractions": [1.0], "seeds": [0, 1, 2], "overrides": {}})
    assert [p["seed"] for p in summary["points"]] == [0, 1, 2]
    (fraction,) = summary["across_seeds"]
    fused = fraction["rows"]["vift_fused"]
    assert fused["accuracy"] == pytest.approx(0.43) and fused["per_seed"] == [0.40, 0.43, 0.46] and fused["n"] == 300
    low, high = stats.t.interval(0.95, 2, loc=0.43, scale=stats.sem([0.40, 0.43, 0.46]))
    assert fused["ci95"] == pytest.approx([low, high])
    paired = fraction["paired"]["question_only"]
    assert paired["per_seed"] == pytest.approx([-0.04, -0.01, 0.02]) and paired["difference"] == pytest.approx(-0.01)
    assert (paired["seeds_above_zero"], paired["seeds_below_zero"], paired["holds"]) == (1, 1, "not in every seed")
    assert fraction["paired"]["vit_baseline"]["holds"] == "not in every seed"  # every seed's interval is [-0.1, 0.1]
    out = efficiency.write_outputs(summary, tmp_path / "sweep")
    table = (out / "data_efficiency.md").read_text()
    assert "Seeds 0, 1, 2" in table and "## Each seed" in table and "(> 0 in 1/3, < 0 in 1/3)" in table
    assert f"43.0 [{100 * low:.1f}, {100 * high:.1f}]" in table
    lines = list(csv.DictReader((out / "data_efficiency.csv").open()))
    assert [line["seed"] for line in lines[:: len(efficiency.PLOTTED_ROWS)]] == ["0", "1", "2"]


def test_a_comparison_that_holds_in_every_seed_says_so(tmp_path):
    points = [seeded_point(tmp_path, s, 0.5, 0.4, (0.02, 0.18)) for s in (0, 1)]
    (fraction,) = efficiency.summarize(points, {"preset": "ci", "fractions": [1.0], "seeds": [0, 1]})["across_seeds"]
    assert fraction["paired"]["question_only"]["holds"] == "above 0 in every seed"
    assert fraction["rows"]["vift_fused"]["ci95"] == pytest.approx([0.5, 0.5])  # no spread: a zero-width interval


def test_without_seeds_the_summary_has_no_across_seed_part(tmp_path):
    point = efficiency.collect_point(write_point(tmp_path / "p", 1.0, 30, 30, accuracies(0.4, 0.5)), 1.0)
    summary = efficiency.summarize([point], {"preset": "ci", "fractions": [1.0], "overrides": {}})
    assert "across_seeds" not in summary and efficiency.per_fraction(summary) == summary["points"]
    assert "Each seed" not in efficiency.table_markdown(summary)


def test_the_image_controls_and_describe_then_answer_are_rows_of_the_sweep_with_their_paired_differences(tmp_path):
    points = []
    for seed, (wrong, blank) in enumerate([(0.40, 0.46), (0.44, 0.42), (0.41, 0.44)]):
        acc = {**accuracies(0.41 + seed / 100, 0.5), "fused_wrong_image": wrong, "fused_blank_image": blank, "describe_then_answer": 0.57}
        points.append(efficiency.collect_point(write_point(tmp_path / f"s{seed}", 1.0, 120, 120, acc), 1.0, seed))
    summary = efficiency.summarize(points, {"preset": "ci", "fractions": [1.0], "seeds": [0, 1, 2]})
    (fraction,) = summary["across_seeds"]
    assert fraction["rows"]["fused_wrong_image"]["per_seed"] == [0.40, 0.44, 0.41]
    assert fraction["rows"]["describe_then_answer"]["accuracy"] == pytest.approx(0.57)
    blank = fraction["paired"]["fused_blank_image"]
    assert blank["per_seed"] == pytest.approx([-0.05, 0.0, -0.01]) and blank["seeds"] == 3
    table = efficiency.table_markdown(summary)
    assert "## Controls (mean over seeds)" in table and "## Controls, each seed" in table
    assert (
        "| 1 | 2 | 43.0 [38.0, 48.0] | 41.0 [36.0, 46.0] | 44.0 [39.0, 49.0] | 57.0 [52.0, 62.0] | +2.0 [-10.0, +10.0] | -1.0 [-10.0, +10.0] |"
        in table
    )


def test_points_without_the_controls_still_summarise_without_their_table(tmp_path):
    point = efficiency.collect_point(write_point(tmp_path / "p", 1.0, 30, 30, accuracies(0.4, 0.5)), 1.0)
    summary = efficiency.summarize([point], {"preset": "ci", "fractions": [1.0]})
    assert set(point["rows"]) == set(ROWS) and point["paired"]["fused_blank_image"] is None
    assert "## Controls" not in efficiency.table_markdown(summary)


def test_each_points_calibration_is_reported_with_its_gain_chosen_and_held_out(tmp_path):
    first = write_point(tmp_path / "s0", 1.0, 30, 30, accuracies(0.4, 0.5))
    second = write_point(tmp_path / "s1", 1.0, 30, 30, accuracies(0.4, 0.5))
    (second / "models" / "fusion.json").write_text(  # calibration without folds, kept no fusion, serves fused
        json.dumps({"fusion": NO_FUSION, "calibration": {"accuracy": 0.05, "unfused_accuracy": 0.05}, "serving": {"mode": "fused"}})
    )
    points = [efficiency.collect_point(first, 1.0, 0), efficiency.collect_point(second, 1.0, 1)]
    assert points[0]["calibration"] == {
        "chosen": "additive a=1 b=0.5 L2-4 question norm-preserving",
        "gain": pytest.approx(0.25),
        "held_out": {"folds": 5, "difference": 0.125, "ci95": [0.0625, 0.1875], "mcnemar_p": 0.001, "fused_folds": 4},
        "served": "describe_then_answer",
    }
    table = efficiency.table_markdown(efficiency.summarize(points, {"preset": "ci", "fractions": [1.0], "seeds": [0, 1]}))
    assert "## Calibration, each seed" in table
    assert (
        "| 1 | 0 | additive a=1 b=0.5 L2-4 question norm-preserving | +25.0 | +12.5 [+6.2, +18.8] | 4 / 5 | describe_then_answer |" in table
    )
    assert "| 1 | 1 | no fusion | +0.0 | n/a | n/a | fused |" in table


def test_a_point_without_its_calibration_result_is_refused_by_file(tmp_path):
    workspace = write_point(tmp_path / "p", 1.0, 30, 30, accuracies(0.4, 0.5))
    (workspace / "models" / "fusion.json").unlink()
    with pytest.raises(UserError, match=r"models/fusion.json: calibration result not found"):
        efficiency.collect_point(workspace, 1.0)
