"""Reach an S3 remote before DVC touches it, and say in plain words what is wrong.

The check runs in this order, so each failure has one meaning:

1. the endpoint: DNS (``host not found``), then TCP (``connection refused`` / ``no answer``);
2. the credentials: present at all (environment, AWS profile, ``.dvc/config.local``);
3. the bucket: ``head_bucket`` (missing / access denied / wrong credentials / wrong region);
4. a write probe: a small object put under the prefix, read back and deleted (``--no-write-probe``
   skips it, and ``pull`` only needs read access, so it skips it too).

Every failure is a :class:`~vift.errors.UserError` naming the cause and what to do.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from vift.errors import UserError
from vift.storage.remote import Remote, as_bool, credential_source, remote_secrets

PROBE_DIR = ".vift-storage-check"
PROBE_BODY = b"vift storage check: safe to delete\n"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 20.0
CHECKSUM_ENV = {
    # boto3 >= 1.36 adds CRC checksums to every request by default; MinIO (older releases) and
    # other S3-compatible stores reject or mis-handle them. "when_required" restores the old
    # behaviour; it changes nothing on AWS.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


@dataclass
class CheckReport:
    remote: Remote
    credentials: str | None
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def compatible_store_env(remote: Remote) -> dict[str, str]:
    """Environment defaults that S3-compatible stores (a custom endpoint) need for boto3 and DVC."""
    return dict(CHECKSUM_ENV) if remote.is_s3 and remote.endpoint else {}


def apply_compatible_store_env(remote: Remote) -> None:
    """Set :data:`CHECKSUM_ENV` (unless the user set them) for this process and DVC inside it."""
    for key, value in compatible_store_env(remote).items():
        os.environ.setdefault(key, value)


def _endpoint_label(remote: Remote) -> str:
    return remote.endpoint or "AWS S3"


def check_endpoint(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """DNS and TCP reachability of ``endpoint``; raises a UserError saying which failed."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(
            f"endpoint unreachable: cannot resolve host {host!r} of {endpoint} (DNS: {error.strerror}). "
            "Check the host name in `vift storage configure --endpoint`, your network or VPN."
        ) from None
    last: OSError | None = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
            return
        except OSError as error:
            last = error
    if isinstance(last, ConnectionRefusedError):
        raise UserError(
            f"endpoint unreachable: connection refused by {host}:{port} ({endpoint}). Nothing listens there: "
            "start the S3 server (e.g. `docker compose --env-file infra/.env -f infra/docker-compose.yml up -d minio`) "
            "or fix the port with `vift storage configure --endpoint`."
        )
    if isinstance(last, (TimeoutError, socket.timeout)):
        raise UserError(
            f"endpoint unreachable: no answer from {host}:{port} within {timeout:.0f} s ({endpoint}); "
            "a firewall, VPN or wrong port is likely."
        )
    raise UserError(f"endpoint unreachable: {endpoint}: {last}")


def _session(remote: Remote):
    import boto3
    from botocore.exceptions import ProfileNotFound

    secrets = remote_secrets(remote.name)
    try:
        return boto3.Session(
            aws_access_key_id=secrets.get("access_key_id"),
            aws_secret_access_key=secrets.get("secret_access_key"),
            aws_session_token=secrets.get("session_token"),
            profile_name=remote.profile,
        )
    except ProfileNotFound as error:
        raise UserError(
            f"credentials missing: AWS profile {error.kwargs.get('profile')!r} (from the remote's `profile` or "
            "AWS_PROFILE) is not in ~/.aws/credentials or ~/.aws/config; fix the name or unset it."
        ) from None


MISSING_CREDENTIALS = (
    "credentials missing for {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
    "environment, e.g. `set -a && . ./.env && set +a`, or store them for this clone only with "
    "`vift storage configure --endpoint URL --bucket BUCKET --name {name} --local-credentials` "
    "(writes the git-ignored .dvc/config.local). Never put them in .dvc/config."
)


def _credentials(remote: Remote, session) -> None:
    from botocore.exceptions import PartialCredentialsError

    if remote.flag("allow_anonymous_login"):
        return
    try:
        credentials = session.get_credentials()
    except PartialCredentialsError as error:
        where = "the environment" if error.kwargs.get("provider") == "env" else f"credential source {error.kwargs.get('provider')!r}"
        raise UserError(
            f"credentials missing for {remote.describe()}: {where} lacks {error.kwargs.get('cred_var', 'a value')}; "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set."
        ) from None
    if credentials is None or not credentials.access_key:
        raise UserError(MISSING_CREDENTIALS.format(what=remote.describe(), name=remote.name))


def make_client(remote: Remote, session=None):
    from botocore import UNSIGNED
    from botocore.config import Config

    session = session or _session(remote)
    kwargs = dict(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    if remote.endpoint:
        kwargs.update(request_checksum_calculation="when_required", response_checksum_validation="when_required")
    if remote.flag("allow_anonymous_login"):
        kwargs["signature_version"] = UNSIGNED
    region = remote.region or session.region_name or "us-east-1"
    verify = as_bool(remote.options.get("ssl_verify"))
    return session.client("s3", endpoint_url=remote.endpoint, region_name=region, config=Config(**kwargs), verify=verify)


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", "")) if hasattr(error, "response") else ""


def explain_client_error(error, remote: Remote, action: str, client=None) -> UserError:
    """A botocore ClientError on ``action`` as a UserError in plain words."""
    code = _code(error)
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if hasattr(error, "response") else None
    where = f"bucket {remote.bucket!r} at {_endpoint_label(remote)}"
    if code in ("404", "NoSuchBucket"):
        return UserError(
            f"bucket missing: {where} does not exist. Create it with `vift storage configure --endpoint "
            f"{remote.endpoint or 'URL'} --bucket {remote.bucket} --name {remote.name} --create-bucket`, "
            "ask the storage admin, or fix the bucket name."
        )
    if code == "403" and client is not None:
        # HEAD responses carry no error code; ask again with a request whose error has a body.
        try:
            client.list_objects_v2(Bucket=remote.bucket, Prefix=remote.prefix, MaxKeys=1)
        except Exception as detail:  # noqa: BLE001 - classified below
            if _code(detail) not in ("", "403"):
                return explain_client_error(detail, remote, action)
    if code == "InvalidAccessKeyId":
        return UserError(
            f"access denied: the server at {_endpoint_label(remote)} does not know the access key id "
            f"(from {credential_source(remote) or 'the AWS credential chain'}). Use the service account's key."
        )
    if code == "SignatureDoesNotMatch":
        return UserError(
            f"access denied: the secret access key does not match the access key id "
            f"(from {credential_source(remote) or 'the AWS credential chain'}) at {_endpoint_label(remote)}."
        )
    if code in ("403", "AccessDenied", "AllAccessDisabled", "AccountProblem"):
        return UserError(
            f"access denied: the credentials (from {credential_source(remote) or 'the AWS credential chain'}) are "
            f"valid but may not {action} in {where}"
            + (f" under prefix {remote.prefix!r}" if remote.prefix else "")
            + ". Ask for s3:ListBucket, s3:GetObject, s3:PutObject (and s3:DeleteObject) on it."
        )
    if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
        return UserError(
            f"wrong region for {where}: set it with `vift storage configure ... --region REGION` "
            f"(now {remote.region or 'unset, us-east-1 assumed'})."
        )
    if code == "InvalidBucketName":
        return UserError(f"{where}: the server rejects the bucket name; fix --bucket.", exit_code=2)
    return UserError(f"{where}: {action} failed: {code or status or ''} {error}".strip())


def _call(remote: Remote, action: str, func, client=None, ok_codes: tuple[str, ...] = (), **kwargs):
    """``func(**kwargs)`` with every botocore failure turned into a UserError; ``ok_codes`` return None."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    try:
        return func(**kwargs)
    except NoCredentialsError:
        raise UserError(MISSING_CREDENTIALS.format(what=remote.describe(), name=remote.name)) from None
    except (EndpointConnectionError, ConnectTimeoutError) as error:
        raise UserError(f"endpoint unreachable: {_endpoint_label(remote)}: {error}") from None
    except ReadTimeoutError:
        raise UserError(
            f"endpoint unreachable: {_endpoint_label(remote)} accepted the connection but did not answer within "
            f"{READ_TIMEOUT:.0f} s; is it an S3 server?"
        ) from None
    except ClientError as error:
        if _code(error) in ok_codes:
            return None
        if _code(error) == "BucketAlreadyExists":
            raise UserError(f"bucket {remote.bucket!r} exists and belongs to another account; choose another --bucket") from None
        raise explain_client_error(error, remote, action, client) from None


def check_remote(remote: Remote, write_probe: bool = True) -> CheckReport:
    """Check an S3 remote end to end; a local remote only needs its folder to be writable."""
    report = CheckReport(remote, credential_source(remote))
    if not remote.is_s3:
        return _check_local(remote, report)

    if "repo" in remote.secrets_in:
        raise UserError(
            f"credentials found in .dvc/config for remote {remote.name!r}: that file is committed to git. Move them "
            f"with `vift storage configure --endpoint {remote.endpoint or 'URL'} --bucket {remote.bucket} --name {remote.name}` "
            "(it moves them to the git-ignored .dvc/config.local) and rotate the keys if they were ever pushed."
        )
    if remote.endpoint:
        check_endpoint(remote.endpoint)
        report.steps.append(f"endpoint {remote.endpoint} reachable")
    session = _session(remote)
    _credentials(remote, session)
    report.steps.append(f"credentials from {report.credentials or 'the AWS credential chain'}")
    client = make_client(remote, session)
    _call(remote, "list objects", client.head_bucket, client, Bucket=remote.bucket)
    report.steps.append(f"bucket {remote.bucket!r} exists and is readable")
    if write_probe:
        key = "/".join(filter(None, (remote.prefix, PROBE_DIR, uuid.uuid4().hex)))
        _call(remote, "write objects", client.put_object, client, Bucket=remote.bucket, Key=key, Body=PROBE_BODY)
        body = _call(remote, "read objects", client.get_object, client, Bucket=remote.bucket, Key=key)["Body"].read()
        if body != PROBE_BODY:
            raise UserError(f"{remote.describe()}: an object read back differs from what was written ({key})")
        try:
            _call(remote, "delete objects", client.delete_object, client, Bucket=remote.bucket, Key=key)
        except UserError as error:
            report.warnings.append(f"the probe object s3://{remote.bucket}/{key} could not be deleted: {error}")
        report.steps.append(f"write, read back and delete under s3://{remote.bucket}/{remote.prefix}")
    return report


def _check_local(remote: Remote, report: CheckReport) -> CheckReport:
    from pathlib import Path

    path = Path(remote.url)
    if "://" in remote.url:
        report.warnings.append(f"{remote.url}: only local and s3:// remotes are checked; DVC will reach it itself")
        return report
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        raise UserError(f"{remote.describe()}: {probe} is not writable")
    report.steps.append(f"local folder {path} " + ("exists and is writable" if path.exists() else "will be created"))
    return report


def create_bucket(remote: Remote) -> bool:
    """Create the remote's bucket; False if it exists already and is ours. Checks endpoint and credentials first."""
    if remote.endpoint:
        check_endpoint(remote.endpoint)
    session = _session(remote)
    _credentials(remote, session)
    client = make_client(remote, session)
    kwargs: dict = {"Bucket": remote.bucket}
    region = remote.region or session.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    created = _call(remote, "create buckets", client.create_bucket, client, ok_codes=("BucketAlreadyOwnedByYou",), **kwargs)
    return created is not None
