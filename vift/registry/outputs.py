"""What a stage logs to MLflow: parameters, lineage tags and the outputs the stage left on disk.

- Parameters: :func:`flat_params` (dotted keys, JSON values) and :func:`params_hash` (which
  decides whether a recorded run still describes this configuration).
- Lineage: :func:`lineage_tags` (preset, params hash, git commit, ``dvc.lock`` hashes).
- Stage outputs: :func:`collect_stage_outputs` reads what a stage wrote (``reports/<stage>.json``
  with its per-step history, fusion, ablation rows, plots, predictions, registration) into a
  :class:`StageOutputs`; :func:`fingerprint` tells whether it changed since it was logged;
  :func:`log_outputs`, :func:`log_params` and :func:`set_tags` write in MLflow's batch sizes.

Paths come from :mod:`vift.paths`; nothing here talks to the server except through a client.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vift import paths
from vift.registry.server import short, warn

REGISTER_STAGE = "register"

_PLOT_SUFFIXES = {".png", ".svg", ".pdf", ".csv", ".html"}
_FUSION_PLOT_WORDS = ("heatmap", "fusion", "calibrat")
_UNSAFE_NAME = re.compile(r"[^/\w.\- ]")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys; lists and scalars are leaves."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def flat_params(params) -> dict[str, str]:
    """The parameters as MLflow params: dotted keys, JSON-encoded non-string values."""
    flat = flatten(params.model_dump(mode="json"))
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flat.items()}


def params_hash(params) -> str:
    payload = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def metric_name(*parts: str) -> str:
    return _UNSAFE_NAME.sub("_", "/".join(str(p) for p in parts if p != ""))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def numeric_leaves(value: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of nested dicts, keyed by slash-joined path (lists are skipped)."""
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(numeric_leaves(item, f"{prefix}/{key}" if prefix else str(key)))
    elif _is_number(value):
        out[_UNSAFE_NAME.sub("_", prefix)] = float(value)
    elif isinstance(value, bool):
        out[_UNSAFE_NAME.sub("_", prefix)] = float(value)
    return out


def git_info(workspace: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(workspace), *args], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"vift.git_commit": commit, "vift.git_dirty": str(bool(dirty)).lower()}


def dvc_lock_hashes(workspace: Path) -> dict[str, str]:
    """``{out path: md5}`` of the data and model outs recorded in ``dvc.lock`` (empty if none)."""
    lock = workspace / paths.DVC_LOCK
    if not lock.is_file():
        return {}
    import yaml

    try:
        content = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        warn(f"{lock}: not readable as YAML ({short(error)}); lineage tags skipped")
        return {}
    hashes: dict[str, str] = {}
    stages = content.get("stages", {}) if isinstance(content, Mapping) else {}
    for stage in stages.values() if isinstance(stages, Mapping) else []:
        for out in (stage or {}).get("outs", []) or []:
            if not isinstance(out, Mapping) or "path" not in out:
                continue
            path = str(out["path"])
            if not path.startswith(("data", "models")):
                continue
            digest = out.get("md5") or out.get("etag") or out.get("checksum")
            if digest:
                hashes[path] = str(digest)
    return hashes


def lineage_tags(params, workspace: Path) -> dict[str, str]:
    tags = {"vift.preset": params.preset, "vift.params_hash": params_hash(params)}
    tags.update(git_info(workspace))
    for path, digest in dvc_lock_hashes(workspace).items():
        tags[metric_name("dvc", path).replace("dvc/", "dvc.", 1)] = digest
    return tags


@dataclass
class StageOutputs:
    """What one stage produced: metrics (name -> value), per-step series, artifacts, tags."""

    metrics: dict[str, float] = field(default_factory=dict)
    series: list[tuple[str, float, int]] = field(default_factory=list)  # (name, value, step)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)  # (local path, artifact dir)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.metrics or self.series or self.artifacts or self.tags)

    def files(self) -> list[Path]:
        out: list[Path] = []
        for path, _ in self.artifacts:
            out.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        warn(f"{path}: not readable as JSON ({short(error)}); not logged")
        return None


def _stage_report(stage: str, workspace: Path, outputs: StageOutputs) -> None:
    """``reports/<stage>.json``: numeric summary values, and the per-step ``history`` if any."""
    report = workspace / paths.REPORTS_DIR / f"{stage}.json"
    if not report.is_file():
        return
    content = _read_json(report)
    if content is None:
        return
    outputs.artifacts.append((report, "reports"))
    if not isinstance(content, Mapping):
        return
    history = content.get("history")
    summary = {k: v for k, v in content.items() if k != "history"}
    for name, value in numeric_leaves(summary).items():
        outputs.metrics[metric_name(stage, name)] = value
    for key, value in summary.items():  # a plain list of numbers (e.g. base's pretrain_loss): step = index
        if isinstance(value, list) and value and all(_is_number(v) for v in value):
            outputs.series.extend((metric_name(stage, key), float(v), i) for i, v in enumerate(value))
    for plot in _plots(workspace):
        if plot.name.startswith(f"{stage}_"):
            outputs.artifacts.append((plot, "plots"))
    if isinstance(history, list):
        for index, entry in enumerate(history):
            if not isinstance(entry, Mapping):
                continue
            step = entry.get("step", index)
            step = int(step) if _is_number(step) else index
            for key, value in entry.items():
                if key != "step" and (_is_number(value) or isinstance(value, bool)):
                    outputs.series.append((metric_name(stage, key), float(value), step))


def _plots(workspace: Path, words: Iterable[str] | None = None) -> list[Path]:
    folder = workspace / paths.PLOTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in _PLOT_SUFFIXES]
    if words is not None:
        found = [p for p in found if any(w in p.name.lower() for w in words)]
    return found


def _calibrate(workspace: Path, outputs: StageOutputs) -> None:
    fusion_file = workspace / paths.FUSION_JSON
    if fusion_file.is_file():
        outputs.artifacts.append((fusion_file, "fusion"))
        content = _read_json(fusion_file)
        spec = content.get("fusion") if isinstance(content, Mapping) else None
        if isinstance(spec, Mapping):
            for key, value in spec.items():
                if key == "task_vector":  # a vector per layer: in the fusion.json artifact, too long for a tag
                    continue
                if _is_number(value):
                    outputs.metrics[metric_name("fusion", key)] = float(value)
                elif value is not None:
                    outputs.tags[f"fusion.{key}"] = str(value)
            if isinstance(content.get("calibration"), Mapping):
                for name, value in numeric_leaves(content["calibration"]).items():
                    outputs.metrics[metric_name("calibration", name)] = value
    for plot in _plots(workspace, _FUSION_PLOT_WORDS):
        outputs.artifacts.append((plot, "fusion"))


def ablation_metrics(content: Any) -> dict[str, float]:
    """``eval/<row>/accuracy``, ``.../ci95_low``, ``.../ci95_high``, ``.../n``, ``.../by_type/...``."""
    metrics: dict[str, float] = {}
    rows = content.get("rows") if isinstance(content, Mapping) else None
    if not isinstance(rows, Mapping):
        return metrics
    for row, values in rows.items():
        if not isinstance(values, Mapping):
            continue
        ci = values.get("ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(v) for v in ci):
            metrics[metric_name("eval", row, "ci95_low")] = float(ci[0])
            metrics[metric_name("eval", row, "ci95_high")] = float(ci[1])
        for name, value in numeric_leaves({k: v for k, v in values.items() if k != "ci95"}).items():
            metrics[metric_name("eval", row, name)] = value
    return metrics


def _evaluate(workspace: Path, outputs: StageOutputs) -> None:
    metrics_file = workspace / paths.METRICS_JSON
    if metrics_file.is_file():
        outputs.artifacts.append((metrics_file, "reports"))
        content = _read_json(metrics_file)
        outputs.metrics.update(ablation_metrics(content))
    if (workspace / paths.ABLATION_MD).is_file():
        outputs.artifacts.append((workspace / paths.ABLATION_MD, "reports"))
    fusion_plots = set(_plots(workspace, _FUSION_PLOT_WORDS))  # logged by calibrate, under fusion/
    other_stages = tuple(f"{s}_" for s in paths.STAGES if s != "evaluate")  # e.g. train_text_loss.png
    for plot in _plots(workspace):
        if plot not in fusion_plots and not plot.name.startswith(other_stages):
            outputs.artifacts.append((plot, "plots"))
    if (workspace / paths.PREDICTIONS_DIR).is_dir():
        outputs.artifacts.append((workspace / paths.PREDICTIONS_DIR, "predictions"))


def collect_stage_outputs(stage: str, workspace: Path) -> StageOutputs:
    """What ``stage`` produced in ``workspace``, as things to log. Unknown stages: their report only."""
    outputs = StageOutputs()
    if stage == REGISTER_STAGE:
        if (workspace / paths.REGISTRATION_JSON).is_file():
            outputs.artifacts.append((workspace / paths.REGISTRATION_JSON, "reports"))
        return outputs
    if stage == "evaluate":
        _evaluate(workspace, outputs)
        # metrics.json is evaluate's report; reports/evaluate.json (if any) is logged too.
    if stage == "calibrate":
        _calibrate(workspace, outputs)
    _stage_report(stage, workspace, outputs)
    return outputs


def fingerprint(outputs: StageOutputs) -> str:
    digest = hashlib.sha256()
    for path in outputs.files():
        try:
            stat = path.stat()
        except OSError:
            continue
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps(outputs.metrics, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def log_outputs(client, run_id: str, outputs: StageOutputs) -> None:
    """Log ``outputs`` to ``run_id`` in batches (MLflow caps a batch at 1000 metrics)."""
    from mlflow.entities import Metric, RunTag

    stamp = int(time.time() * 1000)
    metrics = [Metric(k, v, stamp, 0) for k, v in sorted(outputs.metrics.items())]
    metrics += [Metric(k, v, stamp, step) for k, v, step in outputs.series]
    for begin in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[begin : begin + 1000])
    tags = [RunTag(k, str(v)[:8000]) for k, v in sorted(outputs.tags.items())]
    for begin in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[begin : begin + 100])
    for path, artifact_dir in outputs.artifacts:
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_dir)
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_dir)


def log_params(client, run_id: str, params) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(flat_params(params).items())]
    for begin in range(0, len(items), 100):
        client.log_batch(run_id, params=items[begin : begin + 100])


def set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:8000]) for k, v in sorted(tags.items())]
    for begin in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[begin : begin + 100])
