"""Interleaved timing: the only fair comparison on a host that throttles.

The CPU here bursts for a few seconds after idling and then slows down, so two
functions timed one after the other see different machines. We alternate
them (A B A B ...) and report medians of the per-round ratios.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def time_interleaved(fns: Sequence[Callable[[], object]], *, rounds: int = 7, warmup: int = 1) -> list[list[float]]:
    """Seconds per call of each fn, rounds × fns, alternating the fns within each round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - start)
    return samples


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (e.g. peer time / our time = our speedup)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
