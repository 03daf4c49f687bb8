"""Registration and the champion gate.

``register_run`` registers the pipeline run's model as a new version of the registered model
(``registry.model_name``, default ``vift-<data name or source>``), points the alias ``candidate``
at it, and moves ``champion`` to it only if the gate row (``registry.gate_metric``, default
``served``: the row of the inference mode calibration chose) beats ``question_only`` and ``majority_per_type`` beyond chance (paired 95 % CI above 0 and McNemar
p < 0.05, from metrics.json's ``evidence``) and its accuracy beats the current champion's by more than
``registry.margin``. Each version carries its accuracies as tags (``accuracy.<row>``), so the
gate compares against what the champion was registered with, wherever it came from.

Idempotent per run: the version is tagged ``vift.run_id``; re-running registration for a run that
already has a version registers nothing and only completes a gate that was interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vift import paths
from vift.data.manifests import Manifest
from vift.errors import UserError
from vift.io import atomic_write_json
from vift.paths import FUSION_JSON as FUSION_FILE
from vift.paths import METRICS_JSON as METRICS_FILE
from vift.paths import REGISTRATION_JSON as REGISTRATION_FILE
from vift.registry import tracking
from vift.registry.server import guard, redact, run_link
from vift.registry.tracking import StageRun

CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_RUN = "vift.run_id"
TAG_GATE_METRIC = "vift.gate_metric"
TAG_GATE = "vift.gate"  # set once the aliases have been decided: promoted | kept
TAG_GATE_DECISION = "vift.gate_decision"  # the decision as JSON: a rerun reports it unchanged
ACCURACY_TAG = "accuracy.{row}"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: float, champion: float | None, margin: float, champion_version: str | None = None) -> Decision:
    """The gate: promote iff there is no champion, or ``candidate > champion + margin``."""
    if champion_version is None:
        return Decision(True, "no champion yet: the first gated version becomes champion")
    if champion is None:
        return Decision(
            False,
            f"champion version {champion_version} has no accuracy tag for this gate metric, so it cannot be "
            f"compared; champion kept (move the alias by hand if intended)",
        )
    if candidate > champion + margin:
        return Decision(True, f"{candidate:.4f} beats champion {champion:.4f} by more than the margin {margin:g}")
    return Decision(False, f"{candidate:.4f} does not beat champion {champion:.4f} by more than the margin {margin:g}")


def read_metrics(workspace: Path, gate_metric: str) -> tuple[dict, dict]:
    """(all rows, the gate row) of ``reports/metrics.json``; UserError naming what is missing."""
    path = workspace / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{METRICS_FILE}: not found; run the evaluate stage first (`dvc repro evaluate`)")
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{METRICS_FILE}: not valid JSON ({error}); re-run the evaluate stage") from None
    rows = content.get("rows") if isinstance(content, Mapping) else None
    if not isinstance(rows, Mapping) or not rows:
        raise UserError(f"{METRICS_FILE}: no 'rows' object; re-run the evaluate stage")
    row = rows.get(gate_metric)
    if not isinstance(row, Mapping) or not isinstance(row.get("accuracy"), (int, float)):
        raise UserError(
            f"registry.gate_metric: row {gate_metric!r} with an 'accuracy' is not in {METRICS_FILE} (rows: {', '.join(sorted(rows))})",
            exit_code=2,
        )
    evidence = content.get("evidence")
    evidence = evidence.get(gate_metric) if isinstance(evidence, Mapping) else None
    return dict(rows), dict(row), evidence if isinstance(evidence, Mapping) else None


SERVED = "served"  # registry.gate_metric: the ablation row of the mode the model serves


def evidence_failure(evidence: Mapping | None, gate_metric: str) -> Decision | None:
    """None if ``gate_metric`` beats every prior control (paired 95 % CI above 0 and McNemar p < 0.05), else why not.

    A version that does not beat the question alone and the per-type majority guess is not shown
    to use the image at all: it may be registered, never made champion.
    """
    from vift.eval.ablation import PRIOR_CONTROLS
    from vift.scoring.stats import beyond_chance

    if evidence is None:
        return Decision(False, f"{METRICS_FILE} has no paired evidence for {gate_metric}; re-run the evaluate stage")
    lost = []
    for control in PRIOR_CONTROLS:
        comparison = evidence.get(control)
        if not isinstance(comparison, Mapping):
            lost.append(f"no comparison with {control}")
            continue
        low, high = comparison["ci95"]
        if not beyond_chance(comparison):
            p_value = comparison.get("mcnemar_p", 1.0)
            lost.append(
                f"{gate_metric} - {control} = {comparison['difference']:+.4f}, 95 % CI [{low:+.4f}, {high:+.4f}], "
                f"McNemar p = {p_value:.3g}: not above 0 beyond chance"
            )
    if lost:
        return Decision(False, "kept as candidate: does not beat its controls (" + "; ".join(lost) + ")")
    return None


def _row_accuracies(rows: Mapping[str, Any]) -> Iterator[tuple[str, float, list[float] | None]]:
    """(row, accuracy, 95 % interval or None) for every well-formed row of metrics.json."""
    for row, values in rows.items():
        if isinstance(values, Mapping) and isinstance(values.get("accuracy"), (int, float)):
            ci = values.get("ci95")
            yield row, float(values["accuracy"]), [float(v) for v in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None


def _version_tags(rows: Mapping[str, Any], gate_metric: str, gate_rows: set[str], handle: StageRun) -> dict[str, str]:
    """Lineage and what the gate compares (``accuracy.<row>`` of the gate rows); metrics of every
    row go on the logged model (:func:`_log_model_metrics`), not into tags."""
    tags = {
        TAG_RUN: handle.run_id,
        TAG_GATE_METRIC: gate_metric,
        "vift.experiment": handle.experiment,
    }
    for row, accuracy, ci in _row_accuracies(rows):
        if row in gate_rows:
            tags[ACCURACY_TAG.format(row=row)] = repr(accuracy)
            if ci is not None:
                tags[f"ci95.{row}"] = json.dumps(ci)
    tags.update(handle.lineage)  # git commit, dvc.lock hashes
    return {k: str(v) for k, v in tags.items()}


def _log_model_metrics(rows: Mapping[str, Any], model_id: str) -> None:
    """Accuracy and interval of every ablation row, on the logged model (MLflow's model page)."""
    import mlflow

    metrics = {}
    for row, accuracy, ci in _row_accuracies(rows):
        metrics[f"{row}.accuracy"] = accuracy
        if ci is not None:
            metrics[f"{row}.ci95_low"], metrics[f"{row}.ci95_high"] = ci
    mlflow.log_metrics(metrics, model_id=model_id)


def _versions_of_run(client, name: str, run_id: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error):
            return []
        raise
    return sorted((v for v in versions if v.tags.get(TAG_RUN) == run_id), key=lambda v: int(v.version))


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if tracking.is_missing(error, invalid_parameter=True):
            return None
        raise


def _accuracy(version, gate_metric: str) -> float | None:
    if version is None:
        return None
    value = version.tags.get(ACCURACY_TAG.format(row=gate_metric))
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _example(workspace: Path):
    """The first test item with an image (path, question) for the model's input example, if data exists.

    Read through the manifest loader, so JSON-array manifests and the image-root check hold here too.
    """
    manifest = Manifest(workspace / paths.manifest("test"), "vqa", workspace / paths.DATA_DIR)
    try:
        record = next((r for r in manifest if r.image is not None), None)
    except (OSError, UserError):
        record = None
    if record is None:
        return None, "How many shapes are there?"
    return manifest.image_path(record), record.question


def _gate(client, name: str, version, accuracy: float, gate_metric: str, margin: float, failure: Decision | None) -> dict:
    """Move ``candidate`` (always) and ``champion`` (if the evidence holds and the gate passes) to ``version``."""
    champion = _alias(client, name, CHAMPION)
    champion_version = str(champion.version) if champion is not None else None
    moved = []
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    moved.append(CANDIDATE)
    if failure is not None:
        decision = failure
        champion_accuracy = _accuracy(champion, gate_metric)
    elif champion_version == str(version.version):
        decision = Decision(True, "this version is already champion")
        champion_accuracy = accuracy
    else:
        champion_accuracy = _accuracy(champion, gate_metric)
        decision = decide(accuracy, champion_accuracy, margin, champion_version)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            moved.append(CHAMPION)
    gate = {
        "metric": gate_metric,
        "margin": margin,
        "candidate_accuracy": accuracy,
        "champion_version_before": champion_version,
        "champion_accuracy_before": champion_accuracy,
        "promoted": decision.promote,
        "reason": decision.reason,
        "aliases_moved": moved,
    }
    client.set_model_version_tag(name, version.version, TAG_GATE_DECISION, json.dumps(gate, sort_keys=True))
    client.set_model_version_tag(name, version.version, TAG_GATE, "promoted" if decision.promote else "kept")
    return gate


def _recorded_gate(version, gate_metric: str) -> dict:
    """The decision made when ``version`` was registered (its tag), with nothing moved now."""
    try:
        gate = json.loads(version.tags.get(TAG_GATE_DECISION) or "")
    except ValueError:
        gate = None
    if not isinstance(gate, dict):  # versions registered before the decision was kept as a tag
        gate = {
            "metric": version.tags.get(TAG_GATE_METRIC, gate_metric),
            "candidate_accuracy": _accuracy(version, gate_metric),
            "promoted": version.tags.get(TAG_GATE) == "promoted",
        }
    gate["reason"] = f"decided when this version was registered: {gate.get('reason', 'reason not recorded')}"
    gate["aliases_moved"] = []
    return gate


def register_run(params, handle: StageRun) -> dict:
    """Register ``handle``'s run (idempotent), apply the gate, write ``reports/registration.json``."""
    import mlflow

    from vift.fusion.modes import MODE_ROWS, FusionFile
    from vift.model.loading import check_checkpoint
    from vift.registry.pyfunc import log_pyfunc

    workspace = handle.workspace
    registry = params.registry
    name, gate_metric, margin = params.registered_model_name(), registry.gate_metric, registry.margin
    model_dir = workspace / paths.VIFT_MODEL
    fusion_file = workspace / FUSION_FILE
    try:
        check_checkpoint(model_dir)
    except UserError as error:
        raise UserError(f"{paths.VIFT_MODEL}: {error}; run the train_text stage first") from None
    if not fusion_file.is_file():
        raise UserError(f"{FUSION_FILE}: not found; run the calibrate stage first (`dvc repro calibrate`)")
    read = FusionFile.read(fusion_file)
    fusion, served_mode = read.spec, read.mode
    if gate_metric == SERVED:
        # Gate on what the model will serve: the row of the mode calibration chose. Versions are
        # compared on their "accuracy.served" tags, whatever mode each serves.
        gate_row_name = MODE_ROWS[served_mode]
    else:
        gate_row_name = gate_metric
    rows, gate_row, evidence = read_metrics(workspace, gate_row_name)
    failure = evidence_failure(evidence, gate_row_name)
    accuracy = float(gate_row["accuracy"])
    if gate_metric == SERVED:
        rows = {**rows, SERVED: gate_row}  # logged as the version's accuracy.served / ci95.served tags
    client = handle.client
    uri = handle.tracking_uri

    with guard(uri, f"look up versions of registered model {name!r}"):
        existing = _versions_of_run(client, name, handle.run_id)
    report: dict[str, Any] = {
        "model_name": name,
        "tracking_uri": redact(uri),
        "experiment": handle.experiment,
        "run_id": handle.run_id,
        "run_url": run_link(uri, handle.experiment_id, handle.run_id),
        "fusion": fusion.to_dict(),
        "accuracies": {row: values.get("accuracy") for row, values in rows.items() if isinstance(values, Mapping)},
        "gate_ci95": gate_row.get("ci95"),
        "served_mode": served_mode,
        "gate_row": gate_row_name,
    }
    if existing:
        version = existing[0]
        report["action"] = "already_registered"
        report["why"] = f"run {handle.run_id} is registered as version {version.version} already; no new version"
        with guard(uri, "complete the champion gate"):
            if version.tags.get(TAG_GATE):
                gate = _recorded_gate(version, gate_metric)
            else:  # an earlier registration stopped before the gate: finish it now
                gate = _gate(client, name, version, accuracy, gate_metric, margin, failure)
                report["why"] += "; its interrupted champion gate was completed"
    else:
        with guard(uri, "log the outputs of earlier stages"):
            backfilled = handle.backfill(paths.STAGES)
        if backfilled:
            report["backfilled_stages"] = backfilled
        image, question = _example(workspace)
        with guard(uri, "log the pyfunc model"):
            info = log_pyfunc(
                model_dir,
                fusion_file,
                dtype=params.model.dtype,
                batch_size=params.eval.batch_size,
                max_new_tokens=params.eval.max_new_tokens,
                example_image=image,
                example_question=question,
            )
        tags = _version_tags(rows, gate_metric, {gate_metric, gate_row_name}, handle)
        with guard(uri, f"register a version of {name!r}"):
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        with guard(uri, "log the ablation's metrics on the logged model"):
            _log_model_metrics(rows, info.model_id)
            ci = gate_row.get("ci95")
            interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if isinstance(ci, list) and len(ci) == 2 else ""
            client.update_model_version(
                name,
                version.version,
                description=f"ViFT model of run {handle.run_id}: {gate_metric} accuracy {accuracy:.4f}{interval}.",
            )
            gate = _gate(client, name, version, accuracy, gate_metric, margin, failure)
        card = model_card(params, workspace, name, str(version.version), handle.run_id, served_mode, gate_row_name, gate)
        with guard(uri, "write the model card"):
            client.update_model_version(name, version.version, description=card)
            if gate["promoted"] or _alias(client, name, CHAMPION) is None:  # the page describes what is served
                client.update_registered_model(name, description=card)
        report["action"] = "registered"
        report["why"] = f"run {handle.run_id} had no registered version"
        report["logged_model_uri"] = info.model_uri
    with guard(uri, "read the model's aliases"):
        holders = {alias: _alias(client, name, alias) for alias in (CANDIDATE, CHAMPION)}
    report.update(
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        champion_uri=f"models:/{name}@{CHAMPION}",
        gate=gate,
        aliases={alias: (str(v.version) if v is not None else None) for alias, v in holders.items()},
        aliases_moved=gate.get("aliases_moved", []),
    )
    handle.mark_registered(name, str(version.version))
    handle.tag({"vift.registered_model": name, "vift.registered_version": str(version.version)})
    atomic_write_json(workspace / REGISTRATION_FILE, report)
    return report


def model_card(params, workspace: Path, name: str, version: str, run_id: str, served_mode: str, gate_row: str, gate: dict) -> str:
    """The version's page in the MLflow UI: data, recipe, served mode, the table, the verdict, the gate."""
    from vift.eval.report import percent

    metrics = json.loads((workspace / METRICS_FILE).read_text())
    data = params.data
    summary_file = workspace / paths.DATA_DIR / "summary.json"
    sizes = json.loads(summary_file.read_text()).get("sizes", {}) if summary_file.is_file() else {}
    lines = [
        f"# {name} version {version}",
        "",
        f"ViFT (visual instruction-free fine-tuning), pipeline run `{run_id}`, preset `{params.preset}`.",
        "",
        f"- **data**: {data.name or data.source}"
        + (f" (`{data.import_dir}`)" if data.import_dir else "")
        + (": " + ", ".join(f"{split} {n}" for split, n in sizes.items()) if sizes else ""),
        f"- **recipe**: base `{params.model.base}`; captions, then text-only instructions mixed with captions "
        f"({params.train.text.text_ratio:g} text); no visual instructions",
        f"- **served mode**: `{served_mode}` (row `{gate_row}`; chosen on the calibration split, see fusion.json)",
        f"- **gate**: {'champion' if gate['promoted'] else 'candidate'}: {gate['reason']}",
        "",
        "| row | accuracy % | 95 % CI | n |",
        "| --- | ---: | --- | ---: |",
    ]
    for row, values in metrics.get("rows", {}).items():
        low, high = values["ci95"]
        lines.append(f"| {row} | {percent(values['accuracy'])} | {percent(low)}–{percent(high)} | {values['n']} |")
    verdict = metrics.get("verdict", {})
    if verdict:
        lines += [
            "",
            f"**Verdict on fusion:** {'beats' if verdict.get('fusion_beats_controls') else 'does NOT beat'} its controls ({verdict.get('rule', '')}).",
        ]
    return "\n".join(lines) + "\n"
