"""The training stages: labels, modality-grouped batches, trainable parts, checkpoints, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from trainkit import (  # noqa: F401 - fixtures
    ci_base_model,
    make_workspace,
    max_weight_difference,
    model_weights,
    one_torch_thread,
    stage_report,
    subprocess_env,
    vift_command,
)
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from vift.config import apply_overrides
from vift.data.manifests import ConversationRecord, Manifest
from vift.errors import UserError
from vift.train.checkpoints import CHECKPOINTS_DIR, latest_checkpoint, prepare_checkpoints
from vift.train.collate import IGNORE_INDEX, ConversationDataset, PaddingCollator, encode_conversation
from vift.train.mixture import fraction_size, load_records
from vift.train.parts import optimizer_groups, part_of, set_trainable
from vift.train.sampler import GroupedBatchSampler, Mixture
from vift.train.stage import CAPTION_STAGE, TEXT_STAGE, VIT_STAGE, train_stage

# Resumed and uninterrupted runs replay the same arithmetic in the same order on the same machine.
RESUME_TOLERANCE = 1e-6


def mixture(ci_data, processor, text_share=0.5, instructions="text_instructions", max_length=160) -> Mixture:
    def dataset(split):
        records = list(Manifest(ci_data / f"{split}.jsonl", "conversation", ci_data))
        return ConversationDataset(records, processor, ci_data, max_length)

    return Mixture(
        {"captions": dataset("captions"), instructions: dataset(instructions)}, {"captions": 1 - text_share, instructions: text_share}
    )


# ---- labels and collation -------------------------------------------------------------------------


def test_loss_mask_covers_every_assistant_reply_and_nothing_else(tiny_lvlm):
    _, processor = tiny_lvlm
    record = ConversationRecord.model_validate(
        {
            "id": "two-turns",
            "conversations": [
                {"from": "human", "value": "What is 2 plus 3?"},
                {"from": "gpt", "value": "5"},
                {"from": "human", "value": "And twice that?"},
                {"from": "gpt", "value": "10"},
            ],
        }
    )
    sample = encode_conversation(processor, record, None, max_length=128)
    ids, labels = sample["input_ids"], sample["labels"]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    target = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert target == "5<|im_end|>\n10<|im_end|>\n"
    prompt = processor.tokenizer.decode(ids[labels == IGNORE_INDEX])
    assert "What is 2 plus 3?" in prompt and "And twice that?" in prompt and "5" not in prompt


def test_truncation_that_cuts_off_every_reply_token_is_an_error(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    record = next(iter(Manifest(ci_data / "text_instructions.jsonl", "conversation", ci_data)))
    with pytest.raises(UserError, match=f"record {record.id}: max_length 8 cuts off the whole reply"):
        encode_conversation(processor, record, None, max_length=8)


def test_text_only_batch_carries_no_image_tokens_and_no_pixel_values(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor)
    sampler = GroupedBatchSampler(mix, batch_size=8, world_size=1, num_micro_batches=20, seed=0)
    collate = PaddingCollator(processor.tokenizer.pad_token_id)
    text_batches = [b for source, b in sampler.global_micro_batches() if source.modality == "text"]
    assert text_batches
    batch = collate([mix[i] for i in text_batches[0]])
    assert "pixel_values" not in batch
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 0


def test_padding_is_dynamic_to_the_longest_sample_of_the_batch(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor)
    samples = [mix[i] for i in range(4)]
    batch = PaddingCollator(processor.tokenizer.pad_token_id)(samples)
    assert batch["input_ids"].shape[1] == max(len(s["input_ids"]) for s in samples)
    assert batch["attention_mask"].sum().item() == sum(len(s["input_ids"]) for s in samples)


# ---- modality-grouped batches -----------------------------------------------------------------------


def test_every_batch_on_every_rank_is_single_modality_and_ranks_agree_per_step(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor)
    sampler = GroupedBatchSampler(mix, batch_size=4, world_size=2, num_micro_batches=60, seed=3)
    ranks = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 60
    for step, (batch0, batch1) in enumerate(zip(*ranks)):
        modalities = {mix.source_of(i).modality for i in batch0 + batch1}
        assert len(modalities) == 1, f"micro-batch {step} mixes {modalities}"
        assert len(batch0) == len(batch1) == 4 and not set(batch0) & set(batch1)


def test_mix_ratio_holds_within_two_percent_over_a_run_and_its_first_half(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    for share in (0.5, 0.3, 0.8):
        mix = mixture(ci_data, processor, text_share=share)
        sampler = GroupedBatchSampler(mix, batch_size=4, world_size=1, num_micro_batches=200, seed=0)
        modalities = [mix.source_of(batch[0]).modality for batch in sampler]
        for part in (modalities, modalities[:100]):
            assert abs(Counter(part)["text"] / len(part) - share) <= 0.02


def test_order_is_a_function_of_the_seed(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor)
    batches = [list(GroupedBatchSampler(mix, 4, 1, 30, seed)) for seed in (0, 0, 1)]
    assert batches[0] == batches[1]
    assert batches[0] != batches[2]


def test_one_process_at_the_global_batch_sees_the_samples_two_ranks_see(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor)
    single = list(GroupedBatchSampler(mix, batch_size=8, world_size=1, num_micro_batches=25, seed=5))
    two = GroupedBatchSampler(mix, batch_size=4, world_size=2, num_micro_batches=25, seed=5)
    ranks = [list(BatchSamplerShard(two, num_processes=2, process_index=r)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single


def test_length_grouping_pads_less_than_uniform_shuffling(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor, text_share=1.0)
    sampler = GroupedBatchSampler(mix, batch_size=8, world_size=1, num_micro_batches=len(mix) // 8, seed=0)
    shuffled = torch.randperm(len(mix), generator=torch.Generator().manual_seed(0)).tolist()
    uniform = [shuffled[i : i + 8] for i in range(0, len(mix) - 7, 8)]
    collate = PaddingCollator(processor.tokenizer.pad_token_id)

    def padding_share(batches):
        masks = [collate([mix[i] for i in batch])["attention_mask"] for batch in batches]
        return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    assert padding_share(list(sampler)) < 0.5 * padding_share(uniform)


def test_every_sample_of_a_source_is_drawn_once_before_any_repeats(tiny_lvlm, ci_data):
    _, processor = tiny_lvlm
    mix = mixture(ci_data, processor, text_share=0.0)
    sampler = GroupedBatchSampler(mix, batch_size=8, world_size=1, num_micro_batches=len(mix) // 8, seed=0)
    drawn = [i for batch in sampler for i in batch]
    assert sorted(drawn) == list(range(len(drawn)))


# ---- trainable parts --------------------------------------------------------------------------------


def test_parameters_map_to_the_three_parts(tiny_lvlm):
    model, _ = tiny_lvlm
    parts = Counter(part_of(name) for name, _ in model.named_parameters())
    assert set(parts) == {"projector", "vision_tower", "language_model"}
    assert part_of("model.multi_modal_projector.linear_1.weight") == "projector"
    assert part_of("model.visual.merger.mlp.0.weight") == "projector"  # Qwen2-VL's projector sits inside `visual`
    assert part_of("model.visual.blocks.0.attn.qkv.weight") == "vision_tower"
    assert part_of("lm_head.weight") == "language_model"


def test_caption_stage_parts_leave_the_language_model_frozen(ci_params, ci_base_model):
    from vift.model.loading import load_model

    model = load_model(ci_base_model)
    counts = set_trainable(model, ci_params.train.caption.trainable)
    assert set(counts) == {"projector", "vision_tower"}
    frozen = {part_of(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"language_model"}


def test_projector_and_vision_tower_get_their_own_learning_rates(ci_params, ci_base_model):
    from vift.model.loading import load_model

    model = load_model(ci_base_model)
    stage = ci_params.train.caption.model_copy(
        update={
            "trainable": ["projector", "vision_tower", "language_model"],
            "learning_rate": 1e-4,
            "vision_learning_rate": 3e-3,
            "projector_learning_rate": 2e-2,
        }
    )
    set_trainable(model, stage.trainable)
    groups = optimizer_groups(model, stage, decay_names=set())
    rates = {g["part"]: g["lr"] for g in groups}
    assert rates == {"language_model": 1e-4, "vision_tower": 3e-3, "projector": 2e-2}
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_baseline_at_different_steps_than_the_text_stage_is_rejected(ci_params):
    with pytest.raises(UserError, match=r"vit\.max_steps \(7\) must equal text\.max_steps \(6\)"):
        apply_overrides(ci_params, {"train.vit.max_steps": 7})


def test_caption_scores_count_exact_captions_and_object_phrases():
    from vift.train.caption_check import score_captions

    references = ["red circle at top left, blue square at center.", "green triangle at bottom right."]
    generated = ["blue square at center, red circle at top left.", "green circle at bottom right, red square at center."]
    scores = score_captions(generated, references)
    assert scores["exact_match"] == 0.0  # the first is right but in the wrong order
    assert scores["phrase_precision"] == pytest.approx(2 / 4) and scores["phrase_recall"] == pytest.approx(2 / 3)
    assert scores["phrase_f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert score_captions(references, references)["exact_match"] == 1.0


# ---- checkpoints --------------------------------------------------------------------------------------


def test_a_different_run_discards_old_checkpoints_and_a_partial_one_is_ignored(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "checkpoint-3").mkdir(parents=True)
    (directory / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (directory / "checkpoint-6").mkdir()  # killed while saving: no trainer_state.json yet
    (directory / "run.json").write_text(json.dumps({"steps": 10}))
    assert prepare_checkpoints(directory, {"steps": 10}, is_main=True) == directory / "checkpoint-3"
    assert not (directory / "checkpoint-6").exists()
    assert prepare_checkpoints(directory, {"steps": 12}, is_main=True) is None
    assert latest_checkpoint(directory) is None


# ---- whole stages (ci preset, a few steps) --------------------------------------------------------------


def test_caption_stage_writes_a_complete_checkpoint_plots_and_metrics(make_workspace, monkeypatch):
    workspace, params = make_workspace("caption")
    monkeypatch.chdir(workspace)
    summary = train_stage(CAPTION_STAGE, params)

    out = workspace / "models" / "caption"
    assert {p.name for p in out.glob("*.safetensors")} == {"model.safetensors"} and not list(out.glob("*.bin"))
    AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    base, trained = model_weights(workspace / "models" / "base"), model_weights(out)
    changed = {part_of(k) for k in base if not torch.equal(base[k], trained[k])}
    assert changed == {"projector", "vision_tower"}  # the language model stayed frozen

    report = stage_report(workspace, "train_caption")
    assert report["summary"] == summary and summary["steps"] == 6 and summary["samples"] == 48
    assert summary["tokens"] > 0 and summary["final_loss"] == report["history"][-1]["loss"]
    assert [h["step"] for h in report["history"]] == [1, 2, 4, 6]
    run = stage_report(workspace, "train_caption_run")
    assert run["seconds"] > 0 and run["tokens_per_second"] > 0 and run["steps_trained"] == 6
    assert [h["step"] for h in run["history"]] == [1, 2, 4, 6] and all(h["tokens_per_second"] > 0 for h in run["history"])
    assert report["caption_quality"]["n"] == 8 and 0 <= report["caption_quality"]["phrase_f1"] <= 1
    csv = (workspace / "reports" / "plots" / "train_caption_loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss" and len(csv) == 5
    assert (workspace / "reports" / "plots" / "train_caption_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (workspace / CHECKPOINTS_DIR / "train_caption").exists()


def test_same_seed_gives_the_same_weights_and_a_byte_identical_report(make_workspace, monkeypatch):
    outputs = []
    for name in ("first", "second"):
        workspace, params = make_workspace(name)
        monkeypatch.chdir(workspace)
        train_stage(CAPTION_STAGE, params)
        outputs.append(workspace)
    first, second = outputs
    assert max_weight_difference(first / "models" / "caption", second / "models" / "caption") == 0.0
    for report in ("train_caption.json", "plots/train_caption_loss.csv"):
        assert (first / "reports" / report).read_bytes() == (second / "reports" / report).read_bytes()


def test_text_stage_mixes_text_and_caption_batches_at_the_ratio(make_workspace, monkeypatch):
    workspace, params = make_workspace("text", {"train.text.max_steps": 10, "train.vit.max_steps": 10})
    monkeypatch.chdir(workspace)
    (workspace / "models" / "caption").symlink_to(workspace / "models" / "base")
    summary = train_stage(TEXT_STAGE, params)
    mix = summary["mixture"]
    assert set(mix) == {"captions", "text_instructions"}
    assert mix["text_instructions"]["share"] == pytest.approx(0.5, abs=0.02)
    assert mix["captions"]["samples"] + mix["text_instructions"]["samples"] == summary["samples"] == 80


def test_baseline_takes_the_text_stage_step_count_when_both_run_by_epochs(make_workspace, monkeypatch):
    overrides = {f"train.{s}.{k}": v for s in ("text", "vit") for k, v in (("max_steps", -1), ("num_train_epochs", 0.25))}
    workspace, params = make_workspace("vit", overrides)
    monkeypatch.chdir(workspace)
    (workspace / "models" / "caption").symlink_to(workspace / "models" / "base")
    # 120 text instructions at share 0.5 -> 240 samples an epoch; a quarter of it in batches of 8.
    assert train_stage(VIT_STAGE, params)["steps"] == 8
    assert set(stage_report(workspace, "train_vit")["summary"]["mixture"]) == {"captions", "visual_instructions"}


def test_fraction_sizes_round_like_decimals_and_keep_at_least_one_record():
    assert fraction_size(120, 0.1) == 12  # 0.1 * 120 is 12.000000000000002 in binary
    assert fraction_size(4000, 0.25) == 1000
    assert fraction_size(7, 0.5) == 4
    assert fraction_size(3, 0.01) == 1
    assert fraction_size(0, 0.5) == 0
    assert fraction_size(120, 1.0) == 120


def test_data_fraction_trains_every_source_on_a_nested_prefix_of_its_manifest(make_workspace, monkeypatch):
    overrides = {"train.text.max_steps": 4, "train.vit.max_steps": 4, "train.data_fraction": 0.25}
    workspace, params = make_workspace("fraction", overrides)
    monkeypatch.chdir(workspace)
    (workspace / "models" / "caption").symlink_to(workspace / "models" / "base")
    quarter, half, whole = (load_records("text_instructions", "fail", f) for f in (0.25, 0.5, 1.0))
    assert (len(quarter), len(half), len(whole)) == (30, 60, 120)
    assert [r.id for r in quarter] == [r.id for r in half[:30]] == [r.id for r in whole[:30]]
    summary = train_stage(TEXT_STAGE, params)
    assert summary["data_fraction"] == 0.25
    assert {name: source["records"] for name, source in summary["mixture"].items()} == {"captions": 30, "text_instructions": 30}
    assert stage_report(workspace, "train_text")["summary"]["data_fraction"] == 0.25


def test_data_fraction_outside_zero_to_one_is_rejected_naming_the_field(ci_params):
    for bad in (0, 1.5):
        with pytest.raises(UserError, match=r"train\.data_fraction"):
            apply_overrides(ci_params, {"train.data_fraction": bad})


class PoisonWeights(TrainerCallback):
    """Makes the projector output NaN after ``after_step`` optimizer steps (a diverged run)."""

    def __init__(self, after_step: int):
        self.after_step = after_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.after_step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "multi_modal_projector" in n).fill_(float("nan"))


def test_nan_loss_stops_the_stage_with_an_error_naming_the_step(make_workspace, monkeypatch):
    workspace, params = make_workspace("nan")
    monkeypatch.chdir(workspace)
    with pytest.raises(UserError, match=r"train_caption: the loss became nan at optimizer step 3 of 6"):
        train_stage(CAPTION_STAGE, params, callbacks=[PoisonWeights(after_step=2)])
    assert not (workspace / "models" / "caption").exists()


def test_lora_stage_saves_a_plain_checkpoint_with_the_adapters_merged(make_workspace, monkeypatch):
    workspace, params = make_workspace("lora", {"train.text.lora.enabled": True, "train.text.lora.r": 4})
    monkeypatch.chdir(workspace)
    (workspace / "models" / "caption").symlink_to(workspace / "models" / "base")
    summary = train_stage(TEXT_STAGE, params)
    base, trained = model_weights(workspace / "models" / "base"), model_weights(workspace / "models" / "vift")
    # The report counts what trains: the adapters (r=4 on q/k/v/o), not the frozen weights they adapt.
    language_model = sum(v.numel() for k, v in base.items() if "language_model" in k)
    assert 0 < summary["trainable_parameters"]["language_model"] < language_model / 10
    assert trained.keys() == base.keys()  # no lora_A / lora_B / modules_to_save leftovers
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert any("self_attn.q_proj" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not any("mlp" in k and "language_model" in k for k in changed)  # LoRA touched attention only


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_stage_killed_with_sigkill_resumes_and_matches_an_uninterrupted_run(make_workspace, monkeypatch, lora):
    settings = {"max_steps": 60, "save_steps": 5, "per_device_train_batch_size": 4, "lora.enabled": lora}
    overrides = {f"train.{stage}.{key}": value for stage in ("text", "vit") for key, value in settings.items()}
    killed, params = make_workspace("killed", overrides)
    reference, _ = make_workspace("reference", overrides)
    for workspace in (killed, reference):
        (workspace / "models" / "caption").symlink_to(workspace / "models" / "base")

    process = subprocess.Popen(
        vift_command("stage", "train_text"), cwd=killed, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoints = killed / CHECKPOINTS_DIR / "train_text"
    deadline = time.monotonic() + 120
    while latest_checkpoint(checkpoints) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert still_running, f"the stage ended before a checkpoint was seen: {process.stderr.read()[-2000:]}"
    assert latest_checkpoint(checkpoints) is not None and not (killed / "models" / "vift").exists()

    monkeypatch.chdir(killed)
    resumed = train_stage(TEXT_STAGE, params)
    monkeypatch.chdir(reference)
    uninterrupted = train_stage(TEXT_STAGE, params)

    assert 0 < stage_report(killed, "train_text_run")["resumed_from_step"] < 60
    assert resumed["steps"] == uninterrupted["steps"] == 60
    assert max_weight_difference(killed / "models" / "vift", reference / "models" / "vift") <= RESUME_TOLERANCE
    assert resumed["tokens"] == uninterrupted["tokens"]
    history = stage_report(killed, "train_text")["history"]
    assert history[0]["step"] == 1 and history[-1]["step"] == 60  # the curve spans the interruption
