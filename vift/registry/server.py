"""The MLflow tracking server as the rest of vift meets it: settings, connection, clear errors.

- Settings from the environment (documented in docs/REGISTRY.md): the tracking mode
  (``VIFT_TRACKING``: auto | required | off), whether this process is the main rank, and the
  retry budget for reaching a remote server.
- :func:`connect`: an MlflowClient once the server answers :func:`check_reachable` (``/health``,
  retried with backoff); :func:`using_tracking_uri` points MLflow's fluent API at it for a block.
- :func:`guard` turns MLflow / HTTP failures into one clear :class:`~vift.errors.UserError`;
  :func:`tolerate` is the one policy for a tracking failure: fail when tracking is required,
  else warn and carry on untracked.
- Credentials never reach output: :func:`redact` (a URI), :func:`redact_text` (any message),
  :func:`warn` and :func:`notice` (stderr lines).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from vift import paths
from vift.errors import UserError

# Environment knobs (documented in docs/REGISTRY.md).
ENV_MODE = "VIFT_TRACKING"  # auto (default) | required | off
ENV_RETRIES = "VIFT_TRACKING_RETRIES"  # attempts to reach a remote server before giving up
ENV_BACKOFF = "VIFT_TRACKING_BACKOFF"  # first delay in seconds; doubles per attempt, capped at 30 s
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0


def warn(message: str) -> None:
    print(f"vift: warning: {redact_text(message)}", file=sys.stderr)


def notice(message: str) -> None:
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
            detail = f"{type(error).__name__}: {short(error)}"
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


def short(error: BaseException, limit: int = 300) -> str:
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
            raise UserError(unreachable_message(uri, f"while trying to {action}: {short(error)}", 1)) from None
        if "401" in text or "403" in text or "Unauthorized" in text:
            raise UserError(
                f"MLflow tracking server {redact(uri)} refused to {action}: {short(error)}; check "
                f"MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise UserError(f"MLflow could not {action} on {redact(uri)}: {short(error)}") from None


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


def connect(uri: str):
    """An MlflowClient for the tracking server and model registry at ``uri``, once it answers.

    :func:`check_reachable` first: a UserError (after retries) when the server cannot be reached.
    """
    from mlflow import MlflowClient

    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def tolerate(error: BaseException, required: bool, uri: str, when: str, untracked: Callable[[str], None]) -> None:
    """The one policy for a tracking failure ``when`` (e.g. "before the stage").

    Tracking ``required`` (``VIFT_TRACKING=required``, or a step that is about the registry):
    raise a UserError, ``error`` itself if it is one. Otherwise hand ``untracked`` a one-line
    detail (to warn with) and return: the caller carries on untracked, its outputs kept.
    """
    if required:
        if isinstance(error, UserError):
            raise error
        raise UserError(f"MLflow tracking failed {when} ({redact(uri)}): {short(error)}") from error
    detail = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {short(error)}"
    untracked(detail)
