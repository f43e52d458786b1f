"""Table 2 and paired comparisons from synthetic trial records with known values."""

import math

import numpy as np
import pandas as pd
import pytest

from flowbench.results.table2 import ci95_half_width, paired_comparisons, table2_frame

T_975_2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom
PAPER = {("glow", "cifar10"): 3.35, ("nxn_shift", "cifar10"): 3.50}


def trial(model, dataset, seed, bpd, status="ok", phase="final", params=1000):
    return dict(sweep="s", trial_id=f"{model}-{dataset}-seed{seed}", model=model, dataset=dataset, seed=seed,
                config_hash="h", status=status, test_bpd=bpd, num_params=params, density_latency_ms=10.0 + seed,
                sample_latency_ms=20.0 + seed, throughput_images_per_s=100.0, steps=50, phase=phase,
                budget=50.0, budget_kind="steps")


def synthetic():
    rows = [trial("nxn_shift", "cifar10", s, b) for s, b in enumerate([3.40, 3.50, 3.60])]
    rows += [trial("glow", "cifar10", s, b) for s, b in enumerate([3.00, 3.10, 3.20])]
    rows += [trial("glow", "cifar10", 3, math.nan, status="diverged")]
    rows += [trial("glow", "cifar10", 9, 1.0, phase="search")]  # a search sample: not in Table 2
    rows += [trial("glow", "embedded", s, b, params=50) for s, b in enumerate([4.0, 4.2])]
    return pd.DataFrame(rows)


def test_means_cis_counts_and_deltas():
    t2 = table2_frame(synthetic(), lambda m, d: PAPER.get((m, d))).set_index(["model", "dataset"])
    glow = t2.loc[("glow", "cifar10")]
    assert glow.bpd_mean == pytest.approx(3.10)
    assert glow.bpd_ci95 == pytest.approx(T_975_2 * 0.1 / math.sqrt(3))
    assert (glow.n_trials, glow.n_seeds) == (4, 3)  # the diverged trial is counted, not averaged
    assert glow.delta_vs_paper == pytest.approx(3.10 - 3.35)
    assert glow.density_latency_ms == 11.0 and glow.sample_latency_ms == 21.0  # medians over seeds
    assert t2.loc[("nxn_shift", "cifar10")].delta_vs_paper == pytest.approx(0.0)
    emb = t2.loc[("glow", "embedded")]
    assert emb.bpd_mean == pytest.approx(4.1) and math.isnan(emb.paper_bpd) and emb.num_params == 50


def test_rows_follow_the_registry_order_not_the_input_order():
    t2 = table2_frame(synthetic(), lambda m, d: None)
    assert list(zip(t2.model, t2.dataset)) == [("glow", "embedded"), ("glow", "cifar10"), ("nxn_shift", "cifar10")]


def test_ci_of_one_seed_is_undefined():
    assert math.isnan(ci95_half_width(np.array([3.0])))


def test_paired_comparison_finds_a_consistent_difference():
    rows = [trial("glow", "cifar10", s, 3.0 + 0.01 * s) for s in range(3)]
    rows += [trial("nxn_shift", "cifar10", s, 3.5 + 0.01 * s + (0.001 if s == 1 else 0)) for s in range(3)]
    rows += [trial("emerging", "cifar10", s, 3.0 + [0.1, -0.1, 0.05][s]) for s in range(3)]
    pairs = paired_comparisons(pd.DataFrame(rows)).set_index(["model_a", "model_b"])
    glow_vs_nxn = pairs.loc[("glow", "nxn_shift")]
    assert glow_vs_nxn.a_minus_b == pytest.approx(-0.5 - 0.001 / 3)
    assert glow_vs_nxn.p_value < 0.001 and glow_vs_nxn.significant
    noisy = pairs.loc[("glow", "emerging")]  # differences -0.1, +0.11, -0.03: no evidence
    assert noisy.p_value > 0.5 and not noisy.significant
    assert list(pairs.index) == [("glow", "emerging"), ("glow", "nxn_shift"), ("emerging", "nxn_shift")]


def test_holm_correction_is_stricter_than_each_test_alone():
    # three pairs with p-values near 0.03: each below 5% alone, but Holm asks 0.05/3 for the smallest
    rng = np.random.default_rng(0)
    rows = []
    for model, shift in (("glow", 0.0), ("emerging", 0.05), ("nxn_shift", 0.1)):
        rows += [trial(model, "cifar10", s, 3.0 + shift + noise) for s, noise in enumerate(rng.normal(0, 0.02, 4))]
    pairs = paired_comparisons(pd.DataFrame(rows))
    for _, r in pairs.iterrows():
        m, k = len(pairs), sorted(pairs.p_value).index(r.p_value)
        raw = sorted(pairs.p_value)
        expected = all(raw[j] <= 0.05 / (m - j) for j in range(k + 1))
        assert r.significant == expected
