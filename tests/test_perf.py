"""The speed benchmarks: interleaved rounds, paired ratios, and both commands end to end at toy size
(their figures are recorded in docs/BENCHMARKS.md, never asserted on here)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vift.perf.timing import interleaved, paired_ratio, spread

BIN = Path(sys.executable).parent


def test_rounds_interleave_every_candidate_in_a_rotating_order_after_the_warm_up():
    calls = []
    times = interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}, rounds=3, warmup=1
    )
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}  # warm-up dropped


def test_ratios_are_paired_within_a_round_not_taken_between_medians():
    # A machine that slows down 10x in round 2: paired ratios stay 2, medians of each side would not.
    assert paired_ratio([2.0, 20.0, 2.0], [1.0, 10.0, 1.0]) == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_a_slower_candidate_measures_slower():
    times = interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, rounds=3, warmup=0)
    assert paired_ratio(times["slow"], times["fast"])["min"] > 1


def _bench(*args: str) -> dict:
    result = subprocess.run([BIN / "vift", "bench", *args, "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_the_fusion_benchmark_reports_paired_ratios_against_its_baselines():
    out = _bench("fusion", "--preset", "ci", "--batch-size", "4", "--new-tokens", "2", "--rounds", "2")
    assert out["settings"]["batch_size"] == 4 and out["settings"]["new_tokens"] == 2 and out["settings"]["rounds"] == 2
    assert out["settings"]["image_tokens"] == 4  # ci: 32 px at patch 16
    for key in (
        "fused_over_plain",
        "fused_over_plain_in_fused_layout",
        "plain_in_fused_layout_over_plain",
        "fused_over_plain_split_prefill",
        "plain_split_prefill_over_plain",
        "plain_plus_two_passes_over_plain",
        "prefill_share_of_plain",
        "fused_upper_half_over_plain",
        "reference_same_batch_over_fused",
        "reference_batch_1_over_fused",
    ):
        assert 0 < out[key]["min"] <= out[key]["median"] <= out[key]["max"], key
    assert out["plain_plus_two_passes_over_plain"]["min"] > 1  # plain plus two passes costs more than plain
    assert out["settings"]["upper_half_layers"] == [2, 4]
    peaks = out["peak_memory_bytes"]
    assert out["peak_memory_measure"].startswith("CPU:") and set(peaks) == {"plain", "plain_split_prefill", "fused", "fused_upper_half"}
    assert all(value > 0 for value in peaks.values())
    assert out["fused_peak_memory_over_plain"] == pytest.approx(peaks["fused"] / peaks["plain"], abs=1e-4)


def test_the_cpu_peak_memory_of_a_call_is_what_it_holds_at_its_worst_moment_not_the_process_peak():
    import torch

    from vift.perf.memory import available, peak_growth_bytes

    assert available()  # Linux and glibc, as CI

    def two_blocks():  # 64 MiB, then 64 MiB more while the first is alive: 128 MiB at the peak
        first = torch.ones(16 << 20)
        second = first * 2
        del first, second

    def one_block_at_a_time():
        for _ in range(2):
            block = torch.ones(16 << 20)
            del block

    for fn in (two_blocks, one_block_at_a_time):
        fn()  # the warm-up the benchmark runs too
    assert peak_growth_bytes(two_blocks) == pytest.approx(128 << 20, rel=0.05)
    assert peak_growth_bytes(one_block_at_a_time) == pytest.approx(64 << 20, rel=0.05)  # freed memory is returned, then reused
    assert peak_growth_bytes(lambda: None) < 4 << 20


@pytest.mark.slow
def test_the_training_benchmark_compares_the_trainer_and_grouping_against_their_strongest_baselines():
    out = _bench("train", "--steps", "2", "--warmup", "1", "--rounds", "2", "--batch-size", "4", "--records", "16", "--max-length", "96")
    for key in ("trainer_over_torch_loop", "grouped_over_dynamic", "grouped_over_fixed"):
        assert 0 < out[key]["min"] <= out[key]["median"] <= out[key]["max"], key
    assert out["padding_share"]["fixed"] >= out["padding_share"]["dynamic"] >= 0
    assert out["rounds"] == 2 and set(out["meets_floors"]) == {"trainer_over_torch_loop"}


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_at_toy_size_on_cpu_and_counts_flops_as_documented():
    out = _bench("gpu", "--size", "tiny", "--device", "cpu", "--image-size", "32", "--batch-size", "2", "--new-tokens", "2",
                 "--train-batch-size", "2", "--max-length", "32", "--train-steps", "1", "--warmup", "1", "--rounds", "1",
                 "--peak-tflops", "0.5")  # fmt: skip
    assert out["settings"]["device"] == "cpu" and out["settings"]["image_tokens"] == 4 and out["settings"]["peak_bf16_tflops"] == 0.5
    for kind in ("text", "image"):
        figures = out["training"][kind]
        assert figures["seconds_per_step"] > 0 and figures["tokens_per_second"] == pytest.approx(64 / figures["seconds_per_step"], rel=1e-2)
        assert figures["mfu"] == pytest.approx(figures["model_tflops_per_second"] / 0.5, abs=1.1e-3)  # both rounded
    generation = out["generation"]
    assert generation["settings"]["batch_size"] == 2
    assert generation["peak_memory_measure"].startswith("CPU: peak resident memory during the call above")
    assert set(generation["peak_memory_bytes"]) == {"plain", "plain_split_prefill", "fused", "fused_upper_half"}
    assert 0 < generation["fused_over_plain"]["median"] and generation["compute_floor_over_plain"] > 1


def test_training_flops_are_six_n_per_token_plus_attention_plus_the_frozen_towers_forward():
    from vift.config.schema import TinyModelParams
    from vift.model.tiny import build_tiny_lvlm
    from vift.perf.gpu import peak_tflops, training_flops

    model, _ = build_tiny_lvlm(TinyModelParams(), 32, ["a small corpus of words"] * 4)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    language = count(model.model.language_model) + count(model.model.multi_modal_projector)
    text = model.config.get_text_config()
    per_token = 6 * language + 12 * text.num_hidden_layers * text.hidden_size * 64
    assert training_flops(model, 2, 64, 0) == 2 * 64 * per_token
    assert training_flops(model, 2, 64, 4) == 2 * 64 * per_token + 2 * count(model.model.vision_tower) * 2 * 4
    assert peak_tflops("NVIDIA H200", None) == 989.0 and peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert peak_tflops("cpu", None) is None and peak_tflops("anything", 12.5) == 12.5
