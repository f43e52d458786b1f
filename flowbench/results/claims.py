"""The paper's claims, each with a verdict computed from a sweep's tables (or, where marked, from the
models' structure): Truong et al., "Fast Flow Reconstruction via Robust Invertible n×n Convolution",
Future Internet 13(7):179, 2021.

A verdict is one of: *supported*, *contradicted*, *inconclusive* (the paired difference, its 95%
interval and the Holm-adjusted p-value are shown), or *not tested by this sweep* (naming the data set,
model or measurement that would test it). Nothing here is written for a particular result:

- bits/dim claims are paired comparisons over seeds from ``paired_comparisons``
  (scipy's ``ttest_rel``, Holm over the data set's pairs): supported when the Holm-adjusted p-value
  is at most 5% and the difference has the claimed sign, contradicted when it is at most 5% with
  the other sign, inconclusive otherwise (or with fewer than two seeds). A claim about a data set
  the sweep did not run is not tested by it; the same comparison on the data the sweep did run is
  shown beside it, without a verdict on the paper's claim (embedded photographs are not CIFAR-10);
- latency claims are ruled per device from the latency table (``flowbench.results.latency``): the
  time ratio over paired rounds at batch 1, by the same test and rule; the throughput batch beside it;
- the parameter claim counts the mixing layers as built at the paper's cards (no training needed;
  the sweep's tables hold whole-model counts only);
- the flexibility claim is checked by folding a randomly parametrised n×n model into a Glow model
  (``flowbench.flows.shift.fold_shift_into_actnorm``) when the report is written: the fold is exact
  for any parameters, so the claim is contradicted as a statement about expressiveness.
  tests/flows/test_shift.py checks the same fold on a trained model.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from flowbench.results.curves import along_budget
from flowbench.results.table2 import ALPHA, compared

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
NOT_TESTED = "not tested by this sweep"
PAPER = (
    'Truong et al., "Fast Flow Reconstruction via Robust Invertible n×n Convolution", Future Internet 13(7):179, 2021'
)
# the paper's data sets; their image shapes are what the data sets are
PAPER_IMAGE_SHAPES = {"cifar10": (3, 32, 32), "imagenet32": (3, 32, 32), "imagenet64": (3, 64, 64)}
DATASET_NAMES = {"cifar10": "CIFAR-10", "imagenet32": "ImageNet 32×32", "imagenet64": "ImageNet 64×64"}
STANDARD_KERNEL = 3  # the standard n×n convolution the paper sets its layer against: 3×3
FOLD_TOLERANCE = 1e-9  # relative log-density gap of an exact fold in float64
METRIC_UNITS = {"test_bpd": "bits/dim"}
METRIC_NAMES = {"test_bpd": "test bits/dim", "density": "log_prob latency", "sampling": "sampling latency"}
LATENCY_BATCH = 1  # the batch size a latency claim is ruled at (larger ones: throughput, shown beside it)


@dataclasses.dataclass(frozen=True)
class Claim:
    key: str
    statement: str  # the claim, paraphrased briefly
    source: str  # where the paper makes it


@dataclasses.dataclass(frozen=True)
class Ruling:
    claim: Claim
    verdict: str
    evidence: str  # the figures the verdict follows from, or what would test the claim
    same_comparison: tuple[str, ...] = ()  # the comparison on the sweep's own data sets, no verdict
    budgets: str = ""  # over which budgets the ordering holds (validation bits/dim along the budget)


@dataclasses.dataclass(frozen=True)
class PairedClaim:
    """``better`` has a lower ``metric`` than ``worse`` on ``dataset`` (None: on any data set)."""

    claim: Claim
    metric: str
    better: str
    worse: str
    dataset: str | None = None


@dataclasses.dataclass(frozen=True)
class MixingCounts:
    """The mixing layers of the n×n model at one card: (channels, n×n count, standard k×k count) per
    level (every step of a level has the same width), and the card's depth."""

    dataset: str
    depth: int
    layers: tuple[tuple[int, int, int], ...]
    kernel_size: int


def _paper_bpd(model: str, dataset: str) -> float | None:
    from flowbench.cards import load_card

    return load_card(model).paper_bpd(dataset)


def _bpd_claim(key: str, better: str, worse: str, dataset: str, claimed: str) -> PairedClaim:
    """The paper's Table 2 figures come from the model cards (paper_bpd is that table)."""
    b, w = _paper_bpd(better, dataset), _paper_bpd(worse, dataset)
    figures = f" ({better} {b:.2f} vs {worse} {w:.2f} bits/dim)" if b is not None and w is not None else ""
    return PairedClaim(
        Claim(key, f"{claimed} on {DATASET_NAMES[dataset]}{figures}", "Table 2"), "test_bpd", better, worse, dataset
    )


@dataclasses.dataclass(frozen=True)
class PaperClaims:
    """The paper's testable claims, in the report's order: bits/dim (a, b), parameters (c),
    inference speed (d), flexibility (e)."""

    bpd: tuple[PairedClaim, ...]
    parameters: Claim
    latency: tuple[PairedClaim, ...]
    flexibility: Claim


def paper_claims() -> PaperClaims:
    speed_source = 'title ("Fast Flow Reconstruction") and abstract'
    return PaperClaims(
        bpd=(
            _bpd_claim("a1", "nxn_shift", "glow", "imagenet32", "n×n convolution beats Glow's 1×1 convolution"),
            _bpd_claim("a2", "nxn_shift", "glow", "imagenet64", "n×n convolution beats Glow's 1×1 convolution"),
            _bpd_claim("b1", "glow", "nxn_shift", "cifar10", "n×n convolution is worse than Glow"),
            _bpd_claim("b2", "emerging", "nxn_shift", "cifar10", "n×n convolution is worse than Emerging convolutions"),
        ),
        parameters=Claim("c", "the n×n convolution uses fewer parameters than a standard n×n convolution", "abstract"),
        latency=(
            PairedClaim(
                Claim(
                    "d1", "n×n convolution infers faster than Emerging convolutions: density (log_prob)", speed_source
                ),
                "density",
                "nxn_shift",
                "emerging",
            ),
            PairedClaim(
                Claim(
                    "d2", "n×n convolution infers faster than Emerging convolutions: sampling (inverse)", speed_source
                ),
                "sampling",
                "nxn_shift",
                "emerging",
            ),
        ),
        flexibility=Claim(
            "e",
            "Glow's invertible 1×1 convolution is less flexible than the n×n convolution",
            "abstract and introduction",
        ),
    )


def _difference(row, claim: PairedClaim) -> tuple[float, float, float]:
    """The pair row's difference and interval as better − worse."""
    if row.model_a == claim.better:
        return row.a_minus_b, row.ci_low, row.ci_high
    return -row.a_minus_b, -row.ci_high, -row.ci_low


def _figures(row, claim: PairedClaim) -> str:
    diff, low, high = _difference(row, claim)
    unit = METRIC_UNITS[claim.metric]
    interval = f" [{low:+.3f}, {high:+.3f}]" if not math.isnan(low) else " (no interval)"
    p = f"p_holm {row.p_holm:.3g}" if not math.isnan(row.p_holm) else "p_holm undefined"
    return (
        f"{METRIC_NAMES[claim.metric]} {claim.better} − {claim.worse} = {diff:+.3f} {unit}{interval} "
        f"(95% CI), {p}, {row.n_seeds} seeds{_power(row)}"
    )


def seeds_text(seeds: float) -> str:
    return "—" if math.isnan(seeds) else "never (no difference)" if math.isinf(seeds) else f"{seeds:,.0f}"


def _power(row) -> str:
    """The power the comparison had and the seeds it would need (rows with ``seeds_needed``'s columns)."""
    if math.isnan(getattr(row, "power_observed", math.nan)):
        return ""
    return (
        f"; power {row.power_observed:.2f} to detect this difference and {row.power_detect:.2f} to detect "
        f"{row.detect:g} bits/dim, {row.target_power:.0%} power needs {seeds_text(row.seeds_observed)} and "
        f"{seeds_text(row.seeds_detect)} seeds"
    )


def _along(along: pd.DataFrame | None, claim: PairedClaim, dataset: str) -> str:
    """The claim's ordering along the budget on ``dataset`` ('' for a measure without curves)."""
    if along is None or claim.metric != "test_bpd":
        return ""
    return along_budget(along, claim.better, claim.worse, dataset)


def _with_along(text: str, along: str) -> str:
    return f"{text}; along the budget (validation bits/dim): {along}" if along else text


def _paired_verdict(row, claim: PairedClaim) -> str:
    diff, _, _ = _difference(row, claim)
    if row.n_seeds < 2 or math.isnan(row.p_holm) or row.p_holm > ALPHA:
        return INCONCLUSIVE
    return SUPPORTED if diff < 0 else CONTRADICTED


def _pair_rows(pairs: pd.DataFrame, claim: PairedClaim) -> pd.DataFrame:
    """The card models' (variant "") comparison rows of the claim's two models, with shared seeds."""
    models = {claim.better, claim.worse}
    chosen = pairs[
        (pairs["metric"] == claim.metric)
        & (pairs["variant"] == "")
        & (pairs["n_seeds"] > 0)
        & pairs["model_a"].isin(models)
        & pairs["model_b"].isin(models)
    ]
    return chosen.set_index("dataset", drop=False)


def _missing(trials: pd.DataFrame, claim: PairedClaim, dataset: str | None) -> str:
    """What this sweep lacks to test ``claim`` (on ``dataset``)."""
    where = f" on {dataset}" if dataset else ""
    finals = trials[(trials["phase"] != "search") & (trials["variant"] == "")]
    if dataset and dataset not in set(finals["dataset"]):
        ran = ", ".join(sorted(set(finals["dataset"]))) or (
            "only grid variants of the models, none at its card" if len(trials) else "nothing"
        )
        return f"needs {claim.better} and {claim.worse} trials on {dataset} (this sweep ran {ran})"
    scope = finals[finals["dataset"] == dataset] if dataset else finals
    ok = scope[compared(scope)]
    absent = [m for m in (claim.better, claim.worse) if m not in set(ok["model"])]
    if absent:
        return f"needs successful trials of {' and '.join(absent)}{where}"
    return f"needs {METRIC_NAMES[claim.metric]} measured for {claim.better} and {claim.worse}{where} on the same seeds"


def rule_paired(
    claim: PairedClaim, pairs: pd.DataFrame, trials: pd.DataFrame, along: pd.DataFrame | None = None
) -> list[Ruling]:
    """One ruling for a claim about one data set; one per data set the sweep ran for a claim about any.
    ``along`` (``milestone_comparisons``) says over which budgets a bits/dim ordering holds."""
    rows = _pair_rows(pairs, claim)
    if claim.dataset is None:
        if rows.empty:
            return [Ruling(claim.claim, NOT_TESTED, _missing(trials, claim, None))]
        return [
            Ruling(
                dataclasses.replace(claim.claim, statement=f"{claim.claim.statement}, on {dataset}"),
                _paired_verdict(row, claim),
                _figures(row, claim),
                budgets=_along(along, claim, dataset),
            )
            for dataset, row in rows.iterrows()
        ]
    others = tuple(
        _with_along(
            f"the same comparison on {dataset} (not {claim.dataset}: no verdict on the paper's claim): "
            f"{_figures(row, claim)}",
            _along(along, claim, dataset),
        )
        for dataset, row in rows.iterrows()
        if dataset != claim.dataset
    )
    if claim.dataset not in rows.index:
        return [Ruling(claim.claim, NOT_TESTED, _missing(trials, claim, claim.dataset), others)]
    row = rows.loc[claim.dataset]
    budgets = _along(along, claim, claim.dataset)
    return [Ruling(claim.claim, _paired_verdict(row, claim), _figures(row, claim), others, budgets)]


def rule_latency(claim: PairedClaim, pairs: pd.DataFrame, trials: pd.DataFrame) -> list[Ruling]:
    """One ruling per device and data set timed, from ``latency_pairs``: the claim's kind at batch
    ``LATENCY_BATCH``, with the throughput batch sizes' ratios beside it."""
    from flowbench.results.latency import ratio_text

    models = {claim.better, claim.worse}
    mine = pairs[
        (pairs["kind"] == claim.metric)
        & (pairs["variant"] == "")
        & pairs["model_a"].isin(models)
        & pairs["model_b"].isin(models)
    ]
    rulings = []
    for (device, dataset), part in mine.groupby(["device", "dataset"], sort=True):
        at = part[part["batch_size"] == LATENCY_BATCH]
        others = tuple(
            f"at batch {int(r.batch_size)} (throughput): {claim.better} / {claim.worse} = {ratio_text(r, claim.better)}"
            for r in part[part["batch_size"] != LATENCY_BATCH].itertuples()
        )
        statement = f"{claim.claim.statement}, on {dataset}, on {device}"
        if at.empty:
            rulings.append(
                Ruling(dataclasses.replace(claim.claim, statement=statement), NOT_TESTED, "needs batch 1 timed", others)
            )
            continue
        row = at.iloc[0]
        figures = f"at batch {LATENCY_BATCH}: {claim.better} / {claim.worse} = {ratio_text(row, claim.better)}"
        verdict = _paired_verdict(row, claim)
        rulings.append(Ruling(dataclasses.replace(claim.claim, statement=statement), verdict, figures, others))
    if not rulings:
        return [Ruling(claim.claim, NOT_TESTED, _missing_latency(trials, claim))]
    return rulings


def _missing_latency(trials: pd.DataFrame, claim: PairedClaim) -> str:
    finals = trials[(trials["phase"] != "search") & (trials["variant"] == "")]
    ok = finals[compared(finals)]
    absent = [m for m in (claim.better, claim.worse) if m not in set(ok["model"])]
    if absent:
        return f"needs successful trials of {' and '.join(absent)}"
    return "needs a latency table (the sweep's latency phase, or flowbench latency RESULTS_DIR)"


def mixing_counts(dataset: str, kernel_size: int = STANDARD_KERNEL) -> MixingCounts | None:
    """The n×n model's mixing layers at ``dataset``'s card, counted as built (effective parameters),
    beside a standard k×k convolution's k²·C² on the same C channels; None without a card there.

    The model is built with one flow step per level and 1 hidden channel: the mixing layers' widths
    depend only on the image channels and the level, and every step of a level is the same layer.
    """
    from flowbench.cards import load_card
    from flowbench.flows.base import effective_parameter_count
    from flowbench.flows.registry import build_model
    from flowbench.flows.shift import InvertibleNxNConv

    card = load_card("nxn_shift")
    if dataset not in card.datasets or dataset not in PAPER_IMAGE_SHAPES:
        return None
    hparams = card.hparams_for(dataset)
    probe = build_model("nxn_shift", PAPER_IMAGE_SHAPES[dataset], **(hparams | {"depth": 1, "hidden_channels": 1}))
    layers = tuple(
        (layer.shift.alpha.numel(), effective_parameter_count(layer), kernel_size**2 * layer.shift.alpha.numel() ** 2)
        for layer in probe.modules()
        if isinstance(layer, InvertibleNxNConv)
    )
    return MixingCounts(dataset, hparams["depth"], layers, kernel_size)


def rule_parameters(claim: Claim, counts: list[MixingCounts], table2: pd.DataFrame) -> Ruling:
    """Supported when every mixing layer of n×n counts fewer parameters than the standard
    convolution of its width, contradicted when none does, inconclusive when some do."""
    if not counts:
        return Ruling(claim, NOT_TESTED, "needs an nxn_shift model card for CIFAR-10 or ImageNet")
    fewer = [nxn < standard for c in counts for _, nxn, standard in c.layers]
    verdict = SUPPORTED if all(fewer) else CONTRADICTED if not any(fewer) else INCONCLUSIVE
    parts = []
    for c in counts:
        nxn = c.depth * sum(n for _, n, _ in c.layers)
        standard = c.depth * sum(s for _, _, s in c.layers)
        widths = ", ".join(str(w) for w, _, _ in c.layers)
        parts.append(
            f"{DATASET_NAMES[c.dataset]} card ({c.depth} steps per level, widths {widths}): "
            f"{nxn:,} vs {standard:,} for standard {c.kernel_size}×{c.kernel_size} convolutions"
        )
    evidence = (
        "counted from the mixing layers (shift and 1×1 convolution) as built at the paper's cards, against "
        "k²·C² for a standard k×k convolution of the same width; no training involved, the sweep's tables "
        f"hold whole-model counts only: {'; '.join(parts)}"
    )
    card = table2[(table2["variant"] == "")].set_index(["model", "dataset"])
    shifts = tuple(
        f"on {dataset} this sweep's nxn_shift counts {card.loc[('nxn_shift', dataset), 'num_params']:,} effective "
        f"parameters and glow {card.loc[('glow', dataset), 'num_params']:,} (what the shifts add: 2C per step)"
        for dataset in sorted(set(card.index.get_level_values("dataset")))
        if ("nxn_shift", dataset) in card.index and ("glow", dataset) in card.index
    )
    return Ruling(claim, verdict, evidence, shifts)


def fold_gap(seed: int = 0) -> float:
    """Largest relative difference in log-density between a randomly parametrised n×n model (the
    registry's tiny card, float64) and the Glow model ``fold_shift_into_actnorm`` makes of it."""
    import torch

    from flowbench.flows.registry import build_model, model_entry
    from flowbench.flows.shift import fold_shift_into_actnorm

    image_shape = (3, 8, 8)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the same figure every report; global RNG untouched
        torch.manual_seed(seed)
        model = build_model("nxn_shift", image_shape, **model_entry("nxn_shift").tiny).double().eval()
        for param in model.parameters():  # off the initial values: α = 1, β = 0 would fold trivially
            param.add_(0.1 * torch.randn_like(param))
        glow = fold_shift_into_actnorm(model)
        x = torch.randn(4, *image_shape, dtype=torch.float64)
        nxn_logp, glow_logp = model.log_prob(x), glow.log_prob(x)
    return float(((nxn_logp - glow_logp).abs() / nxn_logp.abs()).max())


def rule_flexibility(claim: Claim, gap: float, pairs: pd.DataFrame, along: pd.DataFrame | None = None) -> Ruling:
    """Contradicted (as a statement about expressiveness) when the fold reproduces the density;
    a failed fold check leaves the claim inconclusive. The measured n×n − Glow differences are
    shown beside it: under the fold they are differences of optimisation."""
    if gap <= FOLD_TOLERANCE:
        verdict = CONTRADICTED
        evidence = (
            f"as a statement about expressiveness: S follows ActNorm, both per-channel affine, so every "
            f"n×n model folds into a Glow model of the same card with the same density (checked now on a "
            f"randomly parametrised n×n model: relative log-density gap {gap:.1e}; tests/flows/test_shift.py "
            f"checks a trained one), and every Glow model is an n×n one with α = 1, β = 0"
        )
    else:
        verdict = INCONCLUSIVE
        evidence = f"the fold check failed: relative log-density gap {gap:.1e} > {FOLD_TOLERANCE:.0e}"
    bpd = PairedClaim(claim, "test_bpd", "nxn_shift", "glow")
    optimisation = tuple(
        _with_along(
            f"optimisation, not expressiveness, on {dataset}: {_figures(row, bpd)}", _along(along, bpd, dataset)
        )
        for dataset, row in _pair_rows(pairs, bpd).iterrows()
    )
    return Ruling(claim, verdict, evidence, optimisation)


def rule_claims(
    trials: pd.DataFrame,
    table2: pd.DataFrame,
    pairs: pd.DataFrame,
    along: pd.DataFrame | None = None,
    latency: pd.DataFrame | None = None,
) -> list[Ruling]:
    """Every claim's ruling. ``pairs`` holds paired comparisons of test_bpd (with ``seeds_needed``'s
    power columns where known); ``along`` the comparisons along the budget (``milestone_comparisons``);
    ``latency`` the latency comparisons (``latency_pairs``)."""
    from flowbench.results.latency import latency_pairs

    claims = paper_claims()
    rulings = [r for claim in claims.bpd for r in rule_paired(claim, pairs, trials, along)]
    counts = [c for dataset in PAPER_IMAGE_SHAPES if (c := mixing_counts(dataset)) is not None]
    rulings.append(rule_parameters(claims.parameters, counts, table2))
    timed = latency if latency is not None else latency_pairs(None)
    rulings += [r for claim in claims.latency for r in rule_latency(claim, timed, trials)]
    rulings.append(rule_flexibility(claims.flexibility, fold_gap(), pairs, along))
    return rulings
