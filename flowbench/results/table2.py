"""Aggregate trial records into Table 2 and paired comparisons between models over seeds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

# what table2.parquet holds per (model, dataset)
TABLE2_COLUMNS = [
    "model", "dataset", "n_trials", "n_seeds", "bpd_mean", "bpd_std", "bpd_ci95", "num_params",
    "density_latency_ms", "sample_latency_ms", "throughput_images_per_s", "steps_mean", "paper_bpd", "delta_vs_paper",
]


def ci95_half_width(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean; NaN for one value."""
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def _order(model: str, dataset: str) -> tuple:
    from flowbench.data import DATASETS
    from flowbench.flows.registry import MODELS

    models, datasets = list(MODELS), list(DATASETS)
    return (models.index(model) if model in models else len(models), model,
            datasets.index(dataset) if dataset in datasets else len(datasets), dataset)


def final_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials Table 2 is about: not search samples."""
    return trials[trials["phase"] != "search"] if "phase" in trials.columns else trials


def table2_frame(trials: pd.DataFrame, paper_bpd) -> pd.DataFrame:
    """One row per (model, dataset), models in registry order (the paper's), then data sets.

    ``paper_bpd(model, dataset)`` gives the paper's figure or None. Only trials with status
    ``ok`` enter the means; ``n_trials`` counts all of them so failures stay visible.
    """
    trials = final_trials(trials)
    rows = []
    for (model, dataset), group in sorted(trials.groupby(["model", "dataset"]), key=lambda kv: _order(*kv[0])):
        ok = group[group["status"] == "ok"]
        bpd = ok["test_bpd"].to_numpy(dtype=float)
        paper = paper_bpd(model, dataset)
        mean = float(bpd.mean()) if len(bpd) else math.nan
        rows.append({
            "model": model, "dataset": dataset, "n_trials": len(group), "n_seeds": int(ok["seed"].nunique()),
            "bpd_mean": mean, "bpd_std": float(np.std(bpd, ddof=1)) if len(bpd) > 1 else math.nan,
            "bpd_ci95": ci95_half_width(bpd), "num_params": int(group["num_params"].max()),
            "density_latency_ms": float(ok["density_latency_ms"].median()) if len(ok) else math.nan,
            "sample_latency_ms": float(ok["sample_latency_ms"].median()) if len(ok) else math.nan,
            "throughput_images_per_s": float(ok["throughput_images_per_s"].mean()) if len(ok) else math.nan,
            "steps_mean": float(ok["steps"].mean()) if len(ok) else math.nan,
            "paper_bpd": math.nan if paper is None else float(paper),
            "delta_vs_paper": math.nan if paper is None else mean - float(paper),
        })
    return pd.DataFrame(rows, columns=TABLE2_COLUMNS)


def paired_comparisons(trials: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per dataset and pair of models: bits/dim difference over shared seeds, paired t-test,
    Holm-corrected across the dataset's pairs. ``a_minus_b`` < 0 means model a is better."""
    trials = final_trials(trials)
    ok = trials[trials["status"] == "ok"]
    rows = []
    for dataset, group in sorted(ok.groupby("dataset"), key=lambda kv: _order("", kv[0])):
        by_model = {m: g.set_index("seed")["test_bpd"]
                    for m, g in sorted(group.groupby("model"), key=lambda kv: _order(kv[0], dataset))}
        pairs = []
        for a, b in itertools.combinations(by_model, 2):
            seeds = by_model[a].index.intersection(by_model[b].index)
            diff = (by_model[a][seeds] - by_model[b][seeds]).to_numpy(dtype=float)
            p = float(stats.ttest_rel(by_model[a][seeds], by_model[b][seeds]).pvalue) if len(diff) > 1 else math.nan
            if len(diff) > 1 and np.all(diff == diff[0]):  # zero variance: the t-test is undefined
                p = 0.0 if diff[0] != 0 else 1.0
            pairs.append({"dataset": dataset, "model_a": a, "model_b": b, "n_seeds": len(diff),
                          "a_minus_b": float(diff.mean()) if len(diff) else math.nan,
                          "ci95": ci95_half_width(diff), "p_value": p})
        # Holm: the k-th smallest p-value is compared with alpha / (m - k)
        tested = sorted((r for r in pairs if not math.isnan(r["p_value"])), key=lambda r: r["p_value"])
        still = True
        for k, r in enumerate(tested):
            still = still and r["p_value"] <= alpha / (len(tested) - k)
            r["significant"] = still
        for r in pairs:
            r.setdefault("significant", False)
        rows += pairs
    columns = ["dataset", "model_a", "model_b", "n_seeds", "a_minus_b", "ci95", "p_value", "significant"]
    return pd.DataFrame(rows, columns=columns)
