"""Along the budget and seeds needed, on synthetic curves with known values: every expected figure is
computed here from the numbers by another route (scipy's t-test, statsmodels' Holm and TTestPower,
a Monte-Carlo estimate, the crossing point solved by hand)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from flowbench.results.curves import along_budget, curve_summary, milestone_comparisons, milestone_values
from flowbench.results.power import power, seeds_for, seeds_needed
from flowbench.results.report import build_report
from flowbench.results.table2 import paired_comparisons
from tests.results.rows import trial

BUDGET = 4e12  # FLOPs; four milestones at 1e12, 2e12, 3e12, 4e12
GLOW = {  # validation bits/dim per milestone (rows) and seed (columns)
    1: [3.60, 3.60, 3.60],
    2: [3.50, 3.50, 3.50],
    3: [3.45, 3.45, 3.45],
    4: [3.40, 3.40, 3.40],
}
# n×n − Glow: +0.06 on average at the first milestone, with a spread that separates nothing there,
# then −0.04 ± 0.001 from the second on: n×n ahead from 50% of the budget; the mean curves cross
# where the difference, linear between 1e12 (+0.06) and 2e12 (−0.04), is zero: 1e12 + 0.6 · 1e12
NXN_MINUS_GLOW = {1: [0.16, -0.04, 0.06], 2: [-0.041, -0.039, -0.040], 3: [-0.041, -0.039, -0.040]}
NXN_MINUS_GLOW[4] = NXN_MINUS_GLOW[3]
CROSSING = 1.6e12
# emerging: well behind both everywhere, with spread
EMERGING_MINUS_GLOW = {k: [0.5, 0.52, 0.49] for k in GLOW}


def along_tables():
    values = {
        "glow": GLOW,
        "nxn_shift": {k: list(np.add(GLOW[k], NXN_MINUS_GLOW[k])) for k in GLOW},
        "emerging": {k: list(np.add(GLOW[k], EMERGING_MINUS_GLOW[k])) for k in GLOW},
    }
    trials, curves = [], []
    for model, by_milestone in values.items():
        for seed in range(3):
            row = trial(
                model, "cifar10", seed, by_milestone[4][seed] + 0.01, evaluations=4, budget=BUDGET, train_flops=BUDGET
            )
            trials.append(row)
            per_step = 1e10 if model == "glow" else 1.3e10  # one step's FLOPs: milestones within one of each other
            for k, bpd in by_milestone.items():
                spent = math.ceil(k / 4 * BUDGET / per_step) * per_step
                curves.append(
                    {
                        "sweep": "s",
                        "trial_id": row["trial_id"],
                        "model": model,
                        "variant": "",
                        "dataset": "cifar10",
                        "seed": seed,
                        "config_hash": "h",
                        "step": round(spent / per_step),
                        "val_bpd": bpd[seed],
                        "train_bpd": bpd[seed],
                        "train_flops": spent,
                        "milestone": k,
                        "budget_fraction": spent / BUDGET,
                    }
                )
    return pd.DataFrame(trials), pd.DataFrame(curves)


def test_each_pair_at_each_milestone_is_a_paired_t_test_with_holm_over_all_of_them():
    trials, curves = along_tables()
    along = milestone_comparisons(milestone_values(trials, curves))
    assert len(along) == 3 * 4  # three pairs, four milestones
    assert sorted(along["fraction"].unique()) == [0.25, 0.5, 0.75, 1.0]
    assert sorted(along["spent"].unique()) == [1e12, 2e12, 3e12, 4e12]
    curve = curves.set_index(["model", "milestone", "seed"])["val_bpd"]
    p_values = []
    for row in along.itertuples():
        k = round(row.fraction * 4)
        a = [curve[(row.model_a, k, s)] for s in range(3)]
        b = [curve[(row.model_b, k, s)] for s in range(3)]
        expected = stats.ttest_rel(a, b)
        assert row.p_value == pytest.approx(expected.pvalue, rel=1e-9)
        assert row.a_minus_b == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12)
        p_values.append(expected.pvalue)
    assert along["p_holm"].to_numpy() == pytest.approx(multipletests(p_values, method="holm")[1], rel=1e-9)


def test_the_summary_is_the_mean_and_t_interval_over_seeds_at_each_milestone():
    trials, curves = along_tables()
    summary = curve_summary(milestone_values(trials, curves)).set_index(["model", "fraction"])
    nxn = summary.loc[("nxn_shift", 0.5)]
    values = np.add(GLOW[2], NXN_MINUS_GLOW[2])
    low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
    assert nxn.val_bpd_mean == pytest.approx(values.mean()) and nxn.n_seeds == 3
    assert (nxn.val_bpd_ci_low, nxn.val_bpd_ci_high) == pytest.approx((low, high))
    # every model reached each milestone at the milestone's FLOPs, within one of its steps
    assert summary.loc[("glow", 0.25)].train_flops_mean == 1e12
    assert 1e12 <= summary.loc[("nxn_shift", 0.25)].train_flops_mean < 1e12 + 1.3e10


def test_the_sentence_says_over_which_budgets_the_ordering_holds_and_where_the_curves_cross():
    trials, curves = along_tables()
    along = milestone_comparisons(milestone_values(trials, curves))
    sentence = along_budget(along, "nxn_shift", "glow", "cifar10")
    assert sentence == (
        "nxn_shift ahead of glow from 50% of the budget (2e12 FLOPs) on; not separated at the other "
        "milestones (4 milestones, Holm over the 12 comparisons of cifar10); the mean curves cross at 1.6e12 FLOPs"
    )
    assert float(sentence.rsplit("cross at ", 1)[1].split()[0]) == pytest.approx(CROSSING)
    # the same figures whichever model is named first
    assert along_budget(along, "glow", "nxn_shift", "cifar10").startswith("nxn_shift ahead of glow from 50%")
    assert along_budget(along, "glow", "emerging", "cifar10").startswith(
        "glow ahead of emerging at every milestone, from 25% to 100% of the budget"
    )
    assert along_budget(along, "nxn_shift", "glow", "imagenet32") == ""  # not run there


def test_noise_larger_than_the_differences_is_never_separated():
    trials, curves = along_tables()
    rng = np.random.default_rng(0)
    curves = curves.assign(val_bpd=3.5 + rng.normal(0, 0.2, len(curves)))
    sentence = along_budget(milestone_comparisons(milestone_values(trials, curves)), "nxn_shift", "glow", "cifar10")
    assert sentence.startswith("never separated (4 milestones, Holm over the 12 comparisons")


def noncentral_t_power(difference, sd, n, alpha=0.05):
    """The paired t-test's power from statsmodels (a library flowbench does not use for it)."""
    return TTestPower().power(abs(difference) / sd, n, alpha, alternative="two-sided")


@pytest.mark.parametrize(("difference", "sd", "n"), [(0.027, 0.062, 3), (0.01, 0.031, 5), (0.05, 0.02, 3)])
def test_power_equals_statsmodels_and_a_monte_carlo_estimate(difference, sd, n):
    assert power(difference, sd, n) == pytest.approx(noncentral_t_power(difference, sd, n), abs=1e-9)
    assert power(-difference, sd, n) == power(difference, sd, n)
    rng = np.random.default_rng(1)
    samples = rng.normal(difference, sd, size=(40_000, n))
    rejected = stats.ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05
    assert power(difference, sd, n) == pytest.approx(rejected.mean(), abs=0.01)


def test_power_stays_defined_where_statsmodels_gives_nan():
    """statsmodels' TTestPower is NaN at an effect of 10 on 3 seeds (its nct.cdf lower tail); the
    power there is a Monte-Carlo certainty."""
    assert math.isnan(noncentral_t_power(0.2, 0.02, 3))
    samples = np.random.default_rng(2).normal(0.2, 0.02, size=(20_000, 3))
    assert power(0.2, 0.02, 3) == pytest.approx(
        (stats.ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05).mean(), abs=1e-3
    )


@pytest.mark.parametrize(("difference", "sd"), [(0.027, 0.062), (0.01, 0.031), (0.05, 0.02), (0.3, 0.1)])
def test_seeds_needed_is_the_fewest_with_80_percent_power(difference, sd):
    expected = math.ceil(TTestPower().solve_power(difference / sd, power=0.8, alpha=0.05, alternative="two-sided"))
    assert seeds_for(difference, sd) == expected
    assert power(difference, sd, expected) >= 0.8 > power(difference, sd, expected - 1)
    assert seeds_for(0.0, sd) == math.inf and math.isnan(seeds_for(difference, math.nan))


def test_seeds_needed_columns_follow_each_comparisons_spread():
    rows = [trial("glow", "cifar10", s, 3.30 + d) for s, d in enumerate([0.00, 0.03, -0.01, 0.02])]
    rows += [trial("nxn_shift", "cifar10", s, 3.32 + d) for s, d in enumerate([0.01, 0.00, 0.01, 0.00])]
    (row,) = seeds_needed(paired_comparisons(pd.DataFrame(rows)), detect=0.02).itertuples()
    differences = np.array([0.00, 0.03, -0.01, 0.02]) - 0.02 - np.array([0.01, 0.00, 0.01, 0.00])
    sd = np.std(differences, ddof=1)
    assert row.sd_diff == pytest.approx(sd) and row.a_minus_b == pytest.approx(differences.mean())
    assert row.power_observed == pytest.approx(noncentral_t_power(abs(differences.mean()), sd, 4), abs=1e-6)
    assert row.power_detect == pytest.approx(noncentral_t_power(0.02, sd, 4), abs=1e-6)
    assert row.seeds_detect == seeds_for(0.02, sd) and row.detect == 0.02


def test_the_report_has_the_curve_its_comparisons_the_seeds_needed_and_each_claims_budgets(tmp_path):
    trials, curves = along_tables()
    build_report(tmp_path, trials, curves, detect=0.02)
    md = (tmp_path / "report.md").read_text()
    assert "## Along the budget: validation bits/dim at equal fractions of the budget" in md
    assert "4 evaluations per trial, the k-th once k/4 of its budget was spent, each on 100 validation images" in md
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    glow_at_half = np.mean(GLOW[2])
    assert ["cifar10", "50% (2e12 FLOPs)", f"{glow_at_half:.3f} [{glow_at_half:.3f}, {glow_at_half:.3f}]"] == rows[
        next(i for i, r in enumerate(rows) if r[:2] == ["cifar10", "50% (2e12 FLOPs)"])
    ][:3]
    assert "![curves-cifar10](plots/curves-cifar10.png)" in md and (tmp_path / "plots" / "curves-cifar10.png").is_file()
    sentence = along_budget(milestone_comparisons(milestone_values(trials, curves)), "glow", "nxn_shift", "cifar10")
    assert f"- cifar10, glow vs nxn_shift: {sentence}" in md
    # claim (b1), Glow better than n×n on CIFAR-10, rules on the end point and says where it holds along the way
    claim = next(line for line in md.splitlines() if line.startswith("| (b1)"))
    assert "| not tested by this sweep |" not in claim and sentence in claim
    # seeds needed for the end point's test bits/dim, from the spread of glow − emerging over seeds
    final = pd.DataFrame(trials).pivot(index="seed", columns="model", values="test_bpd")
    sd = np.std((final["glow"] - final["emerging"]).to_numpy(), ddof=1)
    seeds = next(r for r in rows if r[2:5] == ["glow", "emerging", "3"])
    assert seeds[6] == f"{sd:.3f}" and seeds[8] == f"{noncentral_t_power(0.02, sd, 3):.2f}"
    assert seeds[10] == f"{seeds_for(0.02, sd):.0f}" and seeds[10] not in ("2", "3")
    assert "power (0.02 bits/dim)" in md
