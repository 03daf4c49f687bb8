"""k-fold cross-validation of calibration's choice (#18 item 1): the gain over no fusion measured on
items the choice was not made on, and the option to keep no fusion without it."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from pydantic import ValidationError

from vift.config.schema import CalibrationParams
from vift.fusion.calibrate import cross_validate, search
from vift.fusion.method import NEUTRAL, FusionSpec
from vift.scoring.stats import paired_comparison

X = FusionSpec(a=1.0, b=0.0, layer_start=0, layer_end=4)
Y = FusionSpec(a=0.0, b=1.0, layer_start=0, layer_end=4)


def test_each_item_is_answered_by_the_choice_made_without_it():
    # Leave one out over 4 items. X is right on item 0 only, Y on item 1 only, no fusion on none.
    # Held out item 0, the rest choose Y (1/3 against 0), which misses item 0; held out item 1,
    # they choose X, which misses item 1; items 2 and 3 see X and Y tie and take the earlier, X,
    # which misses both. Every held-out answer is wrong although X is right on a quarter of them.
    correct = {NEUTRAL: [False] * 4, X: [True, False, False, False], Y: [False, True, False, False]}
    params = CalibrationParams(folds=4, significance=1.0)
    result = cross_validate(correct, [NEUTRAL, X, Y], NEUTRAL, params, 200, 0)
    assert result["folds"] == 4 and result["accuracy"] == 0.0 and result["difference"] == 0.0
    assert sorted(map(str, result["choices"])) == sorted(map(str, [Y, X, X, X]))
    assert result["fused_folds"] == 4


def test_folds_partition_the_items_and_depend_on_the_seed_only():
    # X is right exactly on the items of one fold: held out, that fold sees X lose nothing and gain
    # nothing on the rest, so no fusion (first of equals) answers it; every other fold chooses X.
    items = 50
    rng_folds = np.empty(items, dtype=int)
    rng_folds[np.random.default_rng(7).permutation(items)] = np.arange(items) % 5
    correct = {NEUTRAL: [False] * items, X: list(rng_folds == 2)}
    result = cross_validate(correct, [NEUTRAL, X], NEUTRAL, CalibrationParams(folds=5, significance=1.0), 200, 7)
    assert result["accuracy"] == 0.0 and result["fused_folds"] == 4 and result["choices"][2] == NEUTRAL
    other_seed = cross_validate(correct, [NEUTRAL, X], NEUTRAL, CalibrationParams(folds=5, significance=1.0), 200, 8)
    assert other_seed["accuracy"] > 0  # another seed's folds mix X's items: held out, they are right


def test_the_fold_rule_counts_the_configurations_searched():
    # X wins on 12 of 200 items and loses none. On a fold's other 160 items it keeps 7 to 12 wins:
    # McNemar p from 2**-6 down to 2**-11, below 0.05 / 2 with two configurations searched, never
    # below 0.05 / 200 = 2.5e-4 with 200: every fold keeps no fusion.
    items = 200
    correct = {NEUTRAL: [False] * items, X: [i < 12 for i in range(items)]}
    order = [NEUTRAL, X, *[FusionSpec(a=0.5, b=0.01 * k, layer_start=0, layer_end=4) for k in range(2, 200)]]
    for spec in order[2:]:
        correct[spec] = [False] * items
    lenient = cross_validate({s: correct[s] for s in order[:2]}, order[:2], NEUTRAL, CalibrationParams(), 200, 0)
    strict = cross_validate(correct, order, NEUTRAL, CalibrationParams(), 200, 0)
    assert lenient["fused_folds"] == 5 and lenient["difference"] == pytest.approx(12 / 200)
    assert strict["fused_folds"] == 0 and strict["difference"] == 0.0


def test_a_fixed_configuration_is_held_out_as_itself():
    correct = {NEUTRAL: [True, False, False, False], X: [True, True, False, True]}
    params = CalibrationParams(folds=2, search=False)
    result = cross_validate(correct, [NEUTRAL, X], X, params, 200, 0)
    assert result["choices"] == [X, X] and result["accuracy"] == 0.75
    assert result["difference"] == paired_comparison(correct[X], correct[NEUTRAL], 200, 0)["difference"] == 0.5


@pytest.mark.parametrize("folds", [0, 1])
def test_fewer_than_two_folds_is_no_cross_validation(folds):
    assert cross_validate({NEUTRAL: [True, False], X: [True, True]}, [NEUTRAL, X], NEUTRAL, CalibrationParams(folds=folds), 10, 0) is None


def test_more_folds_than_items_is_leave_one_out():
    result = cross_validate(
        {NEUTRAL: [False] * 3, X: [True] * 3}, [NEUTRAL, X], NEUTRAL, CalibrationParams(folds=10, significance=1.0), 10, 0
    )
    assert result["folds"] == 3 and result["accuracy"] == 1.0


class _NoiseCalibrator:
    """200 items; no fusion right on 100. Every other configuration is right on its own random
    half (seeded per configuration): pure noise, so its best-of-many 'gain' is luck."""

    num_layers = 4
    batches = [type("Batch", (), {"records": list(range(200))})()]

    def correct(self, spec: FusionSpec) -> list[bool]:
        if spec == NEUTRAL:
            return [i % 2 == 0 for i in range(200)]
        rng = np.random.default_rng(zlib.crc32(repr(spec).encode()))
        return list(rng.random(200) < 0.5)

    def answer_log_likelihood(self, spec: FusionSpec) -> float:
        return 0.0


class _GainCalibrator(_NoiseCalibrator):
    """As above, but additive fusion with a = 1 is right wherever no fusion is, and on 40 more items."""

    def correct(self, spec: FusionSpec) -> list[bool]:
        if spec.mode == "additive" and spec.a == 1.0 and spec.b == 0.0:
            return [i % 2 == 0 or i < 80 for i in range(200)]
        return super().correct(spec)


def _calibrate(calibrator, **overrides):
    params = CalibrationParams(
        modes=["additive", "replace"], weights=[0.0, 0.5, 1.0], layer_ranges=[(0, 4), (2, 4)], budget=30, **overrides
    )
    return search(calibrator, params, bootstrap_samples=500)


def test_a_noise_winner_shows_no_held_out_gain_and_the_held_out_gate_keeps_no_fusion():
    # Without the significance check (significance 1) the noise winner is chosen on all items...
    ungated = _calibrate(_NoiseCalibrator(), significance=1.0)
    assert ungated["calibration"]["chosen_is_neutral"] is False
    assert ungated["calibration"]["best_versus_neutral"]["difference"] > 0.03  # its in-sample "gain"
    held_out = ungated["calibration"]["cross_validated"]
    assert held_out["ci95"][0] <= 0 and held_out["mcnemar_p"] >= 0.05  # held out, no evidence of a gain
    assert held_out["kept_neutral"] is False  # reported only: the gate is off by default
    # ... and with the held-out gate on, the same search keeps no fusion and says why.
    gated = _calibrate(_NoiseCalibrator(), significance=1.0, require_held_out_gain=True)
    assert gated["calibration"]["chosen_is_neutral"] is True and gated["fusion"]["a"] == 0.0
    assert gated["calibration"]["cross_validated"]["kept_neutral"] is True
    assert gated["calibration"]["best"] == ungated["calibration"]["best"]


def test_a_real_gain_survives_cross_validation_and_the_held_out_gate():
    result = _calibrate(_GainCalibrator(), require_held_out_gain=True)
    calibration = result["calibration"]
    assert calibration["chosen_is_neutral"] is False and result["fusion"]["a"] == 1.0 and result["fusion"]["b"] == 0.0
    held_out = calibration["cross_validated"]
    assert held_out["difference"] == pytest.approx(0.2) and held_out["ci95"][0] > 0
    assert held_out["fused_folds"] == held_out["same_choice_folds"] == 5 and held_out["kept_neutral"] is False


def test_the_held_out_gate_needs_two_folds():
    with pytest.raises(ValidationError, match="require_held_out_gain needs folds >= 2"):
        CalibrationParams(folds=1, require_held_out_gain=True)
    assert _calibrate(_GainCalibrator(), folds=0)["calibration"]["cross_validated"] is None
