"""MLflow tracking for pipeline stages: one MLflow run per pipeline run, every stage logs into it.

Each stage is its own process (``dvc repro`` runs ``vift stage <name>`` one after another), so the
run id is handed over through the workspace: ``.vift/mlflow_run.json`` in the workspace root says
which run the pipeline is filling. :func:`stage_run` wraps one stage: it resumes that run or starts
a new one, logs the flattened parameters and lineage tags, and after the stage logs what the stage
produced (per-step training metrics, ablation rows, fusion, plots, predictions).

A stage starts a NEW run when (first match wins; the reason is printed and stored):

1. no run is recorded in the workspace, or it was recorded for another tracking URI or experiment;
2. the parameters differ from the recorded run's (MLflow parameters are immutable, and a run
   should describe one configuration);
3. the recorded run no longer exists (or was deleted) on the tracking server;
4. the recorded run has been registered already and the stage is not ``register`` (the next
   pipeline run begins), or the stage has already completed in the recorded run and is not
   ``register`` (a re-run of a stage, e.g. after a code change, is a new pipeline run).

Otherwise it resumes the recorded run. ``register`` always resumes, so re-running it is a no-op
(see :mod:`vift.registry.gate`). Because a new run may begin in the middle of the graph (DVC
skips unchanged stages), ``register`` back-fills the outputs of every earlier stage that the run
has not logged yet: a registered run always holds the full lineage.

Tracking is never needed for a non-register stage to succeed: with the default
``sqlite:///<workspace>/mlflow.db`` it works offline; when a remote server cannot be reached (after
retries with backoff) the stage prints one warning and runs untracked, its outputs are kept, and
``vift stage register`` logs them once the server is back. ``register`` itself fails with a
:class:`~vift.errors.UserError`. ``VIFT_TRACKING=required`` makes every stage fail instead;
``VIFT_TRACKING=off`` disables stage tracking. Only the main process (rank 0) of a distributed
launch logs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vift import paths
from vift.errors import UserError
from vift.io import atomic_write_json, file_lock

STATE_DIR = Path(".vift")
RUN_FILE = STATE_DIR / "mlflow_run.json"
LOCK_FILE = STATE_DIR / "mlflow_run.lock"
REGISTER_STAGE = "register"

FUSION_FILE = paths.MODELS_DIR / "fusion.json"
METRICS_FILE = paths.REPORTS_DIR / "metrics.json"
ABLATION_FILE = paths.REPORTS_DIR / "ablation.md"
PREDICTIONS_DIR = paths.REPORTS_DIR / "predictions"
REGISTRATION_FILE = paths.REPORTS_DIR / "registration.json"
DVC_LOCK = Path("dvc.lock")

# Environment knobs (documented in docs/REGISTRY.md).
ENV_MODE = "VIFT_TRACKING"  # auto (default) | required | off
ENV_RETRIES = "VIFT_TRACKING_RETRIES"  # attempts to reach a remote server before giving up
ENV_BACKOFF = "VIFT_TRACKING_BACKOFF"  # first delay in seconds; doubles per attempt, capped at 30 s
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0

_PLOT_SUFFIXES = {".png", ".svg", ".pdf", ".csv", ".html"}
_FUSION_PLOT_WORDS = ("heatmap", "fusion", "calibrat")
_UNSAFE_NAME = re.compile(r"[^/\w.\- ]")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _warn(message: str) -> None:
    print(f"vift: warning: {redact_text(message)}", file=sys.stderr)


def _info(message: str) -> None:
    print(f"vift: {redact_text(message)}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Settings: mode, rank, retry budget
# --------------------------------------------------------------------------------------------


def tracking_mode(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    mode = (environ.get(ENV_MODE) or "auto").strip().lower()
    if mode in ("0", "false", "no", "disabled"):
        mode = "off"
    if mode not in ("auto", "required", "off"):
        raise UserError(f"{ENV_MODE}={environ.get(ENV_MODE)!r}: use auto, required or off", exit_code=2)
    return mode


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """True unless this is a non-zero rank of a distributed launch (``RANK``, else ``LOCAL_RANK``).

    torchrun, ``accelerate launch`` and the DeepSpeed launcher all export ``RANK`` (global) and
    ``LOCAL_RANK``; reading them avoids initialising a process group just to ask.
    """
    environ = os.environ if environ is None else environ
    for name in ("RANK", "LOCAL_RANK"):
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value) == 0
            except ValueError:
                return True
    return True


def retry_budget(environ: Mapping[str, str] | None = None) -> tuple[int, float]:
    environ = os.environ if environ is None else environ
    try:
        attempts = max(1, int(environ.get(ENV_RETRIES) or DEFAULT_RETRIES))
        backoff = max(0.0, float(environ.get(ENV_BACKOFF) or DEFAULT_BACKOFF))
    except ValueError:
        raise UserError(f"{ENV_RETRIES} must be an integer and {ENV_BACKOFF} a number of seconds", exit_code=2) from None
    return attempts, backoff


# --------------------------------------------------------------------------------------------
# The tracking server: reachability, clear errors
# --------------------------------------------------------------------------------------------


QUIET_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def redact(uri: str) -> str:
    """``uri`` without credentials (user:password@ in the netloc)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return uri


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (credentials stripped); None for a store without a UI."""
    if not _is_http(uri):
        return None
    parts = urlsplit(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def unreachable_message(uri: str, detail: str, attempts: int) -> str:
    return (
        f"MLflow tracking server {redact(uri)} is unreachable ({attempts} attempt(s); last error: {detail}). "
        f"Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI, or unset it "
        f"to use the embedded store sqlite:///<workspace>/{paths.MLFLOW_DB}. Outputs of finished stages are "
        f"kept: re-run `vift stage register` once the server answers."
    )


def check_reachable(uri: str, attempts: int | None = None, backoff: float | None = None) -> None:
    """Raise a UserError unless the tracking server at ``uri`` answers ``/health``.

    Only HTTP(S) URIs are probed (a sqlite or file store is local). Connection failures, timeouts
    and 5xx answers are transient: retried ``attempts`` times in all with exponential backoff.
    """
    if not _is_http(uri):
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return
    import requests

    default_attempts, default_backoff = retry_budget()
    attempts = default_attempts if attempts is None else max(1, attempts)
    delay = default_backoff if backoff is None else backoff
    url = uri.rstrip("/") + "/health"
    detail = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            response = requests.get(url, timeout=5)
        except requests.RequestException as error:
            detail = f"{type(error).__name__}: {_short(error)}"
        else:
            if response.status_code == 200:
                return
            if response.status_code in (401, 403):
                raise UserError(
                    f"MLflow tracking server {redact(uri)} refused the request (HTTP {response.status_code}): set "
                    f"MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                )
            if response.status_code < 500:
                raise UserError(
                    f"{redact(uri)} answered HTTP {response.status_code} on /health: is MLFLOW_TRACKING_URI the "
                    f"address of an MLflow tracking server?"
                )
            detail = f"HTTP {response.status_code}"
        if attempt < attempts:
            time.sleep(min(delay, 30.0))
            delay *= 2
    raise UserError(unreachable_message(uri, detail, attempts))


_CREDENTIALS_IN_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` turned into ``scheme://***@``."""
    return _CREDENTIALS_IN_URL.sub(r"\g<scheme>***@", text)


def _short(error: BaseException, limit: int = 300) -> str:
    text = redact_text(" ".join(str(error).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CONNECTION_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "NewConnectionError",
    "ConnectTimeout",
    "ConnectionError",
    "NameResolutionError",
    "Failed to resolve",
    "RemoteDisconnected",
)


@contextlib.contextmanager
def guard(uri: str, action: str) -> Iterator[None]:
    """Turn MLflow / HTTP failures during ``action`` into one clear UserError."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        from mlflow.exceptions import MlflowException

        try:
            import requests

            http_errors: tuple[type[BaseException], ...] = (requests.RequestException,)
        except ImportError:  # pragma: no cover - requests ships with mlflow
            http_errors = ()
        if not isinstance(error, (MlflowException, *http_errors, ConnectionError, TimeoutError)):
            raise
        text = str(error)
        if isinstance(error, (ConnectionError, TimeoutError)) or any(m in text for m in _CONNECTION_MARKERS):
            raise UserError(unreachable_message(uri, f"while trying to {action}: {_short(error)}", 1)) from None
        if "401" in text or "403" in text or "Unauthorized" in text:
            raise UserError(
                f"MLflow tracking server {redact(uri)} refused to {action}: {_short(error)}; check "
                f"MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise UserError(f"MLflow could not {action} on {redact(uri)}: {_short(error)}") from None


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore what was there.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI; both are put back. A URI with
    credentials also silences MLflow's "View run at <uri>" lines, which would print the password.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = getattr(tracking_utils, "_tracking_uri", None)
    previous_quiet = os.environ.get(QUIET_URLS)
    if redact(uri) != uri:
        os.environ[QUIET_URLS] = "true"
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous_quiet is None:
            os.environ.pop(QUIET_URLS, None)
        else:
            os.environ[QUIET_URLS] = previous_quiet
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


# --------------------------------------------------------------------------------------------
# What gets logged: params, lineage, stage outputs
# --------------------------------------------------------------------------------------------


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
            done = subprocess.run(
                ["git", "-C", str(workspace), *args], capture_output=True, text=True, timeout=10, check=False
            )
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
    lock = workspace / DVC_LOCK
    if not lock.is_file():
        return {}
    import yaml

    try:
        content = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        _warn(f"{lock}: not readable as YAML ({_short(error)}); lineage tags skipped")
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
        _warn(f"{path}: not readable as JSON ({_short(error)}); not logged")
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
    fusion_file = workspace / FUSION_FILE
    if fusion_file.is_file():
        outputs.artifacts.append((fusion_file, "fusion"))
        content = _read_json(fusion_file)
        spec = content.get("fusion") if isinstance(content, Mapping) else None
        if isinstance(spec, Mapping):
            for key, value in spec.items():
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
    metrics_file = workspace / METRICS_FILE
    if metrics_file.is_file():
        outputs.artifacts.append((metrics_file, "reports"))
        content = _read_json(metrics_file)
        outputs.metrics.update(ablation_metrics(content))
    if (workspace / ABLATION_FILE).is_file():
        outputs.artifacts.append((workspace / ABLATION_FILE, "reports"))
    from vift.stages import STAGES

    fusion_plots = set(_plots(workspace, _FUSION_PLOT_WORDS))  # logged by calibrate, under fusion/
    other_stages = tuple(f"{s}_" for s in STAGES if s != "evaluate")  # e.g. train_text_loss.png
    for plot in _plots(workspace):
        if plot not in fusion_plots and not plot.name.startswith(other_stages):
            outputs.artifacts.append((plot, "plots"))
    if (workspace / PREDICTIONS_DIR).is_dir():
        outputs.artifacts.append((workspace / PREDICTIONS_DIR, "predictions"))


def collect_stage_outputs(stage: str, workspace: Path) -> StageOutputs:
    """What ``stage`` produced in ``workspace``, as things to log. Unknown stages: their report only."""
    outputs = StageOutputs()
    if stage == REGISTER_STAGE:
        if (workspace / REGISTRATION_FILE).is_file():
            outputs.artifacts.append((workspace / REGISTRATION_FILE, "reports"))
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


# --------------------------------------------------------------------------------------------
# The workspace's run record
# --------------------------------------------------------------------------------------------


class WorkspaceRun:
    """``.vift/mlflow_run.json``: the run the workspace's pipeline is filling (read-modify-write under a lock)."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.path = workspace / RUN_FILE

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            _warn(f"{self.path}: unreadable; a new MLflow run will start")
            return None
        return state if isinstance(state, dict) and state.get("run_id") else None

    def save(self, state: dict) -> None:
        atomic_write_json(self.path, state)

    def locked(self):
        """Serialise run resolution between stages started concurrently (e.g. parallel Prefect tasks)."""
        return file_lock(self.workspace / LOCK_FILE)

    def update(self, change) -> dict | None:
        with self.locked():
            state = self.load()
            if state is not None:
                change(state)
                self.save(state)
            return state


def new_run_reason(state: dict | None, stage: str, uri: str, experiment: str, phash: str, run) -> str | None:
    """Why ``stage`` must start a new run instead of resuming ``state``'s; None to resume.

    ``run`` is the recorded run as the server knows it (None if it does not exist).
    """
    if state is None:
        return "no MLflow run recorded in this workspace"
    if state.get("tracking_uri") != redact(uri) or state.get("experiment") != experiment:
        return "the recorded run belongs to another tracking URI or experiment"
    if state.get("params_hash") != phash:
        return "parameters changed since the recorded run"
    if run is None or run.info.lifecycle_stage == "deleted":
        return f"the recorded run {state['run_id']} no longer exists on the tracking server"
    if stage != REGISTER_STAGE:
        registered = state.get("registered")
        if registered:
            return (
                f"the recorded run {state['run_id']} was registered as {registered.get('model')} "
                f"version {registered.get('version')}"
            )
        if stage in state.get("stages", {}):
            return f"stage {stage} already ran in run {state['run_id']}"
    return None


# --------------------------------------------------------------------------------------------
# The stage context
# --------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """The MLflow run one stage logs into (handed to the stage via :func:`active`)."""

    stage: str
    run_id: str
    experiment_id: str
    experiment: str
    tracking_uri: str
    workspace: Path
    params: Any
    new: bool
    reason: str | None
    client: Any = field(repr=False)
    lineage: dict[str, str] = field(default_factory=dict)  # lineage_tags at the start of the stage

    @property
    def record(self) -> WorkspaceRun:
        return WorkspaceRun(self.workspace)

    def log_stage(self, stage: str, *, force: bool = False, backfilled: bool = False) -> bool:
        """Log what ``stage`` produced unless the run already holds exactly that; True if logged."""
        outputs = collect_stage_outputs(stage, self.workspace)
        stamp = fingerprint(outputs)
        state = self.record.load() or {}
        done = state.get("stages", {}).get(stage) if state.get("run_id") == self.run_id else None
        logged = False
        if force or not done or done.get("fingerprint") != stamp:
            with guard(self.tracking_uri, f"log the outputs of stage {stage}"):
                log_outputs(self.client, self.run_id, outputs)
            logged = True

        def mark(state: dict) -> None:
            if state.get("run_id") == self.run_id:
                entry = {"fingerprint": stamp, "logged_at": _now()}
                if backfilled:
                    entry["backfilled"] = True
                state.setdefault("stages", {})[stage] = entry

        self.record.update(mark)
        return logged

    def backfill(self, stages: Iterable[str]) -> list[str]:
        """Log the outputs of ``stages`` this run has not logged yet (``register`` calls it)."""
        state = self.record.load() or {}
        have = state.get("stages", {}) if state.get("run_id") == self.run_id else {}
        logged = []
        for stage in stages:
            if stage == REGISTER_STAGE or stage in have:
                continue
            outputs = collect_stage_outputs(stage, self.workspace)
            if outputs.empty:
                continue
            if self.log_stage(stage, backfilled=True):
                logged.append(stage)
        return logged

    def tag(self, tags: Mapping[str, str]) -> None:
        with guard(self.tracking_uri, "set run tags"):
            set_tags(self.client, self.run_id, tags)

    def mark_registered(self, model: str, version: str) -> None:
        def mark(state: dict) -> None:
            if state.get("run_id") == self.run_id:
                state["registered"] = {"model": model, "version": str(version), "at": _now()}

        self.record.update(mark)


_ACTIVE: list[StageRun] = []


def active() -> StageRun | None:
    """The StageRun of the innermost :func:`stage_run` in this process, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def is_missing(error: BaseException, invalid_parameter: bool = False) -> bool:
    """Whether an MLflow error says the run, model or version does not exist.

    Stores word it differently (REST: RESOURCE_DOES_NOT_EXIST; sqlite: "... not found"); an alias
    that was never set is INVALID_PARAMETER_VALUE on some versions (``invalid_parameter``).
    """
    text = str(error)
    if "RESOURCE_DOES_NOT_EXIST" in text or getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
        return True
    return "not found" in text.lower() or (invalid_parameter and "INVALID_PARAMETER_VALUE" in text)


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if is_missing(error):
            return None
        raise


def experiment_id_for(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {name!r} is deleted on the tracking server: restore it "
                f"(`mlflow experiments restore`) or set registry.experiment to another name",
                exit_code=2,
            )
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # created concurrently
        if experiment is None:
            raise
        return experiment.experiment_id


def open_run(stage: str, params, workspace: Path, uri: str) -> StageRun:
    """Resolve (resume or start) the workspace's run for ``stage`` and log params + lineage tags."""
    from mlflow import MlflowClient

    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = params.registry.experiment
    phash = params_hash(params)
    record = WorkspaceRun(workspace)
    with guard(uri, "open the pipeline's run"), record.locked():
        state = record.load()
        run = _get_run(client, state["run_id"]) if state and state.get("tracking_uri") == redact(uri) else None
        reason = new_run_reason(state, stage, uri, experiment, phash, run)
        if reason is None:
            run_id, experiment_id, new = state["run_id"], state["experiment_id"], False
        else:
            experiment_id = experiment_id_for(client, experiment)
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run = client.create_run(experiment_id, run_name=f"{params.preset}-{stamp}", tags={"vift.workspace": str(workspace)})
            run_id, new = run.info.run_id, True
            state = {
                "run_id": run_id,
                "experiment_id": experiment_id,
                "experiment": experiment,
                "tracking_uri": redact(uri),  # the record never holds credentials
                "params_hash": phash,
                "started_at": _now(),
                "started_by": stage,
                "new_run_reason": reason,
                "stages": {},
                "registered": None,
            }
            record.save(state)
    if new:
        _info(f"MLflow run {run_id} started ({reason}) on {redact(uri)}")
    # Computed once per stage (git subprocesses, dvc.lock): nothing a stage does changes them.
    lineage = lineage_tags(params, workspace)
    with guard(uri, "log parameters and lineage tags"):
        if new:
            log_params(client, run_id, params)
        set_tags(client, run_id, lineage)
    return StageRun(stage, run_id, experiment_id, experiment, uri, workspace, params, new, reason, client, lineage)


@contextlib.contextmanager
def stage_run(stage: str, params, workspace: str | Path | None = None) -> Iterator[StageRun | None]:
    """Wrap one pipeline stage in the workspace's MLflow run (see the module docstring).

    Yields the :class:`StageRun`, or None when tracking is off, this is not the main process, or
    (for non-register stages in ``auto`` mode) the tracking server cannot be reached. Nested use
    in one process for the same stage yields the outer StageRun.
    """
    if active() is not None and active().stage == stage:
        yield active()
        return
    mode = tracking_mode()
    if mode == "off" or not is_main_process():
        yield None
        return
    from vift.settings import tracking_uri

    workspace = Path(workspace if workspace is not None else Path.cwd()).resolve()
    uri = tracking_uri(workspace)
    required = mode == "required" or stage == REGISTER_STAGE

    def degrade(error: BaseException, when: str) -> None:
        # Tracking never fails a non-register stage in auto mode; register and `required` do fail.
        if required:
            if isinstance(error, UserError):
                raise error
            raise UserError(f"MLflow tracking failed {when} ({redact(uri)}): {_short(error)}") from error
        detail = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {_short(error)}"
        _warn(f"stage {stage}: MLflow tracking failed {when}; the stage runs (or ran) untracked: {detail}")

    import mlflow

    handle: StageRun | None = None
    started = False
    with using_tracking_uri(uri):
        try:
            handle = open_run(stage, params, workspace, uri)
            current = mlflow.active_run()
            started = current is None or current.info.run_id != handle.run_id
            if started:
                with guard(uri, "resume the pipeline's run"):
                    mlflow.start_run(run_id=handle.run_id, nested=current is not None)
        except Exception as error:  # noqa: BLE001 - see degrade()
            degrade(error, "before the stage")
            handle, started = None, False
        if handle is None:
            yield None
            return
        status = "FAILED"
        _ACTIVE.append(handle)
        try:
            yield handle
            status = "FINISHED"
            try:
                handle.log_stage(stage)
                handle.tag(handle.lineage | {f"vift.stage.{stage}": _now()})
            except Exception as error:  # noqa: BLE001 - see degrade()
                degrade(error, "after the stage")
        finally:
            _ACTIVE.pop()
            if started:
                with contextlib.suppress(Exception):
                    mlflow.end_run(status)
