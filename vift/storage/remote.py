"""DVC remotes as vift sees them: read from and written to DVC's own configuration.

Everything goes through ``dvc.config.Config`` (the API behind ``dvc remote add/modify``), so the
files stay exactly what DVC expects: ``.dvc/config`` (committed: URL, endpoint, region, default
remote) and ``.dvc/config.local`` (git-ignored: credentials). Secrets are never written to
``.dvc/config`` and never printed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vift.errors import UserError

SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# S3 bucket naming rules (the subset every S3-compatible server accepts).
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9!_.*'()/-]*$")


@dataclass(frozen=True)
class Remote:
    """One DVC remote, merged over every config level; ``options`` never holds secrets."""

    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    secrets_in: tuple[str, ...] = ()  # config levels ("repo", "local", ...) that hold credentials
    is_default: bool = False

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc if self.is_s3 else ""

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.strip("/") if self.is_s3 else ""

    @property
    def endpoint(self) -> str | None:
        return self.options.get("endpointurl")

    @property
    def region(self) -> str | None:
        return self.options.get("region")

    @property
    def profile(self) -> str | None:
        return self.options.get("profile")

    def flag(self, key: str) -> bool:
        """A boolean option as DVC reads it ("true"/"false" strings included)."""
        return as_bool(self.options.get(key, False)) is True

    def describe(self) -> str:
        if not self.is_s3:
            return f"remote {self.name!r} ({self.url})"
        where = f" at {self.endpoint}" if self.endpoint else " (AWS S3)"
        return f"remote {self.name!r} ({self.url}{where})"


def as_bool(value: Any) -> bool | Any:
    """DVC config booleans arrive as strings when read unvalidated; other values pass through."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    return value


def _config(validate: bool = False):
    """DVC's configuration of the repository around the working directory."""
    from dvc.config import Config
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        dvc_dir = Repo.find_dvc_dir()
    except NotDvcRepoError:
        raise UserError(
            f"{Path.cwd()}: not inside a DVC repository; run vift from the repository root (or `git init && dvc init` a new one)"
        ) from None
    return Config(dvc_dir=dvc_dir, validate=validate)


def repo_root() -> Path:
    """The DVC repository root around the working directory."""
    return Path(_config().dvc_dir).parent


def list_remotes() -> list[Remote]:
    config = _config()
    merged = config.read()
    default = merged.get("core", {}).get("remote")
    levels_with_secrets: dict[str, list[str]] = {}
    for level in ("system", "global", "repo", "local"):
        try:
            conf = config.read(level)
        except Exception:  # noqa: BLE001 - an unreadable global config must not hide the repo's
            continue
        for name, options in conf.get("remote", {}).items():
            if any(options.get(key) for key in SECRET_KEYS):
                levels_with_secrets.setdefault(name, []).append(level)
    remotes = []
    for name, options in merged.get("remote", {}).items():
        public = {k: v for k, v in options.items() if k not in SECRET_KEYS and k != "url"}
        remotes.append(
            Remote(
                name=name,
                url=str(options.get("url", "")),
                options=public,
                secrets_in=tuple(levels_with_secrets.get(name, ())),
                is_default=name == default,
            )
        )
    return remotes


def default_remote_name() -> str | None:
    return _config().read().get("core", {}).get("remote")


def get_remote(name: str | None = None) -> Remote:
    """The remote ``name``, or DVC's default remote (``core.remote``)."""
    remotes = {remote.name: remote for remote in list_remotes()}
    if name is None:
        name = default_remote_name()
        if name is None:
            raise UserError(
                "no DVC remote is the default; pass --remote NAME, or make one the default with "
                "`vift storage configure ... --default` (remotes: " + (", ".join(remotes) or "none") + ")"
            )
    if name not in remotes:
        raise UserError(
            f"no DVC remote named {name!r} (configured: {', '.join(remotes) or 'none'}); "
            "add one with `vift storage configure --endpoint URL --bucket BUCKET --name NAME`"
        )
    return remotes[name]


def resolve_remote_name(explicit: str | None, params_file: str | Path | None) -> tuple[str | None, str]:
    """Which remote a vift storage command uses, and why: --remote, params storage.remote, DVC default."""
    if explicit:
        return explicit, "--remote"
    if params_file is not None and Path(params_file).is_file():
        from vift.config import load_params

        configured = load_params(params_file).storage.remote
        if configured:
            return configured, f"storage.remote in {params_file}"
    return None, "the DVC default remote (core.remote)"


def credential_source(remote: Remote) -> str | None:
    """Where the credentials for ``remote`` come from, in words (no secret is ever returned)."""
    if "local" in remote.secrets_in:
        return ".dvc/config.local"
    if remote.secrets_in:
        return "DVC config (" + ", ".join(remote.secrets_in) + ")"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    profile = remote.profile or os.environ.get("AWS_PROFILE")
    if profile:
        return f"AWS profile {profile!r}"
    return None


def remote_secrets(name: str) -> dict[str, str]:
    """Credentials configured for ``name`` in DVC config (for the boto3 check; never printed)."""
    merged = _config().read()
    options = merged.get("remote", {}).get(name, {})
    return {key: options[key] for key in SECRET_KEYS if options.get(key)}


# ---------------------------------------------------------------------------------------------
# configure


def validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"--endpoint {endpoint!r}: expected http(s)://HOST[:PORT], e.g. http://localhost:9000 (MinIO) "
            "or https://s3.eu-west-1.amazonaws.com",
            exit_code=2,
        )
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise UserError(f"--endpoint {endpoint!r}: give only scheme, host and port (no path or query)", exit_code=2)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UserError(f"--endpoint {endpoint!r}: the port is not a number in 1-65535", exit_code=2) from None
    return f"{parts.scheme}://{parts.netloc}"


def validate_bucket(bucket: str) -> str:
    if not BUCKET_PATTERN.match(bucket) or ".." in bucket:
        raise UserError(
            f"--bucket {bucket!r}: not a valid S3 bucket name (3-63 characters: lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit)",
            exit_code=2,
        )
    return bucket


def validate_prefix(prefix: str | None) -> str:
    prefix = (prefix or "").strip("/")
    segments = prefix.split("/") if prefix else []
    if not PREFIX_PATTERN.match(prefix) or any(part in ("", ".", "..") for part in segments):
        raise UserError(f"--prefix {prefix!r}: use letters, digits and - _ . / (no empty, '.' or '..' segments)", exit_code=2)
    return prefix


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '-' and '_'", exit_code=2)
    return name


@dataclass
class ConfigureResult:
    remote: Remote
    made_default: bool
    wrote_credentials: bool
    moved_secrets: list[str] = field(default_factory=list)
    created_bucket: bool | None = None  # None: not asked; False: it existed already


def configure_s3_remote(
    *,
    endpoint: str | None,
    bucket: str,
    prefix: str | None = None,
    name: str = "s3",
    region: str | None = None,
    make_default: bool = False,
    local_credentials: bool = False,
    create_bucket: Callable[[Remote], bool] | None = None,
) -> ConfigureResult:
    """Add or update the S3 remote ``name`` in ``.dvc/config``; credentials only in ``.dvc/config.local``.

    ``create_bucket`` (e.g. :func:`vift.storage.check.create_bucket`, passed by the command that
    asks for it) makes the bucket first and says whether it was new.
    """
    name = validate_name(name)
    bucket = validate_bucket(bucket)
    prefix = validate_prefix(prefix)
    endpoint = validate_endpoint(endpoint) if endpoint else None
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    credentials: dict[str, str] = {}
    if local_credentials:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise UserError(
                "--local-credentials copies AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment "
                "into .dvc/config.local, but " + ("neither is" if not (key or secret) else "one of them is not") + " set; "
                "export both first",
                exit_code=2,
            )
        credentials = {"access_key_id": key, "secret_access_key": secret}
        if os.environ.get("AWS_SESSION_TOKEN"):
            credentials["session_token"] = os.environ["AWS_SESSION_TOKEN"]

    config = _config()
    existing = config.read().get("remote", {}).get(name)
    if existing and not str(existing.get("url", "")).startswith("s3://"):
        raise UserError(
            f"remote {name!r} exists and is not an S3 remote ({existing.get('url')}); choose another --name",
            exit_code=2,
        )

    created: bool | None = None
    if create_bucket is not None:
        # Before anything is written: a failure here leaves the configuration untouched.
        options = {"endpointurl": endpoint, "region": region or (existing or {}).get("region")}
        created = create_bucket(Remote(name, url, {k: v for k, v in options.items() if v}))

    from dvc.config import ConfigError

    try:
        return _write_remote(config, name, url, endpoint, region, make_default, credentials, created)
    except ConfigError as error:
        raise UserError(f"DVC rejected the configuration: {error}; fix .dvc/config (or `dvc config --list`)") from None


def _write_remote(config, name, url, endpoint, region, make_default, credentials, created) -> ConfigureResult:
    # Order matters: the remote first (DVC validates that a remote has a url), then the secrets
    # into config.local, and only then are secrets removed from .dvc/config, so none is ever lost.
    repo_secrets: dict[str, str] = {}
    with config.edit("repo") as conf:
        options = conf["remote"].setdefault(name, {})
        repo_secrets = {key: options[key] for key in SECRET_KEYS if key in options}
        options["url"] = url
        if endpoint:
            options["endpointurl"] = endpoint
        else:
            options.pop("endpointurl", None)
        if region:
            options["region"] = region
        if make_default:
            conf["core"]["remote"] = name

    to_local = {**repo_secrets, **credentials}
    if to_local:
        with config.edit("local") as conf:
            conf["remote"].setdefault(name, {}).update(to_local)
        os.chmod(Path(config.files["local"]), 0o600)
    if repo_secrets:  # credentials never belong in the committed file
        with config.edit("repo") as conf:
            for key in repo_secrets:
                conf["remote"][name].pop(key, None)

    remote = get_remote(name)
    return ConfigureResult(remote, make_default, bool(credentials), list(repo_secrets), created)
