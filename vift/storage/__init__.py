"""Storage: DVC remotes (local by default, S3 / MinIO for a team), their checks, push and pull.

Public surface::

    configure_s3_remote(endpoint=..., bucket=..., prefix=..., name="s3", make_default=..., ...)
    get_remote(name=None) -> Remote          # None: DVC's default remote
    check_remote(remote, write_probe=True)   # UserError naming the cause, before DVC runs
    push(remote_name=None, targets=None) / pull(...)

See docs/STORAGE.md.
"""

from vift.storage.check import CHECKSUM_ENV, CheckReport, check_remote
from vift.storage.remote import Remote, configure_s3_remote, get_remote, list_remotes
from vift.storage.transfer import TransferResult, pull, push

__all__ = [
    "CHECKSUM_ENV",
    "CheckReport",
    "Remote",
    "TransferResult",
    "check_remote",
    "configure_s3_remote",
    "get_remote",
    "list_remotes",
    "pull",
    "push",
]
