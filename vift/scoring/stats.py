"""Confidence intervals and paired comparisons for accuracies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n correct the bound is exactly 0 or 1; computed, it can miss by a rounding error and
    # sit above an accuracy of 0 (or below 1), which plots as a negative error bar.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


SIGNIFICANCE = 0.05


def beyond_chance(comparison: dict, alpha: float = SIGNIFICANCE) -> bool:
    """Whether a :func:`paired_comparison` shows ``first`` better beyond chance: the paired
    bootstrap interval above 0 **and** the exact McNemar p below ``alpha``. Both, because with a
    handful of discordant items all one way (4 wins, 0 losses) the percentile bootstrap already
    excludes 0 while McNemar gives p = 0.125. A missing p counts as no evidence."""
    return comparison["ci95"][0] > 0 and comparison.get("mcnemar_p", 1.0) < alpha


def paired_comparison(first: Sequence[bool], second: Sequence[bool], samples: int, seed: int) -> dict:
    """``first`` vs ``second`` on the same items: difference, paired bootstrap 95 % CI, exact McNemar p."""
    a = np.asarray(first, dtype=float)
    b = np.asarray(second, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired comparison needs the same items in both")
    diff = a - b
    rng = np.random.default_rng(seed)
    if samples and len(diff):
        means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
        low, high = np.quantile(means, [0.025, 0.975])
    else:
        low = high = float(diff.mean()) if len(diff) else 0.0
    only_first = int(((a == 1) & (b == 0)).sum())
    only_second = int(((a == 0) & (b == 1)).sum())
    discordant = only_first + only_second
    p_value = float(scipy_stats.binomtest(only_first, discordant, 0.5).pvalue) if discordant else 1.0
    return {
        "difference": float(diff.mean()) if len(diff) else 0.0,
        "ci95": [float(low), float(high)],
        "only_first_correct": only_first,
        "only_second_correct": only_second,
        "mcnemar_p": p_value,
    }
