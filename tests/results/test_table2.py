"""Table 2 and paired comparisons from synthetic trial records with known values."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flowbench.results.table2 import (
    compared,
    holm,
    mean_interval,
    paired_comparisons,
    short_of_budget,
    table2_frame,
)
from tests.results.rows import trial

# Student t quantile 0.975 at 2 degrees of freedom: the CDF there is 1/2 + t / (2 sqrt(2 + t²)),
# so t / sqrt(2 + t²) = 0.95, t² = 2·0.95² / (1 − 0.95²)
T_975_2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
PAPER = {("glow", "cifar10"): 3.35, ("nxn_shift", "cifar10"): 3.50}


def synthetic():
    rows = [trial("nxn_shift", "cifar10", s, b) for s, b in enumerate([3.40, 3.50, 3.60])]
    rows += [trial("glow", "cifar10", s, b) for s, b in enumerate([3.00, 3.10, 3.20])]
    rows += [trial("glow", "cifar10", 3, math.nan, status="diverged")]
    rows += [trial("glow", "cifar10", 9, 1.0, phase="search")]  # a search sample: not in Table 2
    rows += [trial("glow", "embedded", s, b, params=50) for s, b in enumerate([4.0, 4.2])]
    return pd.DataFrame(rows)


def test_means_intervals_counts_and_deltas():
    t2 = table2_frame(synthetic(), lambda m, d: PAPER.get((m, d))).set_index(["model", "variant", "dataset"])
    glow = t2.loc[("glow", "", "cifar10")]
    assert glow.test_bpd_mean == pytest.approx(3.10) and glow.val_bpd_mean == pytest.approx(3.11)
    half = T_975_2 * 0.1 / math.sqrt(3)  # sd of 3.0, 3.1, 3.2 is 0.1
    assert (glow.test_bpd_ci_low, glow.test_bpd_ci_high) == pytest.approx((3.10 - half, 3.10 + half))
    assert (glow.n_trials, glow.n_seeds) == (4, 3)  # the diverged trial is counted, not averaged
    assert glow.delta_vs_paper == pytest.approx(3.10 - 3.35)
    assert (glow.num_params, glow.num_params_allocated) == (1000, 1010)
    assert (glow.flops_per_image, glow.train_flops_mean, glow.images_seen_mean) == (2e6, 1e9, 500)
    assert t2.loc[("nxn_shift", "", "cifar10")].delta_vs_paper == pytest.approx(0.0)
    emb = t2.loc[("glow", "", "embedded")]
    assert emb.test_bpd_mean == pytest.approx(4.1) and math.isnan(emb.paper_bpd) and emb.num_params == 50


def test_rows_follow_the_registry_order_not_the_input_order():
    t2 = table2_frame(synthetic(), lambda m, d: None)
    assert list(zip(t2.model, t2.dataset, strict=True)) == [
        ("glow", "embedded"),
        ("glow", "cifar10"),
        ("nxn_shift", "cifar10"),
    ]


def test_variants_are_rows_of_their_own_without_the_papers_figure():
    rows = [trial("glow", "cifar10", s, 3.0) for s in range(2)]
    rows += [trial("glow", "cifar10", s, 3.5, variant="actnorm=false") for s in range(2)]
    t2 = table2_frame(pd.DataFrame(rows), lambda m, d: PAPER.get((m, d))).set_index(["model", "variant", "dataset"])
    assert t2.loc[("glow", "", "cifar10")].paper_bpd == 3.35
    ablated = t2.loc[("glow", "actnorm=false", "cifar10")]
    assert ablated.test_bpd_mean == 3.5 and math.isnan(ablated.paper_bpd) and ablated.n_seeds == 2


def test_interval_of_one_value_is_undefined():
    assert all(math.isnan(v) for v in mean_interval([3.0]))


def fixed_pair_table():
    glow, nxn = [3.00, 3.10, 3.20], [3.05, 3.08, 3.31]
    rows = [trial("glow", "cifar10", s, b) for s, b in enumerate(glow)]
    rows += [trial("nxn_shift", "cifar10", s, b) for s, b in enumerate(nxn)]
    rows += [trial("nxn_shift", "cifar10", 7, 9.9)]  # a seed glow lacks: not paired
    return pd.DataFrame(rows), np.array(glow), np.array(nxn)


def test_paired_interval_and_p_value_equal_scipys_and_the_hand_derivation():
    trials, glow, nxn = fixed_pair_table()
    row = paired_comparisons(trials).iloc[0]
    assert (row.model_a, row.model_b, row.n_seeds) == ("glow", "nxn_shift", 3)
    # by hand: differences d, their mean and standard error; with 2 degrees of freedom the two-sided
    # p-value of t is 1 − |t| / sqrt(2 + t²) (the CDF above)
    d = glow - nxn
    mean, se = d.mean(), math.sqrt(((d - d.mean()) ** 2).sum() / 2) / math.sqrt(3)
    t = mean / se
    assert row.a_minus_b == pytest.approx(mean)
    assert row.p_value == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-12)
    assert (row.ci_low, row.ci_high) == pytest.approx((mean - T_975_2 * se, mean + T_975_2 * se), rel=1e-12)
    reference = stats.ttest_rel(glow, nxn)
    assert row.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert (row.ci_low, row.ci_high) == pytest.approx(tuple(reference.confidence_interval()), rel=1e-12)
    assert row.p_holm == row.p_value  # a family of one


def test_holm_on_a_worked_example():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1 and kept monotone; a NaN is no test and does not count in m
    assert holm([0.5, math.nan, 0.6]) == pytest.approx([1.0, math.nan, 1.0], nan_ok=True)
    assert holm([0.02, math.nan, 0.04]) == pytest.approx([0.04, math.nan, 0.04], nan_ok=True)


def test_holm_is_applied_per_data_set_and_variant():
    rng = np.random.default_rng(0)
    rows = []
    for model, shift in (("glow", 0.0), ("emerging", 0.05), ("nxn_shift", 0.1)):
        rows += [trial(model, "cifar10", s, 3.0 + shift + noise) for s, noise in enumerate(rng.normal(0, 0.02, 4))]
        rows += [trial(model, "cifar10", s, 3.0 + shift, variant="actnorm=false") for s in range(2)]
    pairs = paired_comparisons(pd.DataFrame(rows))
    card = pairs[pairs.variant == ""]
    assert list(zip(card.model_a, card.model_b, strict=True)) == [
        ("glow", "emerging"),
        ("glow", "nxn_shift"),
        ("emerging", "nxn_shift"),
    ]
    assert card.p_holm.to_numpy() == pytest.approx(holm(card.p_value.to_numpy()))
    assert (card.p_holm >= card.p_value).all() and (card.p_holm > card.p_value).any()
    ablated = pairs[pairs.variant == "actnorm=false"]
    assert len(ablated) == 3 and (ablated.n_seeds == 2).all()


def test_comparisons_of_another_metric_skip_unmeasured_seeds():
    rows = [trial("nxn_shift", "embedded", s, 3.0 + s) for s in range(3)]
    rows += [trial("emerging", "embedded", s, 3.0, val_bpd=[5.0, math.nan, 6.0][s]) for s in range(3)]
    row = paired_comparisons(pd.DataFrame(rows), "val_bpd").iloc[0]
    # emerging comes first (registry order); nxn_shift's val_bpd is 3.01 + seed: seeds 0 and 2 pair
    assert (row.model_a, row.model_b) == ("emerging", "nxn_shift")
    assert (row.metric, row.n_seeds, row.a_minus_b) == ("val_bpd", 2, pytest.approx((5 - 3.01 + 6 - 5.01) / 2))


def short_budget_trials() -> pd.DataFrame:
    """glow on 3 seeds; nxn_shift on seeds 0, 1, and on seed 2 a trial recorded ok at 60% of the
    budget (with the best figure of all); a search sample ASHA stopped early."""
    rows = [trial("glow", "cifar10", s, 3.0 + s / 10) for s in range(3)]
    rows += [trial("nxn_shift", "cifar10", s, 3.5) for s in range(2)]
    rows += [trial("nxn_shift", "cifar10", 2, 2.0, train_flops=6e8)]
    rows += [trial("glow", "cifar10", 9, 1.0, phase="search", status="stopped", train_flops=1e8)]
    return pd.DataFrame(rows)


def test_a_trial_short_of_its_budget_is_in_no_comparison():
    """Equal budgets: a final trial that did not spend its whole budget is counted in n_trials
    but is in no figure and no pairing; a search sample ASHA stopped is not a short final trial."""
    trials = short_budget_trials()
    nxn = table2_frame(trials, lambda m, d: None).set_index("model").loc["nxn_shift"]
    assert (nxn.n_trials, nxn.n_seeds, nxn.test_bpd_mean) == (3, 2, 3.5)
    assert paired_comparisons(trials).n_seeds.tolist() == [2]  # seed 2 has no full-budget nxn_shift trial
    assert short_of_budget(trials).trial_id.tolist() == ["nxn_shift--cifar10-seed2"]
    assert compared(trials).sum() == 5
