"""Timing that cannot flatter: candidates interleaved round by round, ratios paired within a round.

A shared machine speeds up and slows down over seconds; timing one configuration as a block and
another later compares two machines. Here every round runs every candidate once (the order rotates
from round to round), after warm-up rounds that are thrown away; a ratio is taken per round
(numerator and denominator measured seconds apart) and reported as the median with its range.
pytest-benchmark and pyperf time one function at a time, so this small piece is written here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one list entry per measured round."""
    if rounds < 1 or warmup < 0:
        raise ValueError("rounds must be at least 1 and warmup at least 0")
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:  # rotated: no candidate always runs first or last
            started = time.perf_counter()
            candidates[name]()
            elapsed = time.perf_counter() - started
            if index >= warmup:
                times[name].append(elapsed)
    return times


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits), "max": round(max(values), digits)}


def paired_ratio(numerator: list[float], denominator: list[float], digits: int = 3) -> dict[str, float]:
    """Per-round ratios numerator / denominator: median, min and max."""
    return spread([n / d for n, d in zip(numerator, denominator, strict=True)], digits)
