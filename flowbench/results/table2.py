"""Table 2 and paired comparisons between models over seeds, with scipy.stats' tests and intervals.

Selection (search, ASHA, early stopping, the reported checkpoint) happened on validation bits/dim
inside each trial; a trial's ``test_bpd`` is its selected checkpoint's, computed once. Table 2
shows it beside ``val_bpd``, the parameter counts and the FLOPs (latency: ``flowbench.results.latency``).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd

GROUP = ["model", "variant", "dataset"]  # one Table 2 row each; variant "" is the card's model
CONFIDENCE = 0.95
ALPHA = 0.05  # a comparison is significant when its Holm-adjusted p-value is at most ALPHA

# what table2.parquet holds per (model, variant, dataset)
TABLE2_COLUMNS = [
    *GROUP,
    "n_trials",
    "n_seeds",
    "test_bpd_mean",
    "test_bpd_std",
    "test_bpd_ci_low",
    "test_bpd_ci_high",
    "val_bpd_mean",
    "num_params",
    "num_params_allocated",
    "flops_per_image",
    "train_flops_mean",
    "images_seen_mean",
    "steps_mean",
    "throughput_images_per_s",
    "paper_bpd",
    "delta_vs_paper",
]
PAIR_COLUMNS = [
    "metric",
    "dataset",
    "variant",
    "model_a",
    "model_b",
    "n_seeds",
    "a_minus_b",
    "sd_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
]


def mean_interval(values) -> tuple[float, float]:
    """The 95% Student-t interval of the mean (scipy's ``ttest_1samp(...).confidence_interval``,
    i.e. ``t.interval`` around the mean with its standard error); NaN for fewer than two values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats  # here: every trial's process imports this module (for ALPHA), few use scipy

    with warnings.catch_warnings():  # identical values (a deterministic figure) warn of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def paired_test(a, b) -> tuple[float, float, float]:
    """``scipy.stats.ttest_rel(a, b)``: (p-value, interval low, interval high) of the mean of a − b.
    NaN with fewer than two pairs; scipy gives p = 0 for a constant non-zero difference and NaN for
    none at all."""
    if len(a) < 2:
        return math.nan, math.nan, math.nan
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
        ci = result.confidence_interval(CONFIDENCE)
    return float(result.pvalue), float(ci.low), float(ci.high)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979) over one family; NaNs are not tests and stay NaN.

    With the m p-values sorted ascending, p_(1) ≤ … ≤ p_(m), the adjusted value of the i-th is
    max over j ≤ i of min(1, (m − j + 1)·p_(j)): rejecting where it is ≤ α is Holm's procedure.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def _order(model: str, dataset: str) -> tuple:
    from flowbench.data import DATASETS
    from flowbench.flows.registry import MODELS

    models, datasets = list(MODELS), list(DATASETS)
    return (
        models.index(model) if model in models else len(models),
        model,
        datasets.index(dataset) if dataset in datasets else len(datasets),
        dataset,
    )


def _row_order(model: str, variant: str, dataset: str) -> tuple:
    model_rank, model, dataset_rank, dataset = _order(model, dataset)
    return model_rank, model, variant, dataset_rank, dataset


def final_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials Table 2 is about: not search samples."""
    return trials[trials["phase"] != "search"]


# the column holding what a trial spent of each kind of budget
SPENT = {
    "steps": "steps",
    "epochs": "epochs",
    "images": "images_seen",
    "seconds": "train_seconds",
    "flops": "train_flops",
}


def spent(trials: pd.DataFrame) -> pd.Series:
    """What each trial spent, in its budget's kind."""
    return pd.Series([trials.at[i, SPENT[kind]] for i, kind in trials["budget_kind"].items()], trials.index, float)


def full_budget(trials: pd.DataFrame) -> pd.Series:
    """Whether each trial spent its whole budget (to float rounding)."""
    return spent(trials) >= trials["budget"].astype(float) * (1 - 1e-9)


def compared(trials: pd.DataFrame) -> pd.Series:
    """The trials Table 2, the paired comparisons and the claims compare: ok, on their full budget."""
    return (trials["status"] == "ok") & full_budget(trials)


def short_of_budget(trials: pd.DataFrame) -> pd.DataFrame:
    """Final trials that did not spend their full budget (diverged, failed, or recorded short): left
    out of every comparison, and the report names them. Search samples that ASHA stopped are not
    among them: they are not compared."""
    finals = final_trials(trials)
    return finals[~full_budget(finals)]


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def table2_frame(trials: pd.DataFrame, paper_bpd) -> pd.DataFrame:
    """One row per (model, variant, dataset): models in registry order (the paper's), then variants,
    then data sets.

    ``paper_bpd(model, dataset)`` gives the paper's figure or None; it is shown for the card's model
    (variant "") only. Only trials with status ``ok`` enter the figures; ``n_trials`` counts all of
    them so failures stay visible. A trial that did not spend its whole budget is not in the
    figures either (equal budgets: ``compared``).
    """
    trials = final_trials(trials)
    rows = []
    for (model, variant, dataset), group in sorted(trials.groupby(GROUP), key=lambda kv: _row_order(*kv[0])):
        ok = group[compared(group)]
        bpd = ok["test_bpd"].to_numpy(dtype=float)
        low, high = mean_interval(bpd)
        paper = paper_bpd(model, dataset) if variant == "" else None
        mean = _mean(ok["test_bpd"])
        rows.append(
            {
                "model": model,
                "variant": variant,
                "dataset": dataset,
                "n_trials": len(group),
                "n_seeds": int(ok["seed"].nunique()),
                "test_bpd_mean": mean,
                "test_bpd_std": float(np.std(bpd, ddof=1)) if len(bpd) > 1 else math.nan,
                "test_bpd_ci_low": low,
                "test_bpd_ci_high": high,
                "val_bpd_mean": _mean(ok["val_bpd"]),
                "num_params": int(group["num_params"].max()),
                "num_params_allocated": int(group["num_params_allocated"].max()),
                "flops_per_image": _mean(ok["flops_per_image"]),
                "train_flops_mean": _mean(ok["train_flops"]),
                "images_seen_mean": _mean(ok["images_seen"]),
                "steps_mean": _mean(ok["steps"]),
                "throughput_images_per_s": _mean(ok["throughput_images_per_s"]),
                "paper_bpd": math.nan if paper is None else float(paper),
                "delta_vs_paper": math.nan if paper is None else mean - float(paper),
            }
        )
    return pd.DataFrame(rows, columns=TABLE2_COLUMNS)


def paired_comparisons(trials: pd.DataFrame, metric: str = "test_bpd") -> pd.DataFrame:
    """Per (data set, variant) and pair of models: ``metric`` of a − b over the seeds both have a
    finite value for, ``scipy.stats.ttest_rel`` with its 95% interval, and Holm-adjusted p-values
    (``p_holm``) over the family of that (data set, variant)'s pairs. ``a_minus_b`` < 0: a is lower
    (better for bits/dim and latency); ``sd_diff`` is the standard deviation of a − b over seeds."""
    finals = final_trials(trials)
    ok = finals[compared(finals) & np.isfinite(finals[metric].astype(float))]
    return pd.DataFrame(compare_pairs(ok, metric), columns=PAIR_COLUMNS)


def compare_pairs(values: pd.DataFrame, metric: str, at: str | None = None) -> list[dict]:
    """The rows of ``paired_comparisons`` from ``values`` (one row per model, variant, data set, seed
    and, when ``at`` names a column, each of its values): every pair of models of a (data set,
    variant) compared at each value of ``at`` (e.g. a milestone along the budget), with Holm over all
    of that family's comparisons, every pair at every ``at``."""
    rows = []
    families = sorted(values.groupby(["dataset", "variant"]), key=lambda kv: (_order("", kv[0][0]), kv[0][1]))
    for (dataset, variant), group in families:
        models = sorted(group["model"].unique(), key=lambda m: _order(m, dataset))
        points = sorted(group[at].unique()) if at else [None]
        family = []
        for a, b in itertools.combinations(models, 2):
            for point in points:
                part = group if at is None else group[group[at] == point]
                xa = part[part["model"] == a].set_index("seed")[metric].astype(float)
                xb = part[part["model"] == b].set_index("seed")[metric].astype(float)
                seeds = xa.index.intersection(xb.index).sort_values()
                diff = xa[seeds].to_numpy() - xb[seeds].to_numpy()
                p, low, high = paired_test(xa[seeds].to_numpy(), xb[seeds].to_numpy())
                family.append(
                    {
                        "metric": metric,
                        "dataset": dataset,
                        "variant": variant,
                        "model_a": a,
                        "model_b": b,
                        "n_seeds": len(seeds),
                        "a_minus_b": float(np.mean(diff)) if len(seeds) else math.nan,
                        "sd_diff": float(np.std(diff, ddof=1)) if len(seeds) > 1 else math.nan,
                        "ci_low": low,
                        "ci_high": high,
                        "p_value": p,
                    }
                    | ({at: point} if at else {})
                )
        for row, adjusted in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_holm"] = float(adjusted)
        rows += family
    return rows
