"""What the benchmarks share: interleaved timing, so drift on the machine hits every side alike,
and the verdict line against a target ratio."""

from __future__ import annotations

import time
from typing import Callable


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call over ``repeats`` rounds (a, b, c, a, b, c, …), after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}×  (target ≤ {target}×: {'met' if ratio <= target else 'NOT met'})"
