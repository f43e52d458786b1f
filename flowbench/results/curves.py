"""Equal budgets as a curve: validation bits/dim at the same fractions of the budget for every trial.

Every trial evaluates validation bits/dim at its milestones, the k-th once k/N of its budget is spent
(``flowbench.trial.Milestones``; under a FLOPs budget every model at the same training FLOPs within
one step's). Here the final, successful trials' evaluations are matched by that fraction: the mean
and 95% interval over seeds per model (``curve_summary``, the plot's table), the paired comparison of
every pair of models at every milestone with Holm over all of a (data set, variant)'s comparisons
(``milestone_comparisons``, ``flowbench.results.table2.compare_pairs``), and for a pair the sentence
saying over which budgets one is ahead (``along_budget``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from flowbench.results.table2 import ALPHA, PAIR_COLUMNS, compare_pairs, compared, final_trials, mean_interval

KEYS = ["dataset", "variant", "model"]
FRACTION_DIGITS = 9  # k/N as a key: the same fraction from trials of different N matches
UNITS = {"flops": "FLOPs", "steps": "steps", "images": "images", "epochs": "epochs", "seconds": "s"}


def milestone_values(trials: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """One row per (final trial compared on equal budgets, milestone) with a finite validation
    bits/dim: the trial's identity, ``fraction`` (k/N), ``spent`` (k/N of the budget, in its unit), the
    budget's kind, the training FLOPs spent and the validation bits/dim."""
    finals = final_trials(trials)
    ok = finals[compared(finals)][["trial_id", "budget_kind", "budget", "evaluations"]]
    points = curves[curves["milestone"] > 0].merge(ok, on="trial_id")
    points = points[np.isfinite(points["val_bpd"].astype(float))]
    fraction = (points["milestone"] / points["evaluations"]).round(FRACTION_DIGITS)
    return points.assign(fraction=fraction, spent=fraction * points["budget"])[
        [*KEYS, "seed", "trial_id", "fraction", "spent", "budget_kind", "train_flops", "val_bpd"]
    ]


def curve_summary(values: pd.DataFrame) -> pd.DataFrame:
    """Per (data set, variant, model, milestone): seeds, mean training FLOPs, and validation bits/dim's
    mean with its 95% t-interval over seeds (what the along-the-budget plot draws)."""
    rows = []
    for (dataset, variant, model, fraction), group in values.groupby([*KEYS, "fraction"], sort=False):
        low, high = mean_interval(group["val_bpd"])
        rows.append(
            {
                "dataset": dataset,
                "variant": variant,
                "model": model,
                "fraction": fraction,
                "spent": group["spent"].iloc[0],
                "budget_kind": group["budget_kind"].iloc[0],
                "n_seeds": len(group),
                "train_flops_mean": float(group["train_flops"].mean()),
                "val_bpd_mean": float(group["val_bpd"].mean()),
                "val_bpd_ci_low": low,
                "val_bpd_ci_high": high,
            }
        )
    columns = [*KEYS, "fraction", "spent", "budget_kind", "n_seeds", "train_flops_mean", "val_bpd_mean"]
    return pd.DataFrame(rows, columns=[*columns, "val_bpd_ci_low", "val_bpd_ci_high"])


def milestone_comparisons(values: pd.DataFrame) -> pd.DataFrame:
    """``paired_comparisons``' rows for validation bits/dim at every milestone (``fraction``, ``spent``,
    ``budget_kind``), Holm over every pair at every milestone of a (data set, variant)."""
    rows = pd.DataFrame(compare_pairs(values, "val_bpd", at="fraction"), columns=[*PAIR_COLUMNS, "fraction"])
    if rows.empty:  # tables without milestones
        return rows.reindex(columns=[*rows.columns, "spent", "budget_kind"])
    where = values.groupby(["dataset", "variant", "fraction"])[["spent", "budget_kind"]].first().reset_index()
    return rows.merge(where, on=["dataset", "variant", "fraction"], how="left")


def amount(value: float, kind: str) -> str:
    """A budget amount in its unit: 1.6e12 FLOPs, 40,000 steps."""
    if kind in ("steps", "images"):
        return f"{value:,.0f} {UNITS[kind]}"
    return f"{value:.3g}".replace("e+", "e") + f" {UNITS.get(kind, kind)}"


def _span(rows: pd.DataFrame, first: int, last: int) -> str:
    """Where milestones ``first``..``last`` (positions in ``rows``) lie along the budget."""
    kind = rows["budget_kind"].iloc[first]
    a, b = rows.iloc[first], rows.iloc[last]
    if last == len(rows) - 1 and first > 0:
        return f"from {a.fraction:.0%} of the budget ({amount(a.spent, kind)}) on"
    if first == last:
        return f"at {a.fraction:.0%} of the budget ({amount(a.spent, kind)})"
    if first == 0 and last == len(rows) - 1:
        return f"at every milestone, from {a.fraction:.0%} to {b.fraction:.0%} of the budget"
    where = f"{amount(a.spent, kind)} to {amount(b.spent, kind)}"
    return f"from {a.fraction:.0%} to {b.fraction:.0%} of the budget ({where})"


def crossings(rows: pd.DataFrame) -> list[float]:
    """Where the mean difference changes sign between consecutive milestones, in the budget's unit
    (linear between the two milestones' amounts)."""
    points = rows[np.isfinite(rows["a_minus_b"].astype(float))]
    found = []
    for (_, p), (_, q) in zip(points.iterrows(), points.iloc[1:].iterrows(), strict=False):
        if p.a_minus_b * q.a_minus_b < 0:
            found.append(p.spent + (q.spent - p.spent) * p.a_minus_b / (p.a_minus_b - q.a_minus_b))
    return found


def along_budget(comparisons: pd.DataFrame, better: str, worse: str, dataset: str, variant: str = "") -> str:
    """Over which budgets ``better`` has lower validation bits/dim than ``worse`` on ``dataset`` (and
    the other way round): the milestones where the Holm-adjusted paired comparison separates them
    (p_holm ≤ ALPHA), and where their mean curves cross. '' when the pair was not compared."""
    rows = comparisons[
        (comparisons["dataset"] == dataset)
        & (comparisons["variant"] == variant)
        & comparisons["model_a"].isin([better, worse])
        & comparisons["model_b"].isin([better, worse])
        & (comparisons["n_seeds"] > 0)
    ].sort_values("fraction")
    if rows.empty or better == worse:
        return ""
    sign = np.where(rows["model_a"] == better, 1.0, -1.0)
    rows = rows.assign(a_minus_b=rows["a_minus_b"] * sign)  # better − worse from here on
    family = int(
        comparisons[(comparisons["dataset"] == dataset) & (comparisons["variant"] == variant)]["p_holm"].notna().sum()
    )
    ahead = np.where(rows["p_holm"] <= ALPHA, np.sign(rows["a_minus_b"]), 0.0)  # −1: better ahead
    names = {-1.0: f"{better} ahead of {worse}", 1.0: f"{worse} ahead of {better}"}
    parts, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or ahead[i] != ahead[start]:
            if ahead[start]:
                parts.append(f"{names[ahead[start]]} {_span(rows, start, i - 1)}")
            start = i
    kind = rows["budget_kind"].iloc[0]
    crossed = crossings(rows)
    curves = (
        f"the mean curves cross at {' and at '.join(amount(x, kind) for x in crossed)}"
        if crossed
        else "the mean curves do not cross"
        if len(rows) > 1
        else ""
    )
    scope = f"{len(rows)} milestones, Holm over the {family} comparisons of {dataset}" + (
        f" ({variant})" if variant else ""
    )
    if not parts:
        text = f"never separated ({scope})"
    else:
        rest = "; not separated at the other milestones" if (ahead == 0).any() else ""
        text = "; ".join(parts) + f"{rest} ({scope})"
    return f"{text}; {curves}" if curves else text


def evaluation_setting(trials: pd.DataFrame) -> str:
    """How the final trials were evaluated along the budget: the milestones and the images each."""
    finals = final_trials(trials)
    finals = finals[finals["evaluations"] > 0]
    if finals.empty:
        return ""
    counts = ", ".join(str(n) for n in sorted(finals["evaluations"].unique()))
    images = ", ".join(f"{n:,}" for n in sorted(finals.loc[finals["eval_images"] > 0, "eval_images"].unique()))
    return (
        f"{counts} evaluations per trial, the k-th once k/{counts if finals['evaluations'].nunique() == 1 else 'N'} "
        f"of its budget was spent, each on {images or 'all'} validation images (the same images and "
        "dequantisation noise for every trial); the selected checkpoint is evaluated once more on the whole "
        "validation and test splits"
    )
