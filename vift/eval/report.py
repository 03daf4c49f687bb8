"""reports/ablation.md: the table a researcher reads first."""

from __future__ import annotations

# Accuracy (%) reported by the reference repository (see the team's PAPER.md), for context only:
# those are 7-8B models on real math benchmarks, not comparable with ShapeTally numbers.
PAPER_RESULTS = {
    "columns": ["MathVista MVQA", "MathVista GVQA", "MathVista ALL", "MathVerse V-mini", "MathVerse ALL", "MathVision ALL", "avg"],
    "rows": {
        "LLaVA-1.5-7B": [21.4, 30.5, 25.6, 11.8, 12.1, 8.5, 15.4],
        "LLaVA-Next-8B": [32.0, 51.5, 41.0, 12.5, 13.9, 14.1, 23.0],
        "Qwen2-VL-7B": [54.3, 64.3, 58.9, 27.1, 30.5, 17.7, 35.6],
        "LLaVA-OneVision-7B": [58.0, 58.7, 58.3, 26.2, 31.0, 18.1, 35.8],
        "ViFT-7B": [49.8, 48.4, 49.2, 28.6, 34.8, 24.0, 36.0],
        "ViFT-A-7B": [56.7, 53.9, 55.4, 28.8, 35.4, 20.5, 37.1],
    },
}


def headline(metrics: dict, served_row: str | None) -> dict:
    """reports/headline.json, the DVC metric: the few numbers a person compares across experiments,
    narrow enough for `dvc metrics show` and `dvc exp show` in a 120-column terminal. The full
    statistics (every row, interval, paired comparison) stay in reports/metrics.json."""
    rows = metrics["rows"]
    out: dict = {}
    if served_row in rows:
        accuracy, (low, high) = rows[served_row]["accuracy"], rows[served_row]["ci95"]
        out["served"] = {"acc": round(accuracy, 4), "lo": round(low, 4), "hi": round(high, 4)}
    out["fused"] = round(rows["vift_fused"]["accuracy"], 4)
    if "question_only" in rows:
        out["q_only"] = round(rows["question_only"]["accuracy"], 4)
    if "vit_baseline" in rows:
        out["vit"] = round(rows["vit_baseline"]["accuracy"], 4)
    out["fusion_wins"] = bool(metrics["verdict"]["fusion_beats_controls"])
    if "vift" in (metrics.get("perception") or {}):
        out["perceive"] = round(metrics["perception"]["vift"]["accuracy"], 4)
    return out


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def configuration_label(row: dict) -> str:
    """One search row as a short readable label, the calibration plot's category axis."""
    if row["a"] == 0 and row["b"] == 0 and row["mode"] == "additive":
        return "no fusion"
    weights = {
        "additive": f"a={row['a']:g} b={row['b']:g}",
        "replace": f"w_vis={row['w_vis']:g} w_text={row['w_text']:g}",
        "task_vector": f"a={row['a']:g}",
    }[row["mode"]]
    variants = (" norm-preserving" if row.get("preserve_norm") else "") + (" +prefix" if row.get("steer_prefix") else "")
    return f"{row['mode']} {weights} L{row['layer_start']}-{row['layer_end']} {row['positions']}{variants}"


def ablation_markdown(metrics: dict, fusion: dict, title: str) -> str:
    rows = metrics["rows"]
    types = sorted({t for row in rows.values() for t in row["by_type"]})
    lines = [f"# {title}", ""]
    lines += [
        f"Fusion (calibrated): `{fusion['mode']}`, positions `{fusion['positions']}`, layers "
        f"[{fusion['layer_start']}, {fusion['layer_end']}), a={fusion['a']:g} b={fusion['b']:g} "
        f"w_vis={fusion['w_vis']:g} w_text={fusion['w_text']:g}.",
        "",
        "| row | accuracy % | 95 % CI | n | " + " | ".join(types) + " |",
        "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in types) + " |",
    ]
    for name, row in rows.items():
        by_type = " | ".join(percent(row["by_type"][t]["accuracy"]) if t in row["by_type"] else "" for t in types)
        lines.append(
            f"| {name} | {percent(row['accuracy'])} | {percent(row['ci95'][0])}–{percent(row['ci95'][1])} | {row['n']} | {by_type} |"
        )
    lines += [
        "",
        "## Paired comparisons (same items)",
        "",
        "| comparison | difference (pp) | paired bootstrap 95 % CI | only fused right | only other right | McNemar p |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, pair in metrics["paired"].items():
        lines.append(
            f"| {name} | {100 * pair['difference']:+.1f} | {100 * pair['ci95'][0]:+.1f} to {100 * pair['ci95'][1]:+.1f} | "
            f"{pair['only_first_correct']} | {pair['only_second_correct']} | {pair['mcnemar_p']:.3g} |"
        )
    if "perception" in metrics:
        lines += ["", "## Perception: captions that state the reference content", "",
                  "| model | exact content % | 95 % CI | n | phrase F1 |", "| --- | ---: | --- | ---: | ---: |"]  # fmt: skip
        for name, row in metrics["perception"].items():
            lines.append(
                f"| {name} | {percent(row['accuracy'])} | {percent(row['ci95'][0])}–{percent(row['ci95'][1])} | {row['n']} | "
                f"{row['phrase_f1']:.3f} |"
            )
    if "restated" in metrics:
        lines += ["", "## Reasoning chains: answers that restate exactly the question's objects", "",
                  "| row | restated exactly % | 95 % CI | n | answers with a chain % |", "| --- | ---: | --- | ---: | ---: |"]  # fmt: skip
        for name, row in metrics["restated"]["rows"].items():
            lines.append(
                f"| {name} | {percent(row['accuracy'])} | {percent(row['ci95'][0])}–{percent(row['ci95'][1])} | {row['n']} | "
                f"{percent(row['chains'])} |"
            )
        for name, pair in metrics["restated"]["paired"].items():
            lines.append(
                f"\n{name}: {100 * pair['difference']:+.1f} pp [{100 * pair['ci95'][0]:+.1f}, {100 * pair['ci95'][1]:+.1f}], "
                f"McNemar p {pair['mcnemar_p']:.3g}."
            )
    verdict = metrics["verdict"]
    lines += ["", f"**Verdict:** fusion {'beats' if verdict['fusion_beats_controls'] else 'does NOT beat'} all controls ({verdict['rule']}): "
              + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in verdict["beats"].items()) + "."]  # fmt: skip
    lines += ["", "## For context: the paper's numbers (not comparable: 7-8B models, real math benchmarks)", ""]
    lines.append("| model | " + " | ".join(PAPER_RESULTS["columns"]) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in PAPER_RESULTS["columns"]) + " |")
    for model, values in PAPER_RESULTS["rows"].items():
        lines.append(f"| {model} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines) + "\n"
