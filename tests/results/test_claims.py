"""Each claim kind reaches each verdict it can from small tables built for it."""

import math

import pandas as pd
import pytest

from flowbench.results.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTED,
    SUPPORTED,
    MixingCounts,
    fold_gap,
    mixing_counts,
    paper_claims,
    rule_claims,
    rule_flexibility,
    rule_paired,
    rule_parameters,
)
from flowbench.results.latency import latency_pairs
from flowbench.results.table2 import paired_comparisons, table2_frame
from tests.results.rows import trial
from tests.results.test_latency import timed

CLEAR = [0.00, 0.01, -0.01]  # per-seed noise small against the 0.1 differences below


def bpd_trials(dataset, by_model: dict[str, list[float]], **figures) -> list[dict]:
    return [
        trial(model, dataset, seed, bpd, **figures)
        for model, values in by_model.items()
        for seed, bpd in enumerate(values)
    ]


def pairs_of(rows) -> pd.DataFrame:
    trials = pd.DataFrame(rows)
    return paired_comparisons(trials, "test_bpd")


def a1():  # n×n beats Glow on ImageNet 32×32
    return paper_claims().bpd[0]


def rule(claim, rows):
    return rule_paired(claim, pairs_of(rows), pd.DataFrame(rows))


@pytest.mark.parametrize(("nxn_minus_glow", "verdict"), [(-0.1, SUPPORTED), (+0.1, CONTRADICTED)])
def test_a_clear_bpd_difference_supports_or_contradicts(nxn_minus_glow, verdict):
    rows = bpd_trials(
        "imagenet32", {"glow": [4.0 + n for n in CLEAR], "nxn_shift": [4.0 + nxn_minus_glow + 2 * n for n in CLEAR]}
    )
    [ruling] = rule(a1(), rows)
    assert ruling.verdict == verdict
    assert f"nxn_shift − glow = {nxn_minus_glow:+.3f} bits/dim" in ruling.evidence and "3 seeds" in ruling.evidence


def test_noise_larger_than_the_difference_is_inconclusive_and_shows_the_figures():
    rows = bpd_trials("imagenet32", {"glow": [4.0, 4.1, 4.2], "nxn_shift": [4.15, 3.95, 4.1]})
    [ruling] = rule(a1(), rows)
    row = paired_comparisons(pd.DataFrame(rows)).iloc[0]  # glow − nxn_shift
    assert ruling.verdict == INCONCLUSIVE
    assert f"[{-row.ci_high:+.3f}, {-row.ci_low:+.3f}] (95% CI), p_holm {row.p_holm:.3g}" in ruling.evidence


def test_one_seed_is_inconclusive_however_large_the_difference():
    [ruling] = rule(a1(), bpd_trials("imagenet32", {"glow": [4.0], "nxn_shift": [3.0]}))
    assert ruling.verdict == INCONCLUSIVE and "(no interval)" in ruling.evidence


def test_holm_across_the_data_sets_pairs_decides():
    # glow vs nxn_shift alone: p ≈ 0.02 < 0.05, supported; with two more pairs on the same data set
    # Holm multiplies it by 3 and the claim is no longer supported
    glow, nxn = [4.0, 4.1, 4.2], [3.9, 3.97, 4.12]
    alone = bpd_trials("imagenet32", {"glow": glow, "nxn_shift": nxn})
    assert rule(a1(), alone)[0].verdict == SUPPORTED
    crowded = alone + bpd_trials("imagenet32", {"emerging": [4.5, 4.4, 4.3]})
    pair = paired_comparisons(pd.DataFrame(crowded)).set_index(["model_a", "model_b"]).loc[("glow", "nxn_shift")]
    assert pair.p_value < 0.05 < pair.p_holm
    assert rule(a1(), crowded)[0].verdict == INCONCLUSIVE


def test_a_data_set_the_sweep_did_not_run_is_not_tested_and_its_own_data_gets_no_verdict():
    rows = bpd_trials("embedded", {"glow": [4.0 + n for n in CLEAR], "nxn_shift": [3.9 + n for n in CLEAR]})
    [ruling] = rule(a1(), rows)
    assert ruling.verdict == NOT_TESTED
    assert ruling.evidence == "needs nxn_shift and glow trials on imagenet32 (this sweep ran embedded)"
    [same] = ruling.same_comparison
    assert same.startswith("the same comparison on embedded (not imagenet32: no verdict on the paper's claim)")
    assert "nxn_shift − glow = -0.100 bits/dim" in same


def test_a_sweep_of_variants_only_says_so():
    rows = [row | {"variant": "actnorm=false"} for row in bpd_trials("imagenet32", {"glow": [4.0], "nxn_shift": [3.9]})]
    [ruling] = rule(a1(), rows)
    assert ruling.verdict == NOT_TESTED
    assert ruling.evidence.endswith("(this sweep ran only grid variants of the models, none at its card)")


def test_a_model_missing_or_failed_on_the_data_set_is_named():
    b2 = paper_claims().bpd[3]  # n×n worse than Emerging on CIFAR-10
    rows = bpd_trials("cifar10", {"glow": [3.3, 3.4], "nxn_shift": [3.5, 3.6]})
    assert rule(b2, rows)[0].evidence == "needs successful trials of emerging on cifar10"
    rows += [trial("emerging", "cifar10", s, math.nan, status="diverged") for s in range(2)]
    [ruling] = rule(b2, rows)
    assert ruling.verdict == NOT_TESTED and ruling.evidence == "needs successful trials of emerging on cifar10"


def test_ablation_variants_do_not_stand_in_for_the_papers_models():
    rows = [trial("glow", "imagenet32", s, 4.0 + n, variant="actnorm=false") for s, n in enumerate(CLEAR)]
    rows += [trial("nxn_shift", "imagenet32", s, 3.9 + n, variant="actnorm=false") for s, n in enumerate(CLEAR)]
    assert rule(a1(), rows)[0].verdict == NOT_TESTED


def test_parameter_counts_at_the_cifar10_card_by_hand():
    counts = mixing_counts("cifar10")
    # CIFAR-10 card: depth 32, 3 levels; after each level's squeeze 3·4 = 12, then (12/2)·4 = 24, then 48
    # channels. n×n: shift α, β (2C) + 1×1 weight (C²); a standard 3×3 convolution: 9·C²
    assert counts.depth == 32
    assert counts.layers == tuple((c, c * c + 2 * c, 9 * c * c) for c in (12, 24, 48))
    ruling = rule_parameters(
        paper_claims().parameters, [counts], table2_frame(pd.DataFrame([trial("glow", "x", 0, 3.0)]), lambda m, d: None)
    )
    assert ruling.verdict == SUPPORTED
    assert (
        f"{32 * sum(c * c + 2 * c for c in (12, 24, 48)):,} vs {32 * sum(9 * c * c for c in (12, 24, 48)):,}"
        in ruling.evidence
    )


def test_parameter_claim_contradicted_inconclusive_and_not_tested():
    claim, empty = (
        paper_claims().parameters,
        table2_frame(pd.DataFrame([trial("glow", "x", 0, 3.0)]), lambda m, d: None),
    )
    # against a standard 1×1 convolution (C²) the shift's 2C makes n×n larger at every width
    assert rule_parameters(claim, [mixing_counts("cifar10", kernel_size=1)], empty).verdict == CONTRADICTED
    mixed = MixingCounts("cifar10", 1, ((2, 8, 4), (12, 168, 1296)), 3)
    assert rule_parameters(claim, [mixed], empty).verdict == INCONCLUSIVE
    assert rule_parameters(claim, [], empty).verdict == NOT_TESTED


def test_parameter_claim_shows_the_sweeps_whole_model_counts():
    rows = [trial("glow", "embedded", s, 3.0, params=1000) for s in range(2)]
    rows += [trial("nxn_shift", "embedded", s, 3.0, params=1168) for s in range(2)]
    table2 = table2_frame(pd.DataFrame(rows), lambda m, d: None)
    ruling = rule_parameters(paper_claims().parameters, [mixing_counts("cifar10")], table2)
    assert ruling.same_comparison == (
        "on embedded this sweep's nxn_shift counts 1,168 effective parameters and glow 1,000 (what the shifts "
        "add: 2C per step)",
    )


def test_flexibility_is_contradicted_by_an_exact_fold_and_inconclusive_when_it_fails():
    claim = paper_claims().flexibility
    gap = fold_gap()
    assert gap < 1e-12
    rows = bpd_trials("embedded", {"glow": [4.0 + n for n in CLEAR], "nxn_shift": [3.9 + n for n in CLEAR]})
    ruling = rule_flexibility(claim, gap, pairs_of(rows))
    assert ruling.verdict == CONTRADICTED and "as a statement about expressiveness" in ruling.evidence
    [optimisation] = ruling.same_comparison
    assert optimisation.startswith("optimisation, not expressiveness, on embedded: test bits/dim nxn_shift − glow")
    # a fold that does not reproduce the density proves nothing either way (supported is not reachable:
    # no table can show that the 1×1 family lacks a density the n×n family has)
    assert rule_flexibility(claim, 0.1, pairs_of(rows)).verdict == INCONCLUSIVE


def test_every_claim_is_ruled_on_in_order_for_an_embedded_sweep():
    rows = bpd_trials(
        "embedded",
        {"glow": [4.0 + n for n in CLEAR], "emerging": [3.8 + n for n in CLEAR], "nxn_shift": [3.9 + n for n in CLEAR]},
    )
    trials = pd.DataFrame(rows)
    same = [[10.0, 11.0, 12.0]]  # n×n and Emerging timed alike in every round: no difference to find
    timed_alike = [
        timed("cpu: A", m, same, kind) for m in ("nxn_shift", "emerging") for kind in ("density", "sampling")
    ]
    latency = latency_pairs(pd.DataFrame([row for rows in timed_alike for row in rows]))
    rulings = rule_claims(trials, table2_frame(trials, lambda m, d: None), pairs_of(rows), latency=latency)
    assert [r.claim.key for r in rulings] == ["a1", "a2", "b1", "b2", "c", "d1", "d2", "e"]
    verdicts = {r.claim.key: r.verdict for r in rulings}
    assert all(verdicts[k] == NOT_TESTED for k in ("a1", "a2", "b1", "b2"))
    assert verdicts["c"] == SUPPORTED and verdicts["e"] == CONTRADICTED
    assert verdicts["d1"] == verdicts["d2"] == INCONCLUSIVE
