"""How a training stage runs: in this process, or re-launched under ``accelerate launch``.

``plan_launch`` reads one stage's parameters and, when set, its accelerate config file, and returns
the command to run (or ``None`` for in-process) plus the *effective* training arguments: what will
actually happen, with the global batch spelled out. It validates the combination (file exists,
process counts agree, multi-node placeholders filled in) and never loads a model, so
``vift stage NAME --dry-run`` is instant on a laptop for a recipe meant for 8 GPUs.

The parameters file is the recipe (global batch, learning rates); the accelerate config file is the
hardware layout. Where both name the same quantity they must agree, because a silent override
would change the global batch behind the user's back.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vift.config.schema import Params, StageTrainParams
from vift.errors import UserError
from vift.paths import TRAINING_STAGES

# Set by every accelerate launcher (simple, multi-GPU/torchrun, DeepSpeed) in the children it
# starts; used to tell "I am the re-launched worker" from "I am the user's shell".
_LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchPlan:
    """What running one training stage means on this machine.

    ``command`` is ``None`` when the stage runs in the current process; otherwise it is a complete
    argv (environment assignments included, via ``env``) to run from ``cwd``.
    ``warnings`` are mismatches that do not change the global batch but deserve a look.
    """

    stage: str
    command: list[str] | None
    effective: dict[str, Any]
    cwd: Path
    warnings: list[str] = field(default_factory=list)


def _accelerate_executable() -> str:
    # The relaunch must use the accelerate of this interpreter's environment, not whatever is
    # first on PATH (dvc repro and Prefect workers do not always put the venv on PATH).
    sibling = Path(sys.executable).parent / "accelerate"
    return str(sibling) if sibling.is_file() else "accelerate"


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launched_by_accelerate(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process that ``accelerate launch`` started (so: do not relaunch again)."""
    environ = os.environ if environ is None else environ
    return any(marker in environ for marker in _LAUNCHER_MARKERS)


def should_relaunch(plan: LaunchPlan, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the caller should run ``plan.command`` instead of training in-process."""
    return plan.command is not None and not launched_by_accelerate(environ)


def _stage_params(params: Params, stage: str) -> tuple[str, StageTrainParams]:
    if stage not in TRAINING_STAGES:
        raise UserError(f"{stage!r} is not a training stage; training stages: {', '.join(TRAINING_STAGES)}", exit_code=2)
    part = TRAINING_STAGES[stage]
    return f"train.{part}", getattr(params.train, part)


def _learning_rates(train: StageTrainParams) -> dict[str, float]:
    """The rates of the parts this stage trains (the rule itself lives in vift.train.parts)."""
    from vift.train.parts import part_learning_rates

    rates = part_learning_rates(train)
    return {part: rates[part] for part in train.trainable}


def _load_accelerate_config(path: Path, field_name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        return load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        # accelerate raises ValueError for unknown keys / missing distributed_type, and the enum
        # constructors raise ValueError for unknown values.
        raise UserError(f"{field_name}: {path}: not a valid accelerate config: {error}", exit_code=2) from None
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError and friends: still the user's file
        raise UserError(f"{field_name}: {path}: cannot be read as an accelerate config: {error}", exit_code=2) from None


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _config_details(config, path_text: str) -> dict[str, Any]:
    distributed_type = str(_enum_value(config.distributed_type))
    details: dict[str, Any] = {
        "accelerate_config": path_text,
        "distributed_type": distributed_type,
        "num_machines": config.num_machines,
        "mixed_precision": _enum_value(config.mixed_precision) or "no",
    }
    if config.num_machines > 1:
        details["main_process_ip"] = config.main_process_ip
        details["main_process_port"] = config.main_process_port
    if distributed_type == "FSDP":
        fsdp = config.fsdp_config
        wrap = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
        details["fsdp"] = {
            "version": fsdp.get("fsdp_version", 1),
            "auto_wrap_policy": fsdp.get("fsdp_auto_wrap_policy"),
            "transformer_layer_cls_to_wrap": [name.strip() for name in wrap.split(",")] if wrap else [],
            "state_dict_type": fsdp.get("fsdp_state_dict_type"),
            "reshard_after_forward": fsdp.get("fsdp_reshard_after_forward"),
            "offload_params": fsdp.get("fsdp_offload_params", False),
            "activation_checkpointing": fsdp.get("fsdp_activation_checkpointing", False),
        }
    elif distributed_type == "DEEPSPEED":
        deepspeed = config.deepspeed_config
        details["deepspeed"] = {
            key: deepspeed[key]
            for key in (
                "zero_stage",
                "offload_optimizer_device",
                "offload_param_device",
                "zero3_init_flag",
                "zero3_save_16bit_model",
                "gradient_accumulation_steps",
                "gradient_clipping",
                "deepspeed_config_file",
            )
            if key in deepspeed
        }
    return details


def _check_config_against_params(config, path_text: str, section: str, train: StageTrainParams) -> list[str]:
    """Raise for disagreements that change the global batch; return the softer ones as warnings."""
    if config.num_processes not in (-1, None) and config.num_processes != train.num_processes:
        raise UserError(
            f"{section}.num_processes is {train.num_processes} but {path_text} sets num_processes: "
            f"{config.num_processes}. The global batch (per_device_train_batch_size x "
            f"gradient_accumulation_steps x num_processes) depends on it: set "
            f"{section}.num_processes={config.num_processes} or use a config with {train.num_processes} processes.",
            exit_code=2,
        )
    deepspeed_accumulation = (config.deepspeed_config or {}).get("gradient_accumulation_steps")
    if isinstance(deepspeed_accumulation, int) and deepspeed_accumulation != train.gradient_accumulation_steps:
        # accelerate lets the DeepSpeed value win over the trainer's, silently changing the batch.
        raise UserError(
            f"{section}.gradient_accumulation_steps is {train.gradient_accumulation_steps} but {path_text} sets "
            f"deepspeed_config.gradient_accumulation_steps: {deepspeed_accumulation}; remove it from the "
            f"config (the trainer's value is then used) or make them agree.",
            exit_code=2,
        )
    if config.num_machines > 1:
        ip = str(config.main_process_ip or "")
        if not ip or "change-me" in ip.lower():
            raise UserError(
                f"{path_text}: main_process_ip is {ip or 'unset'}; copy the file, set main_process_ip to the "
                f"address of the machine-rank-0 node, and point {section}.accelerate_config at the copy.",
                exit_code=2,
            )
    warnings = []
    mixed_precision = _enum_value(config.mixed_precision) or "no"
    if train.bf16 == "true" and mixed_precision != "bf16":
        warnings.append(f"{section}.bf16 is true but {path_text} sets mixed_precision: {mixed_precision}")
    if train.bf16 == "false" and mixed_precision == "bf16":
        warnings.append(f"{section}.bf16 is false but {path_text} sets mixed_precision: bf16")
    return warnings


def plan_launch(
    params: Params,
    stage: str,
    params_file: str | Path,
    *,
    workspace: str | Path | None = None,
    gpu_available: bool | None = None,
) -> LaunchPlan:
    """The launch plan for training ``stage`` (``train_caption``, ``train_text`` or ``train_vit``).

    ``params_file`` is passed on to the relaunched ``vift stage`` (it re-reads the same file).
    ``workspace`` is where relative paths (the accelerate config) resolve and where the command
    runs; default: the current directory. ``gpu_available`` defaults to ``torch.cuda.is_available()``.
    """
    section, train = _stage_params(params, stage)
    cwd = Path(workspace) if workspace is not None else Path.cwd()
    global_batch = train.per_device_train_batch_size * train.gradient_accumulation_steps * train.num_processes
    effective: dict[str, Any] = {
        "stage": stage,
        "section": section,
        "trainable": list(train.trainable),
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "num_processes": train.num_processes,
        "global_batch_size": global_batch,
        "learning_rates": _learning_rates(train),
        "max_length": train.max_length,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "lr_scheduler_type": train.lr_scheduler_type,
        "warmup_ratio": train.warmup_ratio,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "bf16": train.bf16,
        "gradient_checkpointing": train.gradient_checkpointing,
        "lora": train.lora.enabled,
        "seed": train.seed,
    }
    warnings: list[str] = []

    if train.accelerate_config is None and train.num_processes == 1:
        effective.update(launch="in-process", accelerate_config=None, distributed_type="NO")
        return LaunchPlan(stage=stage, command=None, effective=effective, cwd=cwd, warnings=warnings)

    if gpu_available is None:
        gpu_available = _gpu_available()
    command = [_accelerate_executable(), "launch"]
    if train.accelerate_config is not None:
        path_text = train.accelerate_config
        path = Path(path_text)
        resolved = path if path.is_absolute() else cwd / path
        if not resolved.is_file():
            raise UserError(
                f"{section}.accelerate_config: {path_text}: no such file (looked in {resolved.parent}); "
                f"use one of infra/accelerate/*.yaml or run `accelerate config --config_file {path_text}`",
                exit_code=2,
            )
        config = _load_accelerate_config(resolved, f"{section}.accelerate_config")
        warnings += _check_config_against_params(config, path_text, section, train)
        effective.update(_config_details(config, path_text))
        command += ["--config_file", path_text]
        if config.num_processes in (-1, None):
            # The file leaves the process count to the command line (e.g. for SLURM templates).
            command += ["--num_processes", str(train.num_processes)]
        if not gpu_available and effective["distributed_type"] != "NO":
            warnings.append(f"no CUDA device is visible here; {path_text} ({effective['distributed_type']}) needs GPUs")
        if config.num_machines > 1:
            warnings.append(
                f"{config.num_machines} machines: run the command on every node, adding --machine_rank "
                f"0..{config.num_machines - 1} (0 on {config.main_process_ip})"
            )
    elif gpu_available:
        mixed_precision = "bf16" if train.bf16 == "true" else "no"  # "auto": the trainer decides
        command += ["--multi_gpu", "--num_processes", str(train.num_processes), "--num_machines", "1"]
        command += ["--mixed_precision", mixed_precision]
        effective.update(accelerate_config=None, distributed_type="MULTI_GPU", num_machines=1, mixed_precision=mixed_precision)
    else:
        # Several CPU processes talking gloo. `accelerate launch --cpu` would start ONE process (its
        # simple launcher ignores --num_processes without mpirun); the torchrun-based launcher behind
        # --multi_gpu starts N, and ACCELERATE_USE_CPU makes each child's Accelerator pick
        # MULTI_CPU/gloo instead of believing it is alone (--cpu and --multi_gpu are exclusive).
        command = ["env", "ACCELERATE_USE_CPU=true", *command]
        command += ["--multi_gpu", "--num_processes", str(train.num_processes), "--num_machines", "1"]
        command += ["--mixed_precision", "no"]  # bf16 autocast on CPU is slow; this path is for laptops and CI
        effective.update(accelerate_config=None, distributed_type="MULTI_CPU", num_machines=1, mixed_precision="no")
    if train.accelerate_config is None:
        # Without --config_file accelerate fills unset options from the user's default config
        # (~/.cache/huggingface/accelerate); the options that shape the run are passed explicitly
        # so a leftover file there cannot change them.
        command += ["--dynamo_backend", "no"]
    command += ["-m", "vift.cli", "stage", stage, "--params", str(params_file)]
    effective["launch"] = "accelerate"
    return LaunchPlan(stage=stage, command=command, effective=effective, cwd=cwd, warnings=warnings)


def format_command(command: list[str]) -> str:
    return shlex.join(command)


def format_plan(plan: LaunchPlan) -> str:
    """A human-readable summary: how the stage runs, the command, and the effective arguments."""
    e = plan.effective
    how = "runs in this process" if plan.command is None else "launches under accelerate"
    lines = [f"stage {plan.stage} ({e['section']}): {how}"]
    if plan.command is not None:
        lines.append(f"  command:            {format_command(plan.command)}")
        lines.append(f"  run from:           {plan.cwd}")
    layout = e.get("distributed_type", "NO")
    if e.get("accelerate_config"):
        layout += f" from {e['accelerate_config']}"
    layout += f", {e['num_processes']} process(es)"
    if e.get("num_machines", 1) > 1:
        layout += f" on {e['num_machines']} machines (main {e.get('main_process_ip')}:{e.get('main_process_port')})"
    lines.append(f"  layout:             {layout}")
    if "mixed_precision" in e:
        lines.append(f"  mixed precision:    {e['mixed_precision']} (params bf16: {e['bf16']})")
    else:
        lines.append(f"  bf16:               {e['bf16']}")
    if "fsdp" in e:
        fsdp = e["fsdp"]
        lines.append(
            f"  fsdp:               v{fsdp['version']}, {fsdp['auto_wrap_policy']} "
            f"[{', '.join(fsdp['transformer_layer_cls_to_wrap'])}], {fsdp['state_dict_type']}, "
            f"reshard_after_forward={fsdp['reshard_after_forward']}, offload_params={fsdp['offload_params']}"
        )
    if "deepspeed" in e:
        lines.append("  deepspeed:          " + ", ".join(f"{k}={v}" for k, v in e["deepspeed"].items()))
    lines.append(
        f"  global batch:       {e['global_batch_size']} = {e['per_device_train_batch_size']} per device x "
        f"{e['gradient_accumulation_steps']} accumulation x {e['num_processes']} process(es)"
    )
    lines.append("  learning rates:     " + ", ".join(f"{part} {rate:g}" for part, rate in e["learning_rates"].items()))
    length = f"{e['max_steps']} steps" if e["max_steps"] > 0 else f"{e['num_train_epochs']:g} epoch(s)"
    lines.append(
        f"  schedule:           {e['lr_scheduler_type']}, warmup {e['warmup_ratio']:g}, {length}, "
        f"weight decay {e['weight_decay']:g}, max grad norm {e['max_grad_norm']:g}"
    )
    lines.append(
        f"  max length:         {e['max_length']} tokens; gradient checkpointing {e['gradient_checkpointing']}; "
        f"LoRA {e['lora']}; seed {e['seed']}"
    )
    lines += [f"  warning: {warning}" for warning in plan.warnings]
    return "\n".join(lines)
