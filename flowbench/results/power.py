"""Seeds needed: the power of a paired comparison over seeds, and the seeds it would take.

A paired comparison of two models is a one-sample t-test on the per-seed differences a − b
(``scipy.stats.ttest_rel``), so its power is the one-sample t-test's: under a true difference δ
with standard deviation σ over seeds, the t statistic of n seeds follows scipy's noncentral t with
n − 1 degrees of freedom and noncentrality δ/σ·√n, and the test rejects (two-sided, at ``ALPHA`` per
comparison, before the multiple-comparison correction, which only asks for more) beyond the central
t's quantile. Both tails are taken as upper tails (``nct.sf`` at ±δ): the lower tail's ``nct.cdf``
is NaN for large noncentralities, as is statsmodels' ``TTestPower`` built on it (tests/results/
test_curves.py checks against it where it is defined, and against a Monte-Carlo estimate).
The standard deviation is the sweep's own, observed over its seeds.
"""

from __future__ import annotations

import math

import pandas as pd

from flowbench.results.table2 import ALPHA

TARGET_POWER = 0.8
DETECT_BPD = 0.01  # bits/dim: the precision papers report, the default difference to detect
MIN_SEEDS = 2  # a paired t-test needs two pairs


def power(difference: float, sd: float, n_seeds: int, alpha: float = ALPHA) -> float:
    """The probability that ``n_seeds`` paired seeds show ``difference`` (two-sided, at ``alpha``)
    when the differences over seeds spread with standard deviation ``sd``; NaN when undefined."""
    if n_seeds < MIN_SEEDS or not math.isfinite(sd) or not math.isfinite(difference):
        return math.nan
    if sd == 0:  # identical differences on every seed: any non-zero difference is certain
        return 1.0 if difference else alpha
    from scipy import stats  # here: the spec (in every trial's process) imports this module's defaults

    df, shift = n_seeds - 1, difference / sd * math.sqrt(n_seeds)
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift))


def seeds_for(difference: float, sd: float, target: float = TARGET_POWER, alpha: float = ALPHA) -> float:
    """The fewest seeds whose paired t-test has ``target`` power for ``difference`` at ``sd``: an
    integer as a float, inf for a zero difference, NaN when ``sd`` is unknown."""
    if not math.isfinite(sd) or not math.isfinite(difference):
        return math.nan
    if difference == 0:
        return math.inf
    # power grows with the seeds: double until it is reached, then bisect to the fewest (statsmodels'
    # solve_power gives up on root-finding where the power at two seeds is already near the target)
    low, high = MIN_SEEDS - 1, MIN_SEEDS
    while power(difference, sd, high, alpha) < target:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if power(difference, sd, mid, alpha) >= target else (mid, high)
    return float(high)


def seeds_needed(pairs: pd.DataFrame, detect: float = DETECT_BPD, target: float = TARGET_POWER) -> pd.DataFrame:
    """``pairs`` (``paired_comparisons`` rows) with the power each had to detect its observed
    difference (``power_observed``) and a difference of ``detect`` (``power_detect``), and the seeds
    that would give ``target`` power for each (``seeds_observed``, ``seeds_detect``), from the
    observed standard deviation of the differences (``sd_diff``)."""
    rows = list(pairs.itertuples(index=False))
    return pairs.assign(
        detect=detect,
        target_power=target,
        power_observed=[power(r.a_minus_b, r.sd_diff, r.n_seeds) for r in rows],
        power_detect=[power(detect, r.sd_diff, r.n_seeds) for r in rows],
        seeds_observed=[seeds_for(r.a_minus_b, r.sd_diff, target) for r in rows],
        seeds_detect=[seeds_for(detect, r.sd_diff, target) for r in rows],
    )
