"""``StageTrainer``: transformers' Trainer with our batches, optimizer groups and loss guard.

What differs from the stock Trainer, each through an overridable method of transformers 5:
- ``get_train_dataloader``: batches come from ``GroupedBatchSampler`` (one source per batch), not
  from a random sampler; accelerate shards them over processes.
- ``create_optimizer``: one parameter group per trainable part, each with its learning rate.
- ``training_step``: a non-finite loss stops the stage with a ``UserError`` naming the step, on
  every rank at once (so no rank waits forever on a collective the others never reach).
- ``_save`` / ``_issue_warnings_after_load``: checkpoints that a resume really restores (see
  ``_save``), and a resume that fails loudly when a checkpoint does not fit the model.

Progress is visible: every log entry gets tokens/s (``StageTrainer.log``), ``StageProgressCallback``
shows loss and tokens/s on the tqdm bar, and ``LogFinalStepCallback`` logs the last step.
"""

from __future__ import annotations

import math
import os
import time

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from vift.config.schema import StageTrainParams
from vift.errors import UserError
from vift.train.parts import optimizer_groups
from vift.train.sampler import GroupedBatchSampler


class StageTrainer(Trainer):
    """A Trainer for one ViFT stage; see the module docstring for what differs from the stock one."""

    def __init__(
        self,
        *args,
        stage_name: str,
        stage_params: StageTrainParams,
        batch_sampler: GroupedBatchSampler,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.stage_name = stage_name
        self.stage_params = stage_params
        self.batch_sampler = batch_sampler
        self._train_started = time.perf_counter()
        self._throughput_mark: tuple[float, int] | None = None

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.model
            decay = set(self.get_decay_parameter_names(model))
            groups = optimizer_groups(model, self.stage_params, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.args.world_size > 1:
            finite = self.accelerator.gather(finite)
        if not bool(finite.min()):
            step = self.state.global_step + 1
            # After the gather every rank stops; only a rank whose own loss is bad can name its value.
            value = "non-finite on another rank" if bool(torch.isfinite(loss.detach())) else loss.item()
            raise UserError(
                f"{self.stage_name}: the loss became {value} at optimizer step {step} of "
                f"{self.state.max_steps}; training stopped. Lower the learning rates in "
                f"train.{self.stage_name.removeprefix('train_')} or check the data; the last good "
                f"checkpoint, if any, is in {self.args.output_dir}."
            )
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save a checkpoint's weights in the model's own parameter names.

        transformers 5 saves LLaVA-family models under their original hub names by default, but
        reloads a checkpoint on resume with a plain ``load_state_dict``, which then matches nothing
        and silently keeps the stage's input weights. The final model is saved separately, in the
        hub layout. PEFT models keep their own path (adapter weights).
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PreTrainedModel):
            super()._save(output_dir, state_dict)
            return
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _issue_warnings_after_load(self, load_result) -> None:
        """A resumed model must match its checkpoint exactly; the Trainer would only warn."""
        tensors = self.accelerator.unwrap_model(self.model).state_dict()
        missing = set(load_result.missing_keys)
        loaded_storage = {tensors[k].data_ptr() for k in tensors if k not in missing}
        # A tied weight (the LM head sharing the embeddings) is not saved twice: it is loaded with its twin.
        missing = sorted(k for k in missing if tensors[k].data_ptr() not in loaded_storage)
        if missing or load_result.unexpected_keys:
            raise UserError(
                f"{self.stage_name}: the checkpoint in {self.args.output_dir} does not match the model "
                f"(missing {missing[:3]}, unexpected {list(load_result.unexpected_keys)[:3]}); delete that "
                "directory to start the stage over"
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``tokens_per_second``: non-padding tokens of all ranks per second since the last log.

        Done here rather than in a callback because the Trainer records ``logs`` in its history
        before callbacks see them.
        """
        if "loss" in logs:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            # The Trainer's own count at the start of this session (non-zero after a resume).
            start = (self._train_started, getattr(self, "_initial_num_input_tokens_seen", 0))
            last_time, last_tokens = self._throughput_mark or start
            if now > last_time:
                logs["tokens_per_second"] = round((tokens - last_tokens) / (now - last_time), 1)
            self._throughput_mark = (now, tokens)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._train_started = time.perf_counter()
        self._throughput_mark = None
        return super().train(*args, **kwargs)


class LogFinalStepCallback(TrainerCallback):
    """Logs the last step too, so that a report's final loss is the loss at the end of training."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class StageProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar, named after the stage, with the latest loss, learning rate and tokens/s."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.description)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs):
            return
        postfix = {"loss": f"{logs['loss']:.4f}"}
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "tokens_per_second" in logs:
            postfix["tok/s"] = f"{logs['tokens_per_second']:.0f}"
        self.training_bar.set_postfix(postfix, refresh=True)


def final_loss(log_history: list[dict]) -> float:
    """The last logged training loss (NaN if none was logged)."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else math.nan
