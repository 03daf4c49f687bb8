"""``dvc push`` / ``dvc pull`` through DVC's Python API, after the remote check, with clear failures.

DVC stores every file under its content hash (``files/md5/<2>/<30>``), uploads each object with one
request and skips objects the remote already has. An interrupted push therefore leaves only whole,
correctly named objects behind, and running it again uploads exactly the missing ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vift.errors import UserError
from vift.storage.check import apply_compatible_store_env, check_endpoint, check_remote
from vift.storage.remote import Remote, get_remote


@dataclass
class TransferResult:
    remote: Remote
    transferred: int
    details: dict


def _repo():
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo()
    except NotDvcRepoError:
        raise UserError(f"{Path.cwd()}: not inside a DVC repository; run from the repository root") from None


# Loggers that report one line per failed object; a dead endpoint would print thousands.
_PER_OBJECT_LOGGERS = ("dvc_objects.fs.generic", "dvc_data.hashfile.transfer", "dvc_data.index.fetch")
SHOWN_FAILURES = 3


class _FirstFailures(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "failed to transfer" not in str(record.msg):
            return True
        self.seen += 1
        return self.seen <= SHOWN_FAILURES


@contextlib.contextmanager
def _quiet_per_object_errors() -> Iterator[_FirstFailures]:
    """Show the first few per-object transfer errors; the summary says how many failed."""
    flt = _FirstFailures()
    loggers = [logging.getLogger(name) for name in _PER_OBJECT_LOGGERS]
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield flt
    finally:
        for logger in loggers:
            logger.removeFilter(flt)


def _failure_cause(remote: Remote) -> str:
    """After a failed transfer: is the endpoint still there? Used to word the message."""
    if remote.is_s3 and remote.endpoint:
        try:
            check_endpoint(remote.endpoint)
        except UserError as error:
            return f" The endpoint stopped answering during the transfer: {error}"
    return " See the errors above (network, permissions or disk space)."


def _map_dvc_error(error: Exception, remote: Remote, verb: str) -> UserError:
    from dvc.config import NoRemoteError, RemoteNotFoundError
    from dvc.exceptions import CheckoutError, DownloadError, UploadError

    if isinstance(error, UploadError):
        return UserError(
            f"push to {remote.describe()} incomplete: {error.amount} file(s) failed to upload.{_failure_cause(remote)} "
            "Nothing in the workspace or the cache was changed, and objects already uploaded are complete "
            "(DVC names each by its MD5): run `vift storage push` again to upload only what is missing."
        )
    if isinstance(error, DownloadError):
        return UserError(
            f"pull from {remote.describe()} incomplete: {error.amount} file(s) failed to download.{_failure_cause(remote)} "
            "Workspace files were not touched by the failed downloads; run `vift storage pull` again."
        )
    if isinstance(error, CheckoutError):
        missing = ", ".join(str(t) for t in error.target_infos[:10])
        return UserError(
            f"pull from {remote.describe()}: could not restore {missing}: their data is neither in the local cache "
            "nor in the remote. Push it from the machine that produced it (`vift storage push`), or rebuild it "
            "with `dvc repro`."
        )
    if isinstance(error, (NoRemoteError, RemoteNotFoundError)):
        return UserError(f"{error}; configure one with `vift storage configure` (see docs/STORAGE.md)")
    message = str(error)
    if "--force" in message or "would be removed" in message or "modified" in message.lower():
        return UserError(f"{verb}: {message}\nCommit your changes with `dvc commit`, or pass --force to discard them.")
    return UserError(f"{verb} with {remote.describe()} failed: {message}")


def _prepare(remote_name: str | None, verb: str, check: bool) -> Remote:
    remote = get_remote(remote_name)
    apply_compatible_store_env(remote)
    if check and remote.is_s3:
        check_remote(remote, write_probe=verb == "push")
    return remote


def push(remote_name: str | None = None, targets: list[str] | None = None, jobs: int | None = None, check: bool = True) -> TransferResult:
    """Check the remote, then ``dvc push`` (every cached output of the workspace, or ``targets``)."""
    from dvc.exceptions import DvcException

    remote = _prepare(remote_name, "push", check)
    try:
        with _repo() as repo, _quiet_per_object_errors():
            count = repo.push(targets=targets or None, jobs=jobs, remote=remote.name)
    except DvcException as error:
        raise _map_dvc_error(error, remote, "push") from None
    return TransferResult(remote, count, {})


def pull(
    remote_name: str | None = None,
    targets: list[str] | None = None,
    jobs: int | None = None,
    force: bool = False,
    check: bool = True,
) -> TransferResult:
    """Check the remote (read access), then ``dvc pull`` (fetch into the cache, check out the outputs)."""
    from dvc.exceptions import DvcException

    remote = _prepare(remote_name, "pull", check)
    try:
        with _repo() as repo, _quiet_per_object_errors():
            result = repo.pull(targets=targets or None, jobs=jobs, remote=remote.name, force=force)
    except DvcException as error:
        raise _map_dvc_error(error, remote, "pull") from None
    stats = result.get("stats", {}) if isinstance(result, dict) else {}
    return TransferResult(remote, int(stats.get("fetched", 0) or 0), stats)
