"""What the benchmarks share: candidates timed with ``torch.utils.benchmark.Timer`` in interleaved
rounds, so that drift in the machine's speed lands on every candidate alike, and the verdict line
against a target ratio.

Timer does the warm-up (its block-size estimate runs the statement first), sets the thread count
(``num_threads``) for the measurement and synchronises the accelerator at each block's ends, so a
step's queued device work is inside its time. A round measures every candidate once with
``blocked_autorange``; the order alternates between rounds (A B, B A, …) so neither side always
runs first. A ratio is the median over rounds of that round's ratio of medians.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

from torch.utils.benchmark import Timer


@dataclasses.dataclass
class Interleaved:
    """Per candidate, its seconds per call in each round (the median of that round's Timer
    measurement); plain numbers, so a measuring subprocess can hand them over as JSON."""

    rounds: dict[str, list[float]]

    def median(self, name: str) -> float:
        """Seconds per call: the median over rounds."""
        return statistics.median(self.rounds[name])

    def ratio(self, a: str, b: str) -> tuple[float, float, float]:
        """a's time over b's: (median, lowest, highest) over rounds of the round's ratio."""
        per_round = [ta / tb for ta, tb in zip(self.rounds[a], self.rounds[b], strict=True)]
        return statistics.median(per_round), min(per_round), max(per_round)

    def line(self, name: str) -> str:
        times = self.rounds[name]
        return f"{self.median(name) * 1e3:.1f} ms (rounds {min(times) * 1e3:.1f}–{max(times) * 1e3:.1f})"


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    num_threads: int,
    min_run_time: float = 1.0,
    label: str = "",
) -> Interleaved:
    """Each candidate (a call with no arguments) measured ``rounds`` times, interleaved."""
    timers = {
        name: Timer("fn()", globals={"fn": fn}, num_threads=num_threads, label=label, description=name)
        for name, fn in candidates.items()
    }
    measured: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(timers)
    for _ in range(rounds):
        for name in order:
            measured[name].append(timers[name].blocked_autorange(min_run_time=min_run_time).median)
        order.reverse()
    return Interleaved(measured)


def verdict(ratio: float, target: float, spread: tuple[float, float] | None = None) -> str:
    within = f" (rounds {spread[0]:.2f}–{spread[1]:.2f})" if spread else ""
    return f"{ratio:.2f}×{within}  (target ≤ {target}×: {'met' if ratio <= target else 'NOT met'})"
