"""Plots written by the stages (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(figure, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(figure)
    tmp.replace(path)


def calibration_heatmap(search: dict, path: Path) -> None:
    """Accuracy over the two weights of each mode, at the chosen positions and layer range."""
    chosen = search["fusion"]
    modes = sorted({row["mode"] for row in search["search"]})
    figure, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        first, second = ("w_vis", "w_text") if mode == "replace" else ("a", "b")  # task_vector: b is 0
        rows = [
            r for r in search["search"]
            if r["mode"] == mode and r["positions"] == chosen["positions"]
            and (r["layer_start"], r["layer_end"]) == (chosen["layer_start"], chosen["layer_end"])
        ]  # fmt: skip
        xs = sorted({r[first] for r in rows})
        ys = sorted({r[second] for r in rows})
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in rows:
            grid[ys.index(r[second]), xs.index(r[first])] = r["accuracy"]
        image = axis.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
        axis.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], rotation=45)
        axis.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        axis.set_xlabel(first)
        axis.set_ylabel(second)
        axis.set_title(f"{mode}, layers [{chosen['layer_start']}, {chosen['layer_end']}), {chosen['positions']}")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=7)
        figure.colorbar(image, ax=axis, label="calibration accuracy")
    _save(figure, path)


def accuracy_bars(rows: dict, path: Path) -> None:
    """Accuracy per ablation row with 95 % intervals."""
    names = list(rows)
    accuracy = np.array([rows[n]["accuracy"] for n in names])
    # Clipped at 0: an interval given by another tool may round past its own estimate.
    low = np.maximum(0.0, accuracy - np.array([rows[n]["ci95"][0] for n in names]))
    high = np.maximum(0.0, np.array([rows[n]["ci95"][1] for n in names]) - accuracy)
    figure, axis = plt.subplots(figsize=(1.0 + 0.8 * len(names), 4))
    axis.bar(range(len(names)), accuracy, yerr=[low, high], capsize=4, color="tab:blue")
    axis.set_xticks(range(len(names)), names, rotation=35, ha="right")
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy (95 % CI)")
    _save(figure, path)


def accuracy_by_type(rows: dict, path: Path) -> None:
    names = list(rows)
    types = sorted({t for n in names for t in rows[n]["by_type"]})
    width = 0.8 / max(1, len(names))
    figure, axis = plt.subplots(figsize=(2.0 + 1.6 * len(types), 4))
    for i, name in enumerate(names):
        values = [rows[name]["by_type"].get(t, {}).get("accuracy", 0.0) for t in types]
        axis.bar(np.arange(len(types)) + i * width, values, width, label=name)
    axis.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.legend(fontsize=7, ncol=2)
    _save(figure, path)
