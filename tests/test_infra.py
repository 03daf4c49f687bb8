"""infra/: the compose stack, the Kubernetes work-pool template, the accelerate configs, and the
launch plan that ties training stages to them.

No Docker engine or cluster is needed: files are parsed and checked against the code and against
the tools' own sources of truth (accelerate's config loader, Prefect's template machinery and
settings, MLflow's and botocore's environment variables).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from vift.errors import UserError

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
JOB_TEMPLATE = INFRA / "kubernetes" / "base-job-template.json"
ENV_EXAMPLES = [REPO / ".env.example", INFRA / ".env.example"]

# Names that look like they hold a secret: their example values must be placeholders.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|_KEY_ID$")
PLACEHOLDER = re.compile(r"^CHANGE-ME", re.IGNORECASE)
# Variables that locate the servers and storage (as opposed to HF_/ACCELERATE_ process knobs and
# vift's own VIFT_* switches, which have defaults): a deployment must provide the ones code reads.
SERVICE_PREFIXES = ("MLFLOW_", "PREFECT_", "AWS_")
# Documented variables of the postgres and minio images (no Python package to ask).
IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text())


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            pairs[key] = value
    return pairs


def _names_read_by_code() -> set[str]:
    """Environment variable names the vift package reads: literal os.environ.get / [] / os.getenv
    arguments, and module constants named ENV_* (how vift.registry.server names its knobs)."""
    literal = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")
    constant = re.compile(r"""^ENV_\w+\s*=\s*["']([A-Z][A-Z0-9_]*)["']""", re.MULTILINE)
    names = set()
    for source in (REPO / "vift").rglob("*.py"):
        text = source.read_text()
        names.update(literal.findall(text), constant.findall(text))
    return names


# Temporary-credential and profile variants are alternatives to the access keys, not locations.
CREDENTIAL_ALTERNATIVES = {"AWS_SESSION_TOKEN", "AWS_PROFILE"}


def _service_locations() -> set[str]:
    """The server and credential variables the code reads, which a deployment must set."""
    return {name for name in _names_read_by_code() if name.startswith(SERVICE_PREFIXES)} - CREDENTIAL_ALTERNATIVES


def _known_tool_variables() -> set[str]:
    """Every environment variable name MLflow, Prefect and botocore document in their own code."""
    import botocore.configprovider
    import mlflow.environment_variables as mlflow_env
    from botocore.credentials import EnvProvider
    from mlflow.cli import server as mlflow_server
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    names = set(_get_valid_setting_names(Settings))
    names |= {v.name for v in vars(mlflow_env).values() if isinstance(v, mlflow_env._EnvironmentVariable)}
    names |= {p.envvar for p in mlflow_server.params if isinstance(getattr(p, "envvar", None), str)}
    for _, env_names, *_ in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        names |= {env_names} if isinstance(env_names, str) else set(env_names or ())
    # Credentials come from EnvProvider; AWS_ENDPOINT_URL from ConfiguredEndpointProvider.
    names |= {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, "AWS_ENDPOINT_URL"}
    return names


# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_has_the_team_services(services):
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(services)


def test_every_long_running_service_has_a_healthcheck(services):
    long_running = [name for name, svc in services.items() if svc.get("restart") != "no"]
    assert "minio-init" not in long_running
    for name in long_running:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_dependencies_wait_for_health_or_completion(services):
    for name, svc in services.items():
        for dependency, spec in svc.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency == "minio-init" else "service_healthy"
            assert spec == {"condition": expected}, f"{name} -> {dependency}"
    assert set(services["prefect-worker"]["depends_on"]) == {"prefect-server", "mlflow", "minio-init"}


def test_images_are_pinned(services):
    bases = []
    for name, svc in services.items():
        if "build" in svc:
            # Compose resolves the context against the file's folder and the dockerfile against the context.
            dockerfile = INFRA / svc["build"]["context"] / svc["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            bases += re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        else:
            bases.append(svc["image"])
    assert len(bases) == len(services)
    for image in bases:
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"


def test_compose_secrets_are_required_interpolations_without_defaults(services):
    for name, svc in services.items():
        for key, value in svc.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{" + key + r":\?[^}]*\}", str(value)), f"{name}.{key}: {value!r}"


def test_env_example_defines_exactly_the_variables_compose_interpolates():
    lines = [line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("$$", "")  # $$ escapes reach the container shell, not compose
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert interpolated == set(_env_file(INFRA / ".env.example"))


def test_compose_environment_names_are_ones_the_tools_or_the_code_read(services):
    known = _known_tool_variables() | _names_read_by_code() | IMAGE_VARIABLES
    for name, svc in services.items():
        script = " ".join(svc.get("command", [])) if isinstance(svc.get("command"), list) else ""
        for key in svc.get("environment", {}):
            # minio-init's own script variables count as read where the script uses them.
            assert key in known or f"$${key}" in script, f"{name}: nobody reads {key}"


def test_worker_gets_every_service_location_the_code_reads(services):
    # VIFT_* knobs have defaults; the tools' variables locate the servers and must be set.
    read = _service_locations()
    assert "MLFLOW_TRACKING_URI" in read  # vift.settings.tracking_uri
    assert read <= set(services["prefect-worker"]["environment"])


def test_worker_talks_to_the_compose_services(services):
    env = services["prefect-worker"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"


def test_worker_polls_the_process_pool(services):
    command = services["prefect-worker"]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "vift-process"
    assert command[command.index("--type") + 1] == "process"


def test_mlflow_proxies_artifacts_to_the_bucket(services):
    command = services["mlflow"]["command"].split()
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == "s3://${S3_BUCKET:-vift}/mlartifacts"
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_servers_use_the_databases_the_init_script_creates(services):
    init_script = (INFRA / "postgres" / "initdb" / "10-create-databases.sh").read_text()
    created = re.findall(r"CREATE DATABASE (\w+);", init_script)
    mlflow_url = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    prefect_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert mlflow_url.startswith("postgresql+psycopg2://") and prefect_url.startswith("postgresql+asyncpg://")
    named = [mlflow_url.rsplit("/", 1)[1], prefect_url.rsplit("/", 1)[1]]
    assert sorted(created) == sorted(named) == ["mlflow", "prefect"]


def test_postgres_init_script_is_mounted(services):
    assert "./postgres/initdb:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]


# --- .env.example files and secrets -----------------------------------------------------------


@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_env_examples_hold_only_placeholder_secrets(path):
    values = _env_file(path)
    secrets = {key: value for key, value in values.items() if SECRET_NAME.search(key)}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    for key, value in secrets.items():
        assert PLACEHOLDER.match(value), f"{path.name}: {key} must be a CHANGE-ME placeholder, not {value!r}"
    for key, value in values.items():
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", value), f"{key} looks like a real AWS key"


def test_client_env_example_covers_what_the_code_and_tools_read():
    names = set(_env_file(REPO / ".env.example"))
    read = _service_locations()
    assert read | {"PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_REQUEST_CHECKSUM_CALCULATION"} <= names
    assert names <= _known_tool_variables() | _names_read_by_code()


def test_kubernetes_secret_example_holds_placeholders():
    secret = yaml.safe_load((INFRA / "kubernetes" / "secret.example.yaml").read_text())
    assert secret["kind"] == "Secret"
    assert secret["stringData"] and all(PLACEHOLDER.match(v) for v in secret["stringData"].values())


# --- Kubernetes work-pool template ------------------------------------------------------------


def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Render like a Kubernetes worker: Prefect's own from_template_and_values, on a configuration
    class with the fields of prefect-kubernetes' KubernetesWorkerJobConfiguration (not installed)."""
    from prefect.workers.base import BaseJobConfiguration

    class KubernetesLikeJobConfiguration(BaseJobConfiguration):
        namespace: str = "default"
        job_manifest: dict[str, Any]
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int = 60
        stream_output: bool = True

    # A client is only used to resolve block/variable references; the template has none, and
    # passing one keeps Prefect from starting an API.
    configuration = asyncio.run(KubernetesLikeJobConfiguration.from_template_and_values(template, values, client=object()))
    return configuration.model_dump()


def _container(rendered: dict[str, Any]) -> dict[str, Any]:
    return rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def test_job_template_passes_prefects_server_side_validation(template):
    from prefect.server.schemas.actions import validate_base_job_template

    assert validate_base_job_template(template) == template


def test_job_template_renders_the_gpu_request(template):
    resources = _container(_render(template, {"gpu_count": 8}))["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 8


def test_job_template_defaults_to_one_gpu_on_gpu_nodes(template):
    rendered = _render(template, {})
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    assert _container(rendered)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert rendered["namespace"] == rendered["job_manifest"]["metadata"]["namespace"] == "vift"


def test_job_template_renders_node_selector_tolerations_image_and_namespace(template):
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    rendered = _render(
        template,
        {
            "node_selector": {"gpu": "h100"},
            "tolerations": tolerations,
            "image": "registry.example.com/vift/vift-worker:1.2.3",
            "namespace": "training",
        },
    )
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == tolerations
    assert _container(rendered)["image"] == "registry.example.com/vift/vift-worker:1.2.3"
    assert rendered["job_manifest"]["metadata"]["namespace"] == "training"


def test_job_template_pod_env_wires_mlflow_prefect_and_s3(template):
    rendered = _render(template, {"s3_endpoint_url": "http://s3.local:9000"})
    env = {item["name"]: item for item in _container(rendered)["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    assert env["PREFECT_API_URL"]["value"].endswith("/api")
    assert env["AWS_ENDPOINT_URL"]["value"] == env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://s3.local:9000"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"]["value"] == "when_required"
    assert env["AWS_RESPONSE_CHECKSUM_VALIDATION"]["value"] == "when_required"


def test_job_template_reads_s3_credentials_from_the_secret(template):
    env = {item["name"]: item for item in _container(_render(template, {"s3_credentials_secret": "team-s3"}))["env"]}
    secret = yaml.safe_load((INFRA / "kubernetes" / "secret.example.yaml").read_text())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": key}
        assert key in secret["stringData"]
    assert template["variables"]["properties"]["s3_credentials_secret"]["default"] == secret["metadata"]["name"]


def test_job_template_pod_gets_every_service_location_the_code_reads(template):
    names = {item["name"] for item in _container(_render(template, {}))["env"]}
    assert _service_locations() <= names


def test_job_template_schema_rejects_a_negative_gpu_count(template):
    from prefect.utilities.schema_tools import ValidationError, validate

    with pytest.raises(ValidationError, match="gpu_count"):
        validate({"gpu_count": -1}, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)


# --- accelerate configs -------------------------------------------------------------------------


def _accelerate_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(INFRA / "accelerate" / name))


@pytest.mark.parametrize(
    ("name", "distributed_type", "processes", "machines"),
    [
        ("single_gpu.yaml", "NO", 1, 1),
        ("ddp.yaml", "MULTI_GPU", 8, 1),
        ("fsdp.yaml", "FSDP", 8, 1),
        ("deepspeed_zero3.yaml", "DEEPSPEED", 8, 1),
        ("two_node.yaml", "MULTI_GPU", 16, 2),
    ],
)
def test_accelerate_config_loads_with_accelerates_loader(name, distributed_type, processes, machines):
    config = _accelerate_config(name)
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        distributed_type,
        processes,
        machines,
    )
    assert config.mixed_precision == "bf16"


def test_fsdp_config_wraps_the_lvlm_layers_and_shards_checkpoints():
    fsdp = _accelerate_config("fsdp.yaml").fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",") == ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


def test_fsdp_wrap_classes_exist_in_transformers():
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.siglip import modeling_siglip

    for module, name in ((modeling_qwen2, "Qwen2DecoderLayer"), (modeling_siglip, "SiglipEncoderLayer")):
        assert hasattr(module, name)


def test_deepspeed_config_is_zero3_and_leaves_accumulation_to_params():
    deepspeed = _accelerate_config("deepspeed_zero3.yaml").deepspeed_config
    assert deepspeed["zero_stage"] == 3
    assert "gradient_accumulation_steps" not in deepspeed


def test_two_node_config_leaves_the_main_address_as_a_placeholder():
    config = _accelerate_config("two_node.yaml")
    assert PLACEHOLDER.match(config.main_process_ip) and config.main_process_port == 29500


# --- the launch plan ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper():
    from vift.config import load_preset

    return load_preset("paper-7b")


def _plan(params, stage, **kwargs):
    from vift.train.launch import plan_launch

    kwargs.setdefault("gpu_available", False)
    return plan_launch(params, stage, "params/params.yaml", workspace=REPO, **kwargs)


def _with(params, **stage_fields):
    """A copy of ``params`` with fields of train.text replaced."""
    changed = params.model_copy(deep=True)
    for key, value in stage_fields.items():
        setattr(changed.train.text, key, value)
    return changed


def test_paper_train_text_launches_under_fsdp_with_global_batch_128(paper):
    plan = _plan(paper, "train_text")
    assert plan.command[plan.command.index("--config_file") + 1] == "infra/accelerate/fsdp.yaml"
    assert plan.effective["global_batch_size"] == 128
    assert plan.effective["distributed_type"] == "FSDP"


def test_paper_train_caption_launches_under_ddp_with_global_batch_256(paper):
    plan = _plan(paper, "train_caption")
    assert plan.command[plan.command.index("--config_file") + 1] == "infra/accelerate/ddp.yaml"
    assert plan.effective["global_batch_size"] == 256
    assert plan.effective["distributed_type"] == "MULTI_GPU"


def test_plan_command_reruns_the_same_stage_and_params_file(paper):
    command = _plan(paper, "train_text").command
    assert Path(command[0]).name == "accelerate" and command[1] == "launch"
    assert command[command.index("-m") :] == ["-m", "vift.cli", "stage", "train_text", "--params", "params/params.yaml"]


def test_plan_reports_fsdp_details_and_learning_rates_from_params_and_file(paper):
    effective = _plan(paper, "train_text").effective
    assert effective["fsdp"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    assert effective["fsdp"]["state_dict_type"] == "SHARDED_STATE_DICT"
    assert effective["learning_rates"] == {"projector": 2e-6, "language_model": 1e-5}
    schedule = (effective["max_length"], effective["lr_scheduler_type"], effective["warmup_ratio"])
    assert schedule == (4096, "cosine", 0.03)
    assert (effective["bf16"], effective["mixed_precision"]) == ("true", "bf16")


def test_plan_reports_deepspeed_details(paper):
    effective = _plan(_with(paper, accelerate_config="infra/accelerate/deepspeed_zero3.yaml"), "train_text").effective
    assert effective["distributed_type"] == "DEEPSPEED"
    assert effective["deepspeed"]["zero_stage"] == 3


def test_single_process_without_config_runs_in_process(ci_params):
    plan = _plan(ci_params, "train_text")
    assert plan.command is None
    assert plan.effective["launch"] == "in-process"


def test_two_cpu_processes_without_config_use_the_torchrun_launcher_on_cpu(ci_params):
    command = _plan(_with(ci_params, num_processes=2), "train_text").command
    # `accelerate launch --cpu` would start one process; see vift/train/launch.py.
    assert command[:2] == ["env", "ACCELERATE_USE_CPU=true"]
    assert "--multi_gpu" in command and "--cpu" not in command and "--config_file" not in command
    assert command[command.index("--num_processes") + 1] == "2"


def test_missing_accelerate_config_is_a_user_error_naming_field_and_path(paper):
    with pytest.raises(UserError, match=r"train\.text\.accelerate_config: infra/accelerate/nope\.yaml: no such file"):
        _plan(_with(paper, accelerate_config="infra/accelerate/nope.yaml"), "train_text")


def test_process_count_disagreeing_with_the_config_is_a_user_error(paper):
    expected = r"train\.text\.num_processes is 4 but infra/accelerate/fsdp\.yaml sets num_processes: 8"
    with pytest.raises(UserError, match=expected):
        _plan(_with(paper, num_processes=4), "train_text")


def test_deepspeed_accumulation_overriding_params_is_a_user_error(paper, tmp_path):
    config = yaml.safe_load((INFRA / "accelerate" / "deepspeed_zero3.yaml").read_text())
    config["deepspeed_config"]["gradient_accumulation_steps"] = 8
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"deepspeed_config\.gradient_accumulation_steps: 8"):
        _plan(_with(paper, accelerate_config=str(path)), "train_text")


def test_two_node_config_with_placeholder_address_is_a_user_error(paper):
    params = _with(paper, accelerate_config="infra/accelerate/two_node.yaml", num_processes=16)
    with pytest.raises(UserError, match="main_process_ip"):
        _plan(params, "train_text")


def test_non_training_stage_is_a_user_error(paper):
    with pytest.raises(UserError, match="not a training stage"):
        _plan(paper, "evaluate")


def test_format_plan_shows_command_layout_and_batch(paper):
    from vift.train.launch import format_plan

    text = format_plan(_plan(paper, "train_text"))
    assert "--config_file infra/accelerate/fsdp.yaml" in text
    assert "global batch:       128 = 4 per device x 4 accumulation x 8 process(es)" in text
    assert "Qwen2DecoderLayer, SiglipEncoderLayer" in text


def test_no_relaunch_from_inside_a_launched_process(paper):
    from vift.train.launch import should_relaunch

    plan = _plan(paper, "train_text")
    assert should_relaunch(plan, environ={})
    assert not should_relaunch(plan, environ={"LOCAL_RANK": "0", "ACCELERATE_DYNAMO_BACKEND": "NO"})


def test_cli_dry_run_prints_without_running_the_stage(tmp_path, monkeypatch, capsys):
    from vift.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["params", "use", "ci"]) == 0
    capsys.readouterr()
    assert main(["stage", "data", "--dry-run"]) == 0
    assert "stage data: runs in this process" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()


def test_cli_dry_run_prints_the_training_launch_plan(tmp_path, monkeypatch, capsys):
    from vift.cli import main

    monkeypatch.chdir(REPO)  # the preset's accelerate_config paths are relative to the workspace
    params_file = tmp_path / "params.yaml"
    assert main(["params", "use", "paper-7b", "--params", str(params_file)]) == 0
    capsys.readouterr()
    assert main(["stage", "train_text", "--dry-run", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert f"--config_file infra/accelerate/fsdp.yaml -m vift.cli stage train_text --params {params_file}" in out
    assert "global batch:       128" in out


@pytest.mark.slow
def test_cpu_launch_command_starts_two_gloo_processes(ci_params, tmp_path):
    """The planned CPU command really gives 2 ranks of one gloo group (not 2 lone processes)."""
    import os
    import subprocess

    (tmp_path / "probe_ranks.py").write_text(
        "import torch\nfrom accelerate import Accelerator\na = Accelerator()\n"
        "total = a.reduce(torch.tensor([a.process_index + 1.0]), reduction='sum').item()\n"
        "open(f'rank{a.process_index}.txt', 'w').write(f'rank {a.process_index}/{a.num_processes} {a.distributed_type.value} {a.state.backend} {total:g}')\n"
        # tear the gloo group down before exit: left to interpreter shutdown it sometimes aborts
        "a.wait_for_everyone()\ntorch.distributed.destroy_process_group()\n"
    )
    import socket

    with socket.socket() as probe:  # a free rendezvous port: 29500 may be taken by a parallel run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = _plan(_with(ci_params, num_processes=2), "train_text").command
    command = command[: command.index("-m")] + ["--main_process_port", str(port), "-m", "probe_ranks"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == [
        "rank 0/2 MULTI_CPU gloo 3",
        "rank 1/2 MULTI_CPU gloo 3",
    ]
