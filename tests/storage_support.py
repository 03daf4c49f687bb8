"""A real S3-compatible HTTP endpoint for tests: moto's ``ThreadedMotoServer`` on 127.0.0.1.

Needs the ``dev`` extra (``moto[server]``). The server can be stopped (the port then refuses
connections, like a dead MinIO), restarted on the same port with the buckets intact (moto keeps
its state in this process), and armed to die after N object uploads, to interrupt a push half-way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Tripwire:
    """WSGI middleware: after ``limit`` object PUTs, drop every connection and stop the server."""

    def __init__(self, app, endpoint: MotoEndpoint):
        self.app = app
        self.endpoint = endpoint
        self.limit: int | None = None
        self.uploads = 0
        self.tripped = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if self.tripped.is_set():
            with contextlib.suppress(OSError):
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)  # the client sees a dead server
            start_response("503 Service Unavailable", [("Connection", "close"), ("Content-Length", "0")])
            return [b""]
        response = self.app(environ, start_response)
        if environ.get("REQUEST_METHOD") == "PUT" and "/files/md5/" in environ.get("PATH_INFO", ""):
            with self._lock:
                self.uploads += 1
                trip = self.limit is not None and self.uploads >= self.limit and not self.tripped.is_set()
                if trip:
                    self.tripped.set()
            if trip:
                threading.Thread(target=self.endpoint.stop, daemon=True).start()
        return response


class MotoEndpoint:
    """``start()``, ``stop()``, ``start()`` again on the same port; ``url``; ``client()``; ``kill_after(n)``."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._tripwire: _Tripwire | None = None
        self._lock = threading.Lock()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> MotoEndpoint:
        from moto.server import ThreadedMotoServer

        with self._lock:
            if self._server is None:
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                server.start()
                wsgi = server._server  # the werkzeug server; wrap its app to count and cut uploads
                self._tripwire = _Tripwire(wsgi.app, self)
                wsgi.app = self._tripwire
                self._server = server
        return self

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.stop()
            server._server.server_close()  # close the listening socket: new connections are refused

    def kill_after(self, uploads: int) -> None:
        """Die (drop connections, refuse new ones) once ``uploads`` more DVC objects were stored."""
        assert self._tripwire is not None, "start() first"
        self._tripwire.uploads = 0
        self._tripwire.limit = uploads

    @property
    def killed(self) -> bool:
        return bool(self._tripwire and self._tripwire.tripped.is_set())

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def objects(self, bucket: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()

    def __enter__(self) -> MotoEndpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def verify_content_addressed(objects: Iterator[tuple[str, bytes]], prefix: str) -> int:
    """Every object under ``<prefix>/files/md5/`` must hash to its key; returns how many there are."""
    count = 0
    root = f"{prefix.strip('/')}/files/md5/" if prefix.strip("/") else "files/md5/"
    for key, body in objects:
        if not key.startswith(root):
            continue
        expected = key[len(root) :].replace("/", "")
        expected = expected.removesuffix(".dir")
        actual = hashlib.md5(body).hexdigest()
        if actual != expected:
            raise AssertionError(f"{key}: content md5 {actual} does not match its key")
        count += 1
    return count


def cache_object_count(repo: Path) -> int:
    """Objects in the repository's DVC cache (``files/md5``; the run cache is never pushed by default)."""
    return sum(1 for p in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*") if p.is_file())


# Variables that could point a test at real AWS accounts or another endpoint: removed.
CLEARED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "MLFLOW_TRACKING_URI",
)


def isolated_env(tmp: Path, bin_dir: Path) -> dict[str, str]:
    """Environment for tests: dummy credentials, no AWS config files or instance metadata, DVC's
    global/site dirs inside ``tmp``, stage tracking off, ``bin_dir`` (the venv) first on PATH."""
    import os

    global_dir = tmp / "dvc-global"
    global_dir.mkdir(parents=True, exist_ok=True)
    (global_dir / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "DVC_GLOBAL_CONFIG_DIR": str(global_dir),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "true",
        "VIFT_TRACKING": "off",
        "GIT_AUTHOR_NAME": "vift-tests",
        "GIT_AUTHOR_EMAIL": "tests@vift.invalid",
        "GIT_COMMITTER_NAME": "vift-tests",
        "GIT_COMMITTER_EMAIL": "tests@vift.invalid",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
