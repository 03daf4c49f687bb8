"""One ViFT training stage, end to end: mixture, trainer, checkpoints, outputs, reports.

The three stages differ only in their ``StageSpec`` (input model, output model, which split is
mixed with captions) and their ``params.train.<section>``:

- ``train_caption``: captions only (``text_ratio`` does not apply), language model frozen by
  default; base -> caption.
- ``train_text``: text-only instructions mixed with captions at ``text_ratio``; caption -> vift.
- ``train_vit``: the baseline, visual instructions mixed with captions at the same ratio, at the
  text stage's optimizer steps and batch size; caption -> vit.

``train.data_fraction`` (all three stages) keeps the first share of each manifest's records: the
data-efficiency sweep trains on nested subsets at unchanged optimizer steps.

Checkpoints live under ``.vift/checkpoints/<stage>/`` (not in the output directory, which appears
complete or not at all). A restarted stage resumes from the newest complete checkpoint if the run
is the same (same stage parameters, step count, world size, input model and data files);
otherwise it starts over. After a successful run the checkpoints are removed.

Distributed: under ``accelerate launch`` every process runs this code; only rank 0 writes the
model, the reports and the plots. With ``num_processes`` > 1 (or an ``accelerate_config``) in the
parameters, ``vift stage <name>`` launches itself under accelerate (``vift.train.launch`` plans
the command).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from vift import paths
from vift.config.schema import Params, StageTrainParams
from vift.errors import UserError
from vift.io import atomic_directory
from vift.model.loading import check_checkpoint, load_model, load_processor
from vift.train.caption_check import caption_quality
from vift.train.checkpoints import CHECKPOINTS_DIR, checkpoint_state, files_signature, prepare_checkpoints
from vift.train.collate import PaddingCollator
from vift.train.mixture import build_mixture, count_records, resolve_steps
from vift.train.parts import apply_lora, part_learning_rates, set_trainable, trainable_counts
from vift.train.report import write_stage_report
from vift.train.sampler import GroupedBatchSampler, Mixture, epoch_samples
from vift.train.trainer import LogFinalStepCallback, StageProgressCallback, StageTrainer, final_loss

LAUNCH_DIR = Path(".vift") / "launch"
CAPTIONS = "captions"
HELDOUT = "calibration"  # held-out scenes captioned after each stage to measure perception


@dataclass(frozen=True)
class StageSpec:
    """What distinguishes one training stage from another."""

    name: str  # the DVC stage, e.g. "train_text"
    section: str  # its parameters: params.train.<section>
    input_model: Path
    output_model: Path
    instructions: str | None  # the split mixed with captions at ``text_ratio``; None: captions only
    steps_from: StageSpec | None = None  # a stage whose optimizer-step count this one must match


CAPTION_STAGE = StageSpec("train_caption", "caption", paths.BASE_MODEL, paths.CAPTION_MODEL, None)
TEXT_STAGE = StageSpec("train_text", "text", paths.CAPTION_MODEL, paths.VIFT_MODEL, "text_instructions")
VIT_STAGE = StageSpec("train_vit", "vit", paths.CAPTION_MODEL, paths.VIT_MODEL, "visual_instructions", steps_from=TEXT_STAGE)


def stage_shares(spec: StageSpec, stage_params: StageTrainParams) -> dict[str, float]:
    if spec.instructions is None:
        return {CAPTIONS: 1.0}
    return {CAPTIONS: 1.0 - stage_params.text_ratio, spec.instructions: stage_params.text_ratio}


def world_size() -> int:
    """Processes in this run: set by ``accelerate launch`` / ``torchrun``, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def stage_steps(spec: StageSpec, params: Params, mixture: Mixture, processes: int) -> int:
    """This stage's optimizer steps; a stage with ``steps_from`` takes the other stage's count."""
    if spec.steps_from is None:
        return resolve_steps(getattr(params.train, spec.section), mixture.epoch_samples(), processes)
    reference = getattr(params.train, spec.steps_from.section)
    shares = stage_shares(spec.steps_from, reference)
    loaded = {source.name: source.size for source in mixture.sources}  # e.g. captions: read already
    sizes = {
        split: loaded[split] if split in loaded else count_records(split, params.data.bad_records, params.train.data_fraction)
        for split, share in shares.items()
        if share > 0
    }
    return resolve_steps(reference, epoch_samples(sizes, shares), processes)


def bf16_enabled(setting: str) -> bool:
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return setting == "true"


def training_arguments(stage_params: StageTrainParams, steps: int, processes: int, output_dir: Path) -> TrainingArguments:
    p = stage_params
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=p.per_device_train_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler_type,
        # transformers 5 has no warmup_ratio; warmup_steps takes a count (a float < 1 would be a ratio).
        warmup_steps=math.ceil(p.warmup_ratio * steps),
        weight_decay=p.weight_decay,
        max_grad_norm=p.max_grad_norm,
        logging_steps=p.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=p.save_steps,
        # One is enough: the old checkpoint is deleted only after the new one is complete.
        save_total_limit=1,
        seed=p.seed,
        data_seed=p.seed,
        bf16=bf16_enabled(p.bf16),
        # transformers 5 renamed gradient checkpointing; frozen embeddings need the non-reentrant form.
        activation_checkpointing=p.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding",
        # Text-only micro-batches leave the projector and vision tower out of the graph (and SigLIP's
        # pooling head is never used), so DDP must look for unused parameters when they train.
        ddp_find_unused_parameters=processes > 1 and any(part != "language_model" for part in p.trainable),
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        log_level="warning",
    )


# ---- outputs -----------------------------------------------------------------------------------


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a plain transformers model: LoRA adapters merged into the weights."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


# ---- launching ---------------------------------------------------------------------------------


def relaunch(spec: StageSpec, params: Params) -> bool:
    """Run this stage under ``accelerate launch`` if its parameters ask for it; True if it did.

    ``vift.train.launch`` decides the command (and checks it against the accelerate config); the
    parameters are written to a file for the launched processes, which then train in place.
    """
    from vift.config import write_params
    from vift.train.launch import format_command, plan_launch, should_relaunch

    params_file = LAUNCH_DIR / f"{spec.name}.yaml"
    plan = plan_launch(params, spec.name, params_file)
    if not should_relaunch(plan):
        return False
    write_params(params, params_file)
    completed = subprocess.run(plan.command, cwd=plan.cwd, check=False)
    if completed.returncode:
        raise UserError(f"{spec.name}: `{format_command(plan.command)}` failed (exit {completed.returncode}); see its output above")
    return True


# ---- the stage ---------------------------------------------------------------------------------


def check_stage(spec: StageSpec, stage_params: StageTrainParams) -> None:
    if stage_params.lora.enabled and "language_model" not in stage_params.trainable:
        raise UserError(f"train.{spec.section}.lora.enabled needs language_model in train.{spec.section}.trainable", 2)
    if not spec.input_model.is_dir():
        raise UserError(f"{spec.input_model}: input model not found; run the stage that writes it first (see dvc.yaml)")
    check_checkpoint(spec.input_model)


def train_stage(spec: StageSpec, params: Params, callbacks: list[TrainerCallback] | None = None) -> dict | None:
    """Train one stage; return its summary on rank 0 (None on other ranks and in a launching parent)."""
    stage_params: StageTrainParams = getattr(params.train, spec.section)
    if relaunch(spec, params):
        return None
    started = time.perf_counter()
    check_stage(spec, stage_params)
    processor = load_processor(spec.input_model, params.model.trust_remote_code)
    model = load_model(spec.input_model, params.model.dtype, params.model.trust_remote_code)
    mixture = build_mixture(
        processor, stage_shares(spec, stage_params), stage_params.max_length, params.data.bad_records, params.train.data_fraction
    )
    processes = world_size()
    steps = stage_steps(spec, params, mixture, processes)

    checkpoint_dir = CHECKPOINTS_DIR / spec.name
    args = training_arguments(stage_params, steps, processes, checkpoint_dir)
    fingerprint = {
        "stage": spec.name,
        "params": stage_params.model_dump(mode="json"),
        "steps": steps,
        "world_size": processes,
        "input_model": files_signature(spec.input_model),
        "data": {s.name: files_signature(paths.manifest(s.name)) for s in mixture.sources},
        "data_fraction": params.train.data_fraction,
    }
    with args.main_process_first(local=False, desc=f"{spec.name}: checkpoint directory"):
        resume = prepare_checkpoints(checkpoint_dir, fingerprint, is_main=args.process_index == 0)
    resumed = checkpoint_state(resume)

    trainable = set_trainable(model, stage_params.trainable)
    if stage_params.lora.enabled:
        set_seed(stage_params.seed)  # LoRA's A matrices start random: same seed, same run
        model = apply_lora(model, stage_params)
        trainable = trainable_counts(model)
    sampler = GroupedBatchSampler(
        mixture, stage_params.per_device_train_batch_size, processes, steps * stage_params.gradient_accumulation_steps, stage_params.seed
    )
    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=mixture,
        data_collator=PaddingCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=[LogFinalStepCallback(), *(callbacks or [])],
        stage_name=spec.name,
        stage_params=stage_params,
        batch_sampler=sampler,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StageProgressCallback(spec.name))

    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - train_started

    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(trainer.model)])
    summary = None
    if args.process_index == 0:
        final = plain_model(trainer.model)
        with atomic_directory(spec.output_model) as out:
            final.save_pretrained(out)
            processor.save_pretrained(out)
        quality = caption_quality(
            final,
            processor,
            paths.manifest(HELDOUT),
            paths.manifest(CAPTIONS),
            paths.DATA_DIR,
            params.train.caption_check,
            params.train.check_batch_size,
        )
        summary = stage_summary(spec, stage_params, trainer, sampler, trainable, digests)
        summary["data_fraction"] = params.train.data_fraction
        run = run_summary(trainer, stage_params, sampler.world_size, resumed, train_seconds)
        run["stage_seconds"] = round(time.perf_counter() - started, 2)
        write_stage_report(spec.name, summary, trainer.state.log_history, {"caption_quality": quality}, run)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        print(
            f"{spec.name}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
            f"{run['tokens_per_second']:.0f} tokens/s, {run['seconds']:.1f} s training; "
            f"caption phrase F1 {quality.get('phrase_f1', float('nan')):.2f} -> {spec.output_model}"
        )
    trainer.accelerator.wait_for_everyone()
    return summary


def stage_summary(
    spec: StageSpec,
    stage_params: StageTrainParams,
    trainer: StageTrainer,
    sampler: GroupedBatchSampler,
    trainable: dict[str, int],
    digests: list[str],
) -> dict:
    """What the stage did: a function of its inputs (no timings), so the report is reproducible."""
    state = trainer.state
    global_batch = stage_params.per_device_train_batch_size * sampler.world_size * stage_params.gradient_accumulation_steps
    schedule = sampler.source_schedule()
    micro_batch = stage_params.per_device_train_batch_size * sampler.world_size
    rates = part_learning_rates(stage_params)
    return {
        "steps": state.global_step,
        "samples": state.global_step * global_batch,
        "tokens": state.num_input_tokens_seen,
        "final_loss": final_loss(state.log_history),
        "world_size": sampler.world_size,
        "per_device_train_batch_size": stage_params.per_device_train_batch_size,
        "gradient_accumulation_steps": stage_params.gradient_accumulation_steps,
        "global_batch_size": global_batch,
        "bf16": trainer.args.bf16,
        "lora": stage_params.lora.enabled,
        "trainable_parameters": trainable,
        "learning_rates": {part: rates[part] for part in trainable},
        "mixture": {
            s.name: {
                "records": s.size,
                "target_share": round(s.share, 6),
                "samples": schedule.count(number) * micro_batch,
                "share": round(schedule.count(number) / max(1, len(schedule)), 6),
            }
            for number, s in enumerate(sampler.mixture.sources)
        },
        "ranks": {"weight_digests": digests, "agree": len(set(digests)) == 1},
    }


def run_summary(trainer: StageTrainer, stage_params: StageTrainParams, processes: int, resumed: dict, seconds: float) -> dict:
    """How this invocation went: wall time and throughput of the steps it trained itself."""
    global_batch = stage_params.per_device_train_batch_size * processes * stage_params.gradient_accumulation_steps
    steps = trainer.state.global_step - resumed["global_step"]
    tokens = trainer.state.num_input_tokens_seen - resumed.get("num_input_tokens_seen", 0)
    return {
        "seconds": round(seconds, 2),
        "steps_trained": steps,
        "resumed_from_step": resumed["global_step"],
        "samples_per_second": round(steps * global_batch / seconds, 2) if seconds else 0.0,
        "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0,
    }
