"""Storage: `vift storage configure/check/push/pull` against a real S3 HTTP endpoint (moto), and
`vift data import`.

The endpoint is moto's ThreadedMotoServer on 127.0.0.1 (storage_support.MotoEndpoint), started
and stopped per test; credentials are dummies set in the environment; every DVC command runs as a
process inside a temporary git + DVC repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from storage_support import MotoEndpoint, cache_object_count, isolated_env, verify_content_addressed

from vift.cli import main

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds, for any one command


@pytest.fixture
def endpoint(env):
    with MotoEndpoint() as server:
        yield server


def run(cmd: list, cwd: Path, extra_env: dict | None = None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env={**os.environ, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dvc(repo: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    return run([BIN / "dvc", *args], repo, **kwargs)


def vift(repo: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    return run([BIN / "vift", *args], repo, **kwargs)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory) -> Path:
    """A git + DVC repository with the project's DVC config (made once, copied per test)."""
    root = tmp_path_factory.mktemp("template") / "repo"
    root.mkdir()
    env = {**os.environ, **isolated_env(root.parent / "env", BIN)}
    for cmd in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"]):
        subprocess.run([str(c) for c in cmd], cwd=root, env=env, check=True, capture_output=True, timeout=TIMEOUT)
    # The project's DVC config: the embedded default remote `local` (.dvcstore) is the default.
    (root / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    (root / ".gitignore").write_text("/data/\n/reports/\n/blobs\n/.dvcstore/\n")
    return root


@pytest.fixture
def repo(env, tmp_path, monkeypatch, repo_template) -> Path:
    """A fresh copy of the template repository, as the working directory."""
    root = tmp_path / "repo"
    shutil.copytree(repo_template, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def bucket_name() -> str:
    return f"vift-test-{uuid.uuid4().hex[:8]}"


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def configured(repo, endpoint, capsys):
    """The repo with an S3 remote `s3` (the default) on a bucket created by configure."""
    bucket = bucket_name()
    assert cli("storage", "configure", "--endpoint", endpoint.url, "--bucket", bucket, "--create-bucket", "--default") == 0
    capsys.readouterr()
    return repo, endpoint, bucket


def add_blobs(repo: Path, count: int, size: int = 2048) -> Path:
    """``count`` files with distinct, reproducible content, tracked with `dvc add`."""
    blobs = repo / "blobs"
    blobs.mkdir()
    for index in range(count):
        (blobs / f"blob-{index:03d}.bin").write_bytes(hashlib.sha256(str(index).encode()).digest() * (size // 32))
    ok(dvc(repo, "add", "-q", "blobs"))
    return blobs


def error_of(capsys) -> str:
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# configure and check


def test_configure_writes_dvc_config_and_check_passes(configured, capsys):
    repo, endpoint, bucket = configured
    config = (repo / ".dvc" / "config").read_text()
    assert f"url = s3://{bucket}/dvc" in config and f"endpointurl = {endpoint.url}" in config
    assert "remote = s3" in config
    assert "testing" not in config and "access_key" not in config  # no credentials in the committed file
    assert not (repo / ".dvc" / "config.local").exists()
    endpoint.client().head_bucket(Bucket=bucket)  # --create-bucket made it
    # DVC itself reads what vift wrote.
    assert re.search(rf"^s3\s+s3://{bucket}/dvc", ok(dvc(repo, "remote", "list")), re.M)

    assert cli("storage", "check") == 0
    out = capsys.readouterr().out
    assert "OK" in out and "write, read back and delete" in out
    # the probe leaves nothing behind
    assert [key for key, _ in endpoint.objects(bucket)] == []
    assert cli("storage", "check", "--json", "--no-write-probe") == 0
    assert json.loads(capsys.readouterr().out)["remote"] == "s3"


def test_wrong_bucket_is_reported_as_bucket_missing(configured, capsys):
    repo, endpoint, _ = configured
    assert cli("storage", "configure", "--endpoint", endpoint.url, "--bucket", "no-such-bucket", "--name", "other") == 0
    capsys.readouterr()
    assert cli("storage", "check", "--remote", "other") == 1
    err = error_of(capsys)
    assert "bucket missing" in err and "no-such-bucket" in err and "--create-bucket" in err


def test_stopped_endpoint_is_reported_as_unreachable(configured, capsys):
    repo, endpoint, _ = configured
    endpoint.stop()
    assert cli("storage", "check") == 1
    err = error_of(capsys)
    assert "endpoint unreachable" in err and "connection refused" in err and endpoint.url in err


def test_unknown_host_is_reported_as_dns_failure(repo, capsys):
    assert cli("storage", "configure", "--endpoint", "http://no-such-host.invalid:9000", "--bucket", "vift-x") == 0
    capsys.readouterr()
    assert cli("storage", "check", "--remote", "s3") == 1
    assert "endpoint unreachable: cannot resolve host 'no-such-host.invalid'" in error_of(capsys)


def test_missing_credentials_are_reported_as_such(configured, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert cli("storage", "check") == 1
    err = error_of(capsys)
    assert "credentials missing" in err and "AWS_ACCESS_KEY_ID" in err and "--local-credentials" in err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # half of a pair
    assert cli("storage", "check") == 1
    assert "lacks AWS_SECRET_ACCESS_KEY" in error_of(capsys)


def test_access_denied_is_worded_apart_from_the_other_failures(configured):
    """S3 error codes (moto accepts any key, so these come from botocore errors built here)."""
    from botocore.exceptions import ClientError

    from vift.storage import get_remote
    from vift.storage.check import explain_client_error

    remote = get_remote("s3")

    def explain(code: str, action: str = "list objects") -> str:
        return str(explain_client_error(ClientError({"Error": {"Code": code}}, "Op"), remote, action))

    denied = explain("AccessDenied", "write objects")
    assert denied.startswith("access denied: the credentials") and "may not write objects" in denied
    assert "s3:PutObject" in denied and "prefix 'dvc'" in denied
    assert explain("InvalidAccessKeyId").startswith("access denied: the server") and "access key id" in explain("InvalidAccessKeyId")
    assert explain("SignatureDoesNotMatch").startswith("access denied: the secret access key does not match")
    assert explain("NoSuchBucket").startswith("bucket missing")
    assert explain("PermanentRedirect").startswith("wrong region")


def test_local_credentials_go_to_the_git_ignored_config_only(repo, endpoint, capsys, monkeypatch):
    bucket = bucket_name()
    args = ["storage", "configure", "--endpoint", endpoint.url, "--bucket", bucket, "--prefix", "team/dvc"]
    assert cli(*args, "--create-bucket", "--local-credentials") == 0
    assert "testing" not in (repo / ".dvc" / "config").read_text()
    local = repo / ".dvc" / "config.local"
    assert "access_key_id = testing" in local.read_text() and oct(local.stat().st_mode & 0o777) == "0o600"
    assert run(["git", "check-ignore", "-q", ".dvc/config.local"], repo).returncode == 0
    # With nothing in the environment, the check (and DVC) use .dvc/config.local.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    capsys.readouterr()
    assert cli("storage", "check", "--remote", "s3") == 0
    assert "credentials from .dvc/config.local" in capsys.readouterr().out
    assert cli(*args, "--local-credentials") == 2  # nothing to copy from the environment
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in error_of(capsys)


def test_credentials_in_the_committed_config_are_refused_then_moved(configured, capsys):
    repo, endpoint, bucket = configured
    ok(dvc(repo, "remote", "modify", "s3", "secret_access_key", "leaked"))  # the mistake: no --local
    assert cli("storage", "check") == 1
    assert "credentials found in .dvc/config" in error_of(capsys)
    assert cli("storage", "configure", "--endpoint", endpoint.url, "--bucket", bucket) == 0
    assert "moved secret_access_key" in capsys.readouterr().out
    assert "leaked" not in (repo / ".dvc" / "config").read_text()
    assert "secret_access_key = leaked" in (repo / ".dvc" / "config.local").read_text()


def test_bad_input_and_failed_bucket_creation_write_nothing(repo, endpoint, capsys):
    config = repo / ".dvc" / "config"
    before = config.read_text()
    assert cli("storage", "configure", "--endpoint", endpoint.url, "--bucket", "B") == 2
    assert cli("storage", "configure", "--endpoint", "ftp://host", "--bucket", "vift-x") == 2
    assert cli("storage", "configure", "--endpoint", endpoint.url, "--bucket", "vift-x", "--name", "local") == 2
    endpoint.stop()
    assert cli("storage", "configure", "--endpoint", endpoint.url, "--bucket", "vift-x", "--create-bucket") == 1
    assert "endpoint unreachable" in error_of(capsys)
    assert config.read_text() == before


def test_every_storage_command_has_help(capsys):
    for command in (
        ["storage"],
        ["storage", "configure"],
        ["storage", "check"],
        ["storage", "push"],
        ["storage", "pull"],
        ["storage", "remotes"],
        ["data"],
        ["data", "import"],
    ):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        assert "usage: vift" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# push / pull


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_push_and_pull_fail_cleanly_when_the_endpoint_is_down(configured):
    repo, endpoint, bucket = configured
    blobs = add_blobs(repo, 5)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    endpoint.stop()
    for verb in ("push", "pull"):
        result = vift(repo, "storage", verb)
        assert result.returncode == 1, result.stderr
        assert "endpoint unreachable: connection refused" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before  # nothing in the workspace lost
    assert "up to date" in ok(dvc(repo, "status"))


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_interrupted_push_resumes_without_duplicates_or_corruption(configured):
    repo, endpoint, bucket = configured
    blobs = add_blobs(repo, 40)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    total = cache_object_count(repo)
    assert total == 41  # 40 files + the directory listing

    endpoint.kill_after(12)  # the server dies once 12 objects are stored
    # AWS_MAX_ATTEMPTS=1: fail fast on the refused connections instead of retrying each with backoff
    interrupted = vift(repo, "storage", "push", "-j", "2", extra_env={"AWS_MAX_ATTEMPTS": "1"})
    assert endpoint.killed
    assert interrupted.returncode == 1, interrupted.stdout + interrupted.stderr
    assert "push to remote 's3'" in interrupted.stderr and "incomplete" in interrupted.stderr
    assert "endpoint stopped answering" in interrupted.stderr and "run `vift storage push` again" in interrupted.stderr
    # The workspace and the cache are untouched.
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before
    assert cache_object_count(repo) == total
    assert "up to date" in ok(dvc(repo, "status"))

    endpoint.start()  # same port, same buckets
    partial = verify_content_addressed(endpoint.objects(bucket), "dvc")  # only whole, correctly named objects
    assert 12 <= partial < total

    out = ok(vift(repo, "storage", "push"))
    pushed = int(re.search(r"(\d+) file\(s\) pushed", out).group(1))
    assert pushed == total - partial  # only the missing ones were uploaded
    objects = list(endpoint.objects(bucket))
    assert verify_content_addressed(iter(objects), "dvc") == total == len(objects)
    assert "0 file(s) pushed" in ok(vift(repo, "storage", "push"))
    assert "in sync" in ok(dvc(repo, "status", "--cloud"))


# --------------------------------------------------------------------------------------------
# vift data import


def _png(path: Path, colour: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def write_external_dataset(root: Path) -> Path:
    """LAION-style captions (LLaVA conversation records) and a VQA test split, with images."""
    root.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow"]
    with open(root / "captions.jsonl", "w") as handle:
        for index, colour in enumerate(colours):
            _png(root / "img" / f"{index}.png", colour)
            record = {
                "id": f"cap-{index}",
                "image": f"img/{index}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"A {colour} square."},
                ],
            }
            handle.write(json.dumps(record) + "\n")
    vqa = [
        {"id": f"q-{i}", "image": f"img/{i}.png", "question": "What colour is it?", "answer": c, "type": "colour"}
        for i, c in enumerate(colours)
    ]
    (root / "test.json").write_text("not a split\n")
    (root / "test.jsonl").write_text(json.dumps(vqa, indent=1))  # a JSON array works too
    (root / "calibration.jsonl").write_text("".join(json.dumps(r | {"id": f"cal-{r['id']}"}) + "\n" for r in vqa[:2]))
    text = [{"id": f"t-{i}", "conversations": [{"from": "human", "value": f"What is {i} + 1?"}, {"from": "gpt", "value": str(i + 1)}]}
            for i in range(3)]  # fmt: skip
    (root / "text_instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    return root


def test_data_import_validates_copies_and_points_the_params_at_it(tmp_path, monkeypatch, capsys):
    from vift.config import load_params
    from vift.stages import run_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIFT_TRACKING", "off")
    source = write_external_dataset(tmp_path / "external")
    assert cli("params", "use", "ci") == 0
    assert cli("data", "import", source) == 0
    out = capsys.readouterr().out
    params = load_params("params/params.yaml")
    assert params.data.source == "import"
    target = Path(params.data.import_dir)
    assert target.parent == Path("data/imported") and re.fullmatch(r"[0-9a-f]{16}", target.name)
    assert (target / "captions.jsonl").read_bytes() == (source / "captions.jsonl").read_bytes()
    assert (target / "img" / "3.png").is_file()
    assert "captions 4, text_instructions 3, calibration 2, test 4" in out and "test.json: not a split manifest" in out
    assert "backbone_text: not provided (optional; read by base" in out

    # The same content again: same folder, params untouched.
    params_bytes = Path("params/params.yaml").read_bytes()
    assert cli("data", "import", source) == 0
    assert "already uses this import" in capsys.readouterr().out
    assert Path("params/params.yaml").read_bytes() == params_bytes
    assert sorted(p.name for p in Path("data/imported").iterdir()) == [target.name]

    # Changed content: a new folder, so the `data` param changes and DVC reruns the stage.
    (source / "captions.jsonl").write_text((source / "captions.jsonl").read_text().replace("square", "tile"))
    assert cli("data", "import", source) == 0
    assert load_params("params/params.yaml").data.import_dir != str(target)

    # The data stage picks the import up.
    run_stage("data", load_params("params/params.yaml"))
    summary = json.loads(Path("data/benchmark/summary.json").read_text())
    assert summary["world"] == "import"
    assert summary["sizes"] == {"captions": 4, "text_instructions": 3, "calibration": 2, "test": 4}


def test_data_import_rejects_bad_manifests_with_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = write_external_dataset(tmp_path / "external")
    lines = (source / "captions.jsonl").read_text().splitlines()
    lines[1] = '{"id": "broken", '  # line 2: malformed JSON
    lines[2] = json.dumps(
        {
            "id": "x",
            "image": "img/missing.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "?"}],
        }
    )  # line 3: no such image
    lines.append(json.dumps({"id": "y", "conversations": [{"from": "gpt", "value": "hi"}]}))  # line 5: invalid record
    (source / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert cli("params", "use", "ci") == 0
    params_before = Path("params/params.yaml").read_bytes()

    assert cli("data", "import", source) == 2
    err = error_of(capsys)
    manifest = source / "captions.jsonl"
    assert f"{manifest}:2: malformed JSON" in err
    assert f"{manifest}:3: image not found" in err
    assert f"{manifest}:5: invalid record" in err
    assert "3 invalid record(s)" in err and "nothing was imported" in err
    assert not Path("data").exists()  # nothing written
    assert Path("params/params.yaml").read_bytes() == params_before

    assert cli("data", "import", tmp_path / "nowhere") == 2
    assert "not a directory" in error_of(capsys)

    # Accepting the loss explicitly: imported, and the data stage will skip the same records.
    assert cli("data", "import", source, "--bad-records", "skip") == 0
    assert "3 bad record(s) will be skipped" in capsys.readouterr().out
    assert yaml.safe_load(Path("params/params.yaml").read_text())["data"]["bad_records"] == "skip"
