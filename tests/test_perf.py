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
        "plain_plus_two_passes_over_plain",
        "prefill_share_of_plain",
        "fused_upper_half_over_plain",
        "reference_same_batch_over_fused",
        "reference_batch_1_over_fused",
    ):
        assert 0 < out[key]["min"] <= out[key]["median"] <= out[key]["max"], key
    assert out["plain_plus_two_passes_over_plain"]["min"] > 1  # plain plus two passes costs more than plain
    assert out["settings"]["upper_half_layers"] == [2, 4]


@pytest.mark.slow
def test_the_training_benchmark_compares_the_trainer_and_grouping_against_their_strongest_baselines():
    out = _bench("train", "--steps", "2", "--warmup", "1", "--rounds", "2", "--batch-size", "4", "--records", "16", "--max-length", "96")
    for key in ("trainer_over_torch_loop", "grouped_over_dynamic", "grouped_over_fixed"):
        assert 0 < out[key]["min"] <= out[key]["median"] <= out[key]["max"], key
    assert out["padding_share"]["fixed"] >= out["padding_share"]["dynamic"] >= 0
    assert out["rounds"] == 2 and set(out["meets_floors"]) == {"trainer_over_torch_loop"}
