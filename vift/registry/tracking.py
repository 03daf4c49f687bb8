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

What is logged comes from :mod:`vift.registry.outputs`; settings, the connection and the policy
for an unreachable server from :mod:`vift.registry.server`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vift import paths
from vift.errors import UserError
from vift.io import atomic_write_json, file_lock
from vift.registry.outputs import (
    REGISTER_STAGE,
    collect_stage_outputs,
    fingerprint,
    lineage_tags,
    log_outputs,
    log_params,
    params_hash,
    set_tags,
)
from vift.registry.server import (
    connect,
    guard,
    is_main_process,
    notice,
    redact,
    tolerate,
    tracking_mode,
    using_tracking_uri,
    warn,
)
from vift.settings import dvc_experiment


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# The workspace's run record
# --------------------------------------------------------------------------------------------


class WorkspaceRun:
    """``.vift/mlflow_run.json``: the run the workspace's pipeline is filling (read-modify-write under a lock)."""

    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.path = workspace / paths.RUN_RECORD

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            warn(f"{self.path}: unreadable; a new MLflow run will start")
            return None
        return state if isinstance(state, dict) and state.get("run_id") else None

    def save(self, state: dict) -> None:
        atomic_write_json(self.path, state)

    def locked(self):
        """Serialise run resolution between stages started concurrently (e.g. parallel Prefect tasks)."""
        return file_lock(self.workspace / paths.RUN_LOCK)

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
            return f"the recorded run {state['run_id']} was registered as {registered.get('model')} version {registered.get('version')}"
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


def embedded_artifact_root(uri: str) -> str | None:
    """``mlruns/`` beside the embedded sqlite database; None for a server (it decides).

    MLflow's default is ``./mlruns`` of the process that creates the experiment: inside ``dvc exp
    run --temp`` that is a temporary copy, deleted with the artifacts after the experiment.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlruns").as_uri()


def experiment_id_for(client, name: str, artifact_location: str | None = None) -> str:
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
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # created concurrently
        if experiment is None:
            raise
        return experiment.experiment_id


def open_run(stage: str, params, workspace: Path, uri: str) -> StageRun:
    """Resolve (resume or start) the workspace's run for ``stage`` and log params + lineage tags."""
    client = connect(uri)
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
            experiment_id = experiment_id_for(client, experiment, embedded_artifact_root(uri))
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            tags = {"vift.workspace": str(workspace)}
            if exp := dvc_experiment():  # `dvc exp run`: the MLflow run is named after the experiment
                tags.update({"dvc.exp_name": exp["name"], "dvc.exp_baseline_rev": exp["baseline_rev"]})
            name = exp["name"] if exp else f"{params.preset}-{stamp}"
            run = client.create_run(experiment_id, run_name=name, tags=tags)
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
        notice(f"MLflow run {run_id} started ({reason}) on {redact(uri)}")
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
        def untracked(detail: str) -> None:
            warn(f"stage {stage}: MLflow tracking failed {when}; the stage runs (or ran) untracked: {detail}")

        tolerate(error, required, uri, when, untracked)

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
