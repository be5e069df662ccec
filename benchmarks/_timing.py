"""Interleaved timing for the benchmarks in this folder.

These 2-core machines are noisy (the same matmul varies 3x within a run), so
every variant runs once per round, rounds repeat, and ratios are medians of
per-round ratios against a reference timed in the same round.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def interleaved(variants: dict[str, Callable[[], None]], *, rounds: int, warmup: int = 3,
                seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call for each variant; each round runs every variant once, in a shuffled order."""
    rng = random.Random(seed)
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ratio_line(label: str, num: list[float], den: list[float]) -> str:
    """Median of per-round ratios, with the 10th-90th percentile spread."""
    r = [a / b for a, b in zip(num, den, strict=False)]
    return (
        f"{label:<44} median {statistics.median(r):6.3f}   "
        f"p10-p90 {quantile(r, 0.1):.3f}-{quantile(r, 0.9):.3f}   "
        f"({statistics.median(num) * 1e3:.1f} ms / {statistics.median(den) * 1e3:.1f} ms)"
    )
