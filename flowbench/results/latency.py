"""Latency from ``latency.parquet`` (one row per trial × kind × batch size × device, every round's
time): the report's table, its paired comparisons and figure, per device and never across devices.

The statistics. Within one timing run the rounds are the replicates: round r times every model
once, side by side, so whatever slows the machine in round r slows every model in it. Seeds hardly
change an architecture's cost, so a model's time in round r is the median over its checkpoints'
r-th calls. Two models are compared by the log of their time ratio per round, log(t_a,r / t_b,r):
a drift that scales a round's times cancels in the ratio, and a ratio is what "n times faster"
means. ``compare_pairs`` (the same paired t-interval and Holm correction as bits/dim, with rounds in
the place of seeds) gives its mean and 95% interval; the report shows them as ratios. The family
Holm corrects over is one device, kind and batch size's pairs on a data set.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from flowbench.results.table2 import PAIR_COLUMNS, compare_pairs

LATENCY_FILE = "latency.parquet"
RATIOS = {"ratio": "a_minus_b", "ratio_low": "ci_low", "ratio_high": "ci_high"}  # exp of the log-ratio columns
KIND_NAMES = {"density": "density (log_prob)", "sampling": "sampling (inverse)"}


def round_times(latency: pd.DataFrame) -> pd.DataFrame:
    """One row per device, kind, batch size, data set, model (and variant) and round: the log of
    the median over the model's checkpoints of their call in that round, in ms."""
    rows = []
    keys = ["device", "kind", "batch_size", "dataset", "variant", "model"]
    for key, group in latency.groupby(keys, sort=False):
        rounds = min(len(t) for t in group["times_ms"])  # a phase times every item the same rounds
        per_round = np.median(np.stack([np.asarray(t[:rounds], dtype=float) for t in group["times_ms"]]), axis=0)
        named = dict(zip(keys, key, strict=True))
        rows += [named | {"seed": r, "log_ms": math.log(v)} for r, v in enumerate(per_round)]
    return pd.DataFrame(rows, columns=[*keys, "seed", "log_ms"])


def latency_pairs(latency: pd.DataFrame | None) -> pd.DataFrame:
    """Per device, kind and batch size (and data set, variant): every pair of models' mean log time
    ratio over rounds with its 95% interval and Holm-adjusted p-value, and the same as ratios
    (``ratio`` = t_a / t_b: below 1, a is faster). ``n_seeds`` counts the rounds."""
    if latency is None or latency.empty:
        return pd.DataFrame(columns=["device", "kind", "batch_size", *PAIR_COLUMNS, *RATIOS])
    frames = []
    values = round_times(latency)
    for (device, kind, batch), part in values.groupby(["device", "kind", "batch_size"], sort=True):
        pairs = pd.DataFrame(compare_pairs(part, "log_ms"))
        if pairs.empty:
            continue
        pairs.insert(0, "device", device)
        pairs.insert(1, "kind", kind)
        pairs.insert(2, "batch_size", int(batch))
        frames.append(pairs)
    pairs = pd.concat(frames, ignore_index=True) if frames else latency_pairs(None)
    for column, source in RATIOS.items():
        pairs[column] = np.exp(pairs[source].astype(float)) if len(pairs) else []
    return pairs


def latency_summary(latency: pd.DataFrame) -> pd.DataFrame:
    """The report's table: per device, data set, model, kind and batch size, the median over its
    checkpoints of their median ms, the quartiles of its per-round times, images per second, the
    rounds and checkpoints, and which weights were timed."""
    rows = []
    keys = ["device", "dataset", "model", "variant", "kind", "batch_size"]
    for key, group in latency.groupby(keys, sort=True):
        times = np.concatenate([np.asarray(t, dtype=float) for t in group["times_ms"]])
        q1, q3 = np.percentile(times, [25, 75])
        median = float(group["median_ms"].median())
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "median ms": round(median, 3),
                "IQR ms": f"{q1:.3g}–{q3:.3g}",
                "images/s": round(int(key[-1]) / median * 1e3, 1),
                "rounds": int(group["rounds"].min()),
                "checkpoints": len(group),
                "weights": ", ".join(sorted(group["weights"].unique())),
            }
        )
    return pd.DataFrame(rows)


def ratio_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """The paired latency comparisons as the report shows them: a / b with its interval."""
    return pd.DataFrame(
        {
            "device": pairs["device"],
            "kind": pairs["kind"].map(KIND_NAMES),
            "batch": pairs["batch_size"],
            "dataset": pairs["dataset"],
            "a": pairs["model_a"],
            "b": pairs["model_b"],
            "a / b [95% CI]": [
                f"{r:.3f} [{lo:.3f}, {hi:.3f}]"
                for r, lo, hi in zip(pairs["ratio"], pairs["ratio_low"], pairs["ratio_high"], strict=True)
            ],
            "rounds": pairs["n_seeds"],
            "p (Holm)": [f"{p:.2g}" for p in pairs["p_holm"]],
        }
    )


def ratio_text(row, better: str) -> str:
    """A pair row as 'better / worse = r× [low, high]' over its rounds."""
    ratio, low, high = row.ratio, row.ratio_low, row.ratio_high
    if row.model_a != better:
        ratio, low, high = 1 / ratio, 1 / high, 1 / low
    interval = f" [{low:.3f}, {high:.3f}] (95% CI)" if math.isfinite(low) else " (no interval)"
    return f"{ratio:.3f}×{interval} over {int(row.n_seeds)} paired rounds, p_holm {row.p_holm:.3g}"
