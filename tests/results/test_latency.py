"""Latency comparisons from latency tables built for them: ratios over paired rounds, per device."""

import math

import numpy as np
import pandas as pd
import pytest

from flowbench.results.claims import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, SUPPORTED, paper_claims, rule_latency
from flowbench.results.latency import latency_pairs, latency_summary
from tests.results.rows import trial

DEVICE_A, DEVICE_B = "cpu: A, 2 threads", "cuda: B"


def timed(device, model, checkpoints: list[list[float]], kind="sampling", batch=1, dataset="embedded") -> list[dict]:
    """Latency rows of ``model``: one per checkpoint (seed), each with its per-round times in ms."""
    return [
        {
            "trial_id": f"{model}-{dataset}-seed{seed}",
            "model": model,
            "variant": "",
            "dataset": dataset,
            "seed": seed,
            "kind": kind,
            "batch_size": batch,
            "device": device,
            "median_ms": float(np.median(times)),
            "rounds": len(times),
            "times_ms": list(times),
            "weights": "selected",
        }
        for seed, times in enumerate(checkpoints)
    ]


def trials(dataset="embedded") -> pd.DataFrame:
    return pd.DataFrame([trial(m, dataset, s, 3.0) for m in ("nxn_shift", "emerging") for s in range(2)])


DRIFT = [1.0, 3.0, 1.5, 2.5, 1.0, 2.0]  # the machine's speed round by round: shared by every model in a round


def test_a_drift_shared_by_a_round_cancels_in_the_ratio():
    """Times that vary 3× over the rounds, but always 0.8× of Emerging's for n×n: the ratio is 0.8
    with a narrow interval, and (d2) is supported, though each model's own spread overlaps the other's."""
    nxn = [[8.0 * d * (1 + 0.001 * r) for r, d in enumerate(DRIFT)]] * 2
    emerging = [[10.0 * d for d in DRIFT]] * 2
    pairs = latency_pairs(pd.DataFrame(timed(DEVICE_A, "nxn_shift", nxn) + timed(DEVICE_A, "emerging", emerging)))
    (row,) = pairs.itertuples()
    nxn_first = row.model_a == "nxn_shift"
    ratio = row.ratio if nxn_first else 1 / row.ratio
    assert ratio == pytest.approx(0.8, rel=0.01) and row.n_seeds == len(DRIFT)
    assert row.ratio_high / row.ratio_low < 1.01  # the drift is gone from the interval
    [ruling] = rule_latency(paper_claims().latency[1], pairs, trials())
    assert ruling.verdict == SUPPORTED and ruling.claim.statement.endswith(f", on embedded, on {DEVICE_A}")
    assert "nxn_shift / emerging = 0.80" in ruling.evidence and "over 6 paired rounds" in ruling.evidence


def test_each_device_is_ruled_alone_with_the_throughput_batch_beside_it():
    rows = timed(DEVICE_A, "nxn_shift", [[5.0, 5.1, 4.9, 5.0]]) + timed(DEVICE_A, "emerging", [[9.0, 9.2, 8.9, 9.1]])
    rows += timed(DEVICE_B, "nxn_shift", [[2.0, 2.1, 2.0, 1.9]]) + timed(DEVICE_B, "emerging", [[1.0, 1.05, 1.0, 0.95]])
    rows += timed(DEVICE_A, "nxn_shift", [[40.0, 41, 39, 40]], batch=16)
    rows += timed(DEVICE_A, "emerging", [[80.0, 79, 81, 80]], batch=16)
    rulings = rule_latency(paper_claims().latency[1], latency_pairs(pd.DataFrame(rows)), trials())
    assert [(r.claim.statement.rsplit(", on ", 1)[1], r.verdict) for r in rulings] == [
        (DEVICE_A, SUPPORTED),
        (DEVICE_B, CONTRADICTED),
    ]
    assert "= 0.55" in rulings[0].evidence and "= 2.00" in rulings[1].evidence  # nxn / emerging, own device only
    (throughput,) = rulings[0].same_comparison
    assert throughput.startswith("at batch 16 (throughput): nxn_shift / emerging = 0.50")
    assert rulings[1].same_comparison == ()


def test_rounds_that_disagree_are_inconclusive():
    rows = timed(DEVICE_A, "nxn_shift", [[5.0, 10.0, 5.0, 10.0]]) + timed(
        DEVICE_A, "emerging", [[10.0, 5.0, 10.0, 5.0]]
    )
    [ruling] = rule_latency(paper_claims().latency[1], latency_pairs(pd.DataFrame(rows)), trials())
    assert ruling.verdict == INCONCLUSIVE


def test_without_a_latency_table_or_a_model_the_claim_is_not_tested():
    d1 = paper_claims().latency[0]
    [ruling] = rule_latency(d1, latency_pairs(None), trials())
    assert ruling.verdict == NOT_TESTED and ruling.evidence.startswith("needs a latency table")
    only_nxn = trials()[lambda t: t.model == "nxn_shift"]
    assert rule_latency(d1, latency_pairs(None), only_nxn)[0].evidence == "needs successful trials of emerging"
    # timed at the throughput batch only: the device is named, the claim's batch missing
    rows = timed(DEVICE_A, "nxn_shift", [[1.0, 1.1]], "density", 8) + timed(
        DEVICE_A, "emerging", [[2.0, 2.1]], "density", 8
    )
    [ruling] = rule_latency(d1, latency_pairs(pd.DataFrame(rows)), trials())
    assert ruling.verdict == NOT_TESTED and ruling.evidence == "needs batch 1 timed"


def test_the_summary_is_the_median_over_checkpoints_per_device():
    rows = timed(DEVICE_A, "emerging", [[4.0, 6.0, 5.0], [9.0, 11.0, 10.0], [1.0, 3.0, 2.0]], batch=4)
    rows += timed(DEVICE_B, "emerging", [[1.0, 1.0, 1.0]], batch=4)
    summary = latency_summary(pd.DataFrame(rows)).set_index("device")
    assert summary.loc[DEVICE_A, "median ms"] == 5.0 and summary.loc[DEVICE_A, "checkpoints"] == 3
    assert summary.loc[DEVICE_A, "images/s"] == pytest.approx(4 / 5.0 * 1e3)
    assert summary.loc[DEVICE_B, "median ms"] == 1.0 and not math.isnan(summary.loc[DEVICE_B, "images/s"])
