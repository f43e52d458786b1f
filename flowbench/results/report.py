"""The report: table2.parquet, report.md, a self-contained report.html and PNG plots, all
regenerated from the trials and curves tables alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from flowbench.results.claims import METRIC_NAMES, PAPER, PAPER_IMAGE_SHAPES, rule_claims, seeds_text
from flowbench.results.curves import (
    along_budget,
    amount,
    curve_summary,
    evaluation_setting,
    milestone_comparisons,
    milestone_values,
)
from flowbench.results.latency import LATENCY_FILE, latency_pairs, latency_summary, ratio_table
from flowbench.results.mixers import mixer_sections
from flowbench.results.plots import report_plots, sample_figures, series_label
from flowbench.results.power import DETECT_BPD, TARGET_POWER, seeds_needed
from flowbench.results.render import Section, html_page, markdown_page, write_text_atomic
from flowbench.results.table2 import ALPHA, SPENT, final_trials, paired_comparisons, short_of_budget, table2_frame
from flowbench.results.tables import read_table, write_table

ABLATIONS = "ablations"  # a sibling results folder of that name holds the ablation sweep
SPLITS = (
    "Splits: validation bits/dim (carved from the training data, the same for every seed and model) for "
    "everything that selects — search, ASHA, early stopping and the checkpoint reported; test bits/dim "
    "once per trial, on the selected checkpoint."
)
NO_MILESTONES = "none in these tables: their trials were evaluated every N steps, by a flowbench before milestones"
NXN_GLOW = (
    "The n×n / Glow relation: an n×n model and a Glow model of the same card define the same family of "
    "densities. The shift S is a per-channel affine map directly after ActNorm, itself per-channel "
    "affine, so S folds into the ActNorm before it (flowbench.flows.shift.fold_shift_into_actnorm); any "
    "difference in bits/dim between them is one of optimisation."
)


def paper_bpd_from_cards(model: str, dataset: str):
    from flowbench.cards import load_card

    return load_card(model).paper_bpd(dataset)


def _fmt(value, digits=2, suffix="") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"


def _si(value) -> str:
    """1.23e+12 style for FLOPs; — when unmeasured."""
    return "—" if value is None or math.isnan(value) else f"{value:.3g}"


def _bpd_cell(row) -> str:
    if not row.n_seeds:
        return f"— ({row.n_trials} failed)"
    half = (row.test_bpd_ci_high - row.test_bpd_ci_low) / 2  # the t interval is symmetric
    return f"{_fmt(row.test_bpd_mean)}" + (f" ± {half:.2f}" if not math.isnan(half) else "")


def paper_shaped(table2: pd.DataFrame) -> pd.DataFrame:
    """Models (and variants) × datasets of test 'mean ± CI', with the paper's figure beside each dataset."""
    labels = [series_label(m, v) for m, v in zip(table2["model"], table2["variant"], strict=True)]
    table2 = table2.assign(label=labels)
    out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(labels)), name="model"))
    for dataset in table2["dataset"].unique():
        part = table2[table2["dataset"] == dataset].set_index("label")
        out[f"{dataset} (ours)"] = [_bpd_cell(part.loc[m]) if m in part.index else "" for m in out.index]
        out[f"{dataset} (paper)"] = [_fmt(part.loc[m, "paper_bpd"]) if m in part.index else "" for m in out.index]
    return out


def cost_table(table2: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": [series_label(m, v) for m, v in zip(table2["model"], table2["variant"], strict=True)],
            "dataset": table2["dataset"],
            "val bpd": [_fmt(v, 3) for v in table2["val_bpd_mean"]],
            "test bpd": [_fmt(v, 3) for v in table2["test_bpd_mean"]],
            "parameters (effective)": [f"{p:,}" for p in table2["num_params"]],
            "allocated": [f"{p:,}" for p in table2["num_params_allocated"]],
            "FLOPs / image": [_si(v) for v in table2["flops_per_image"]],
            "training FLOPs (mean)": [_si(v) for v in table2["train_flops_mean"]],
            "images (mean)": [_fmt(v, 0) for v in table2["images_seen_mean"]],
            "steps (mean)": [_fmt(s, 0) for s in table2["steps_mean"]],
            "train images/s": [_fmt(t, 1) for t in table2["throughput_images_per_s"]],
        }
    )


def comparison_table(pairs: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    def diff(d, low, high):
        return _fmt(d, digits) if math.isnan(low) else f"{d:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"

    return pd.DataFrame(
        {
            "measure": [METRIC_NAMES[m] for m in pairs["metric"]],
            "dataset": pairs["dataset"],
            "variant": pairs["variant"],
            "a": pairs["model_a"],
            "b": pairs["model_b"],
            "seeds": pairs["n_seeds"],
            "a − b [95% CI]": [
                diff(*v) for v in zip(pairs["a_minus_b"], pairs["ci_low"], pairs["ci_high"], strict=True)
            ],
            "p (paired t)": [_fmt(p, 3) for p in pairs["p_value"]],
            "p_holm": [_fmt(p, 3) for p in pairs["p_holm"]],
            f"significant (p_holm ≤ {ALPHA:g})": ["yes" if p <= ALPHA else "no" for p in pairs["p_holm"]],
        }
    )


def claims_table(rulings) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "claim": [f"({r.claim.key}) {r.claim.statement}" for r in rulings],
            "source": [r.claim.source for r in rulings],
            "verdict": [r.verdict for r in rulings],
            "evidence": [r.evidence for r in rulings],
            "along the budget (validation bits/dim)": [r.budgets or "—" for r in rulings],
        }
    )


def _milestone(fraction: float, at: float, kind: str) -> str:
    return f"{fraction:.0%} ({amount(at, kind)})"


def along_table(summary: pd.DataFrame, table2: pd.DataFrame) -> pd.DataFrame:
    """The along-the-budget plot's numbers: per data set and milestone, each model's mean validation
    bits/dim [95% interval] over seeds (models in Table 2's order)."""
    found = {series_label(m, v) for m, v in zip(summary["model"], summary["variant"], strict=True)}
    labels = [x for x in dict.fromkeys(map(series_label, table2["model"], table2["variant"])) if x in found]
    rows = []
    for (dataset, fraction), group in summary.groupby(["dataset", "fraction"], sort=True):
        cells = {
            series_label(r.model, r.variant): _fmt(r.val_bpd_mean, 3)
            + ("" if math.isnan(r.val_bpd_ci_low) else f" [{r.val_bpd_ci_low:.3f}, {r.val_bpd_ci_high:.3f}]")
            for r in group.itertuples()
        }
        first = group.iloc[0]
        rows.append(
            {"dataset": dataset, "budget spent": _milestone(fraction, first["spent"], first["budget_kind"])}
            | {label: cells.get(label, "—") for label in labels}
        )
    return pd.DataFrame(rows, columns=["dataset", "budget spent", *labels])


def along_comparison_table(along: pd.DataFrame) -> pd.DataFrame:
    """Every pair at every milestone: a − b in validation bits/dim (Holm-adjusted p), * where p_holm ≤ ALPHA."""
    fractions = sorted(along["fraction"].unique())
    rows = []
    for (dataset, variant, a, b), group in along.groupby(["dataset", "variant", "model_a", "model_b"], sort=False):
        cells = {
            f"{r.fraction:.0%}": "—"
            if not r.n_seeds
            else f"{r.a_minus_b:+.3f} ({_fmt(r.p_holm, 3)})" + ("*" if r.p_holm <= ALPHA else "")
            for r in group.itertuples()
        }
        rows.append(
            {"dataset": dataset, "variant": variant, "a": a, "b": b}
            | {f"{f:.0%}": cells.get(f"{f:.0%}", "—") for f in fractions}
        )
    return pd.DataFrame(rows, columns=["dataset", "variant", "a", "b", *[f"{f:.0%}" for f in fractions]])


def seeds_table(pairs: pd.DataFrame) -> pd.DataFrame:
    detect = f"{pairs['detect'].iloc[0]:g} bits/dim" if len(pairs) else "the set difference"
    target = f"{pairs['target_power'].iloc[0]:.0%}" if len(pairs) else "target"
    return pd.DataFrame(
        {
            "dataset": pairs["dataset"],
            "variant": pairs["variant"],
            "a": pairs["model_a"],
            "b": pairs["model_b"],
            "seeds": pairs["n_seeds"],
            "a − b": [_fmt(v, 3) for v in pairs["a_minus_b"]],
            "sd of a − b": [_fmt(v, 3) for v in pairs["sd_diff"]],
            "power (observed a − b)": [_fmt(v, 2) for v in pairs["power_observed"]],
            f"power ({detect})": [_fmt(v, 2) for v in pairs["power_detect"]],
            f"seeds for {target} (observed)": [seeds_text(v) for v in pairs["seeds_observed"]],
            f"seeds for {target} ({detect})": [seeds_text(v) for v in pairs["seeds_detect"]],
        }
    )


def _budgets(finals: pd.DataFrame) -> str:
    kinds = finals[["budget_kind", "budget"]].drop_duplicates()
    text = ", ".join(f"{b:g} {k}" for k, b in kinds.itertuples(index=False))
    flops = (
        " (training FLOPs measured with PyTorch's FLOP counter at each trial's shape)"
        if "flops" in set(kinds["budget_kind"])
        else ""
    )
    return f"equal budget of {text} per trial{flops}" if len(kinds) == 1 else f"budgets {text}{flops}"


def _budget_note(trials: pd.DataFrame) -> list[str]:
    """Beside Table 2: the final trials left out of it for not spending their whole budget."""
    short = short_of_budget(trials)
    if short.empty:
        return []
    listed = ", ".join(
        f"{row.trial_id} ({row.status}: {getattr(row, SPENT[row.budget_kind]):,.4g} of {row.budget:,.4g} "
        f"{row.budget_kind})"
        for row in short.itertuples()
    )
    return [
        f"Equal budgets: {len(short)} trial(s) did not spend the whole budget and are left out of this table, "
        f"the paired comparisons and the claims: {listed}."
    ]


def _latency_sections(latency: pd.DataFrame | None, pairs: pd.DataFrame, plots: list[Path]) -> list[Section]:
    if latency is None or latency.empty:
        return [
            Section(
                "Inference latency",
                [
                    "No latency table: the sweep's latency phase has not run (an interrupted sweep runs it once its "
                    "trials are done), or these tables predate it. `flowbench latency RESULTS_DIR` times the selected "
                    "weights on the machine at hand."
                ],
            )
        ]
    return [
        Section(
            "Inference latency",
            [
                "Timed after training, with nothing else running on the node (one Ray task held all its CPUs, and a "
                "GPU on CUDA), in native numerics at the node's threads: every model side by side, warmed up, then in "
                "interleaved rounds, each call synchronised. Per device, never across devices: median over the "
                "model's checkpoints of their median ms per call, the quartiles of its calls, images per second. "
                "Density is log_prob of the model's own samples; sampling is the inverse. `flowbench latency "
                "RESULTS_DIR` adds another device's rows."
            ],
            latency_summary(latency),
            plots=[p for p in plots if p.name == "latency.png"],
        ),
        Section(
            "Paired comparisons of inference latency over rounds (time ratio a / b)",
            [
                "Rounds are the replicates: each round times every model once, side by side, so the ratio of two "
                "models' times in a round cancels whatever slowed that round; a model's time in a round is the "
                "median over its checkpoints (seeds barely change an architecture's cost). Mean log ratio over "
                "rounds with its 95% t-interval, shown as a ratio; Holm over a device, kind and batch size's pairs "
                "on a data set."
            ],
            ratio_table(pairs),
        ),
    ]


def _claims_section(
    trials: pd.DataFrame, table2: pd.DataFrame, pairs: pd.DataFrame, along: pd.DataFrame, latency: pd.DataFrame
) -> Section:
    rulings = rule_claims(trials, table2, pairs, along, latency)
    ran = sorted(set(final_trials(trials)["dataset"]))
    other = [d for d in ran if d not in PAPER_IMAGE_SHAPES]
    return Section(
        "The paper's claims",
        [
            f"{PAPER}. Each claim is paraphrased with where the paper makes it. Its verdict is computed from this "
            f"sweep's tables — paired over seeds (scipy's ttest_rel, 95% t-interval of the difference), supported or "
            f"contradicted when the Holm-adjusted p-value (over the data set's pairs) is at most {ALPHA:g} — or, for "
            f"(c) and (e), from the models' structure, as the evidence says. For bits/dim the evidence gives the "
            "power the comparison had and the seeds it would need; the last column says over which budgets the "
            "ordering holds in validation bits/dim along the budget (Holm over every pair at every milestone). "
            f"This sweep ran on: {', '.join(ran)}. "
            "A claim about a data set it did not run is not tested by it; results on other data are shown as the "
            "same comparison, without a verdict on the paper's claim"
            + (f" ({', '.join(other)} is not one of the paper's data sets)." if other else ".")
        ],
        claims_table(rulings),
        [f"({r.claim.key}) {line}" for r in rulings for line in r.same_comparison],
    )


def _along_sections(trials, table2: pd.DataFrame, summary: pd.DataFrame, along: pd.DataFrame, plots: list[Path]):
    setting = evaluation_setting(trials)
    pairs = along[["dataset", "variant", "model_a", "model_b"]].drop_duplicates()
    sentences = [
        f"{dataset}{f' ({variant})' if variant else ''}, {a} vs {b}: {along_budget(along, a, b, dataset, variant)}"
        for dataset, variant, a, b in pairs.itertuples(index=False)
    ]
    return [
        Section(
            "Along the budget: validation bits/dim at equal fractions of the budget",
            [
                f"Validation bits/dim at each milestone ({setting or NO_MILESTONES}): mean [95% t-interval] over "
                "seeds per model; "
                "the plots draw the same against the training FLOPs spent (under a FLOPs budget every model "
                "reaches a milestone at the same FLOPs, within one training step's). Test bits/dim at the end "
                "(Table 2) stays the headline."
            ],
            along_table(summary, table2),
            plots=[p for p in plots if p.name.startswith("curves-")],
        ),
        Section(
            "Paired comparisons along the budget",
            [
                f"Validation bits/dim a − b over the seeds both have at each milestone (scipy's ttest_rel), with the "
                f"Holm-adjusted p-value over every pair at every milestone of a data set (and variant); * where it "
                f"is at most {ALPHA:g}. Below, for each pair, the budgets over which one is ahead."
            ],
            along_comparison_table(along),
            sentences,
        ),
    ]


def build_report(
    out: str | Path,
    trials: pd.DataFrame,
    curves: pd.DataFrame,
    paper_bpd=paper_bpd_from_cards,
    detect: float = DETECT_BPD,
    target_power: float = TARGET_POWER,
    unfinished: list[str] | tuple[str, ...] = (),
    latency: pd.DataFrame | None = None,
) -> dict:
    """Write table2.parquet, plots, report.md and report.html under ``out``; return their paths.
    ``detect`` (bits/dim) and ``target_power``: the difference each comparison's power is stated for,
    and the power the seeds needed are counted for; ``unfinished``: the planned trials of an interrupted
    sweep that have not finished; ``latency``: the latency table, where the sweep has one."""
    out = Path(out)
    table2 = table2_frame(trials, paper_bpd)
    bpd_pairs = seeds_needed(paired_comparisons(trials), detect, target_power)
    timed = latency_pairs(latency)
    values = milestone_values(trials, curves)
    summary, along = curve_summary(values), milestone_comparisons(values)
    paths: dict[str, Path | list[Path]] = {"table2": write_table(table2, out / "table2.parquet", "table2")}
    plots = report_plots(out, summary, table2, latency)
    figures = sample_figures(out, trials)
    name = trials["sweep"].iloc[0] if len(trials) else out.name
    finals = final_trials(trials)
    status = ", ".join(f"{n} {s}" for s, n in finals["status"].value_counts().items())
    first = finals.iloc[0] if len(finals) else {}
    provenance = (
        f"flowbench {first.get('flowbench_version', '?')}, torch {first.get('torch_version', '?')}, "
        f"device {first.get('device', '?')}, commit {str(first.get('git_commit', '?'))[:10]}"
    )
    intro = [
        f"Sweep **{name}**: {len(finals)} trials ({status}), {_budgets(finals)}. Test bits/dim of the "
        f"selected checkpoints, mean ± 95% CI over seeds. {provenance}.",
        SPLITS,
        NXN_GLOW,
    ]
    if unfinished:
        intro.insert(
            0,
            f"**Incomplete**: the sweep was interrupted with {len(unfinished)} planned trial(s) unfinished "
            f"({', '.join(unfinished[:10])}{f' and {len(unfinished) - 10} more' if len(unfinished) > 10 else ''}); "
            "everything below is of the finished ones. Running the same `flowbench sweep` again resumes them and "
            "rewrites this report.",
        )
    ablations = out.parent / ABLATIONS
    if (ablations / "report.md").is_file() and out.resolve() != ablations.resolve():
        intro.append(
            f"Ablations (n×n and Glow with and without ActNorm and the learned prior): "
            f"../{ABLATIONS}/report.md (report.html beside it)."
        )
    sections = [
        Section(
            "Table 2 (test bits/dim, lower is better)", _budget_note(trials), table=paper_shaped(table2).reset_index()
        ),
        Section(
            "Validation and test bits/dim, parameters and compute",
            [
                "FLOPs are training FLOPs (forward and backward) per image at the trial's shape; parameters "
                "count what can change the map (masked entries and buffers excluded), allocated counts every "
                "entry."
            ],
            cost_table(table2),
        ),
        *mixer_sections(table2, latency),
        Section("Paired comparisons of test bits/dim over seeds", table=comparison_table(bpd_pairs)),
        Section(
            f"Seeds needed (power of the paired t-test, two-sided, α = {ALPHA:g} per comparison)",
            [
                f"For each comparison of test bits/dim: the power it had to detect the difference it observed "
                f"and a difference of {detect:g} bits/dim, and the seeds that would give {target_power:.0%} "
                "power for each, from the standard deviation of a − b over this sweep's seeds (the paired "
                "t-test's noncentral t, scipy's). The Holm correction asks for more seeds still. With fewer "
                "than two seeds there is no spread to go by (—)."
            ],
            seeds_table(bpd_pairs),
        ),
        *_along_sections(trials, table2, summary, along, plots),
        *_latency_sections(latency, timed, plots),
        _claims_section(trials, table2, bpd_pairs, along, timed),
    ]
    shown = {p for s in sections for p in s.plots}
    rest = [p for p in plots if p not in shown]
    paths["md"] = write_text_atomic(out / "report.md", markdown_page(name, intro, sections, rest, figures, out))
    paths["html"] = write_text_atomic(out / "report.html", html_page(name, intro, sections, rest, figures))
    paths["plots"] = plots
    return paths


def report_from_dir(results_dir: str | Path) -> dict:
    """The report again from a sweep's tables, with the power settings its last run used (sweep.json)."""
    results_dir = Path(results_dir)
    trials = read_table(results_dir / "trials.parquet", "trials")
    curves = read_table(results_dir / "curves.parquet", "curves")
    sweep_json = results_dir / "sweep.json"  # a sweep's: its power settings, the trials an interruption left
    meta = json.loads(sweep_json.read_text()) if sweep_json.is_file() else {}
    power = meta.get("power", {})
    return build_report(
        results_dir,
        trials,
        curves,
        detect=power.get("difference", DETECT_BPD),
        target_power=power.get("target", TARGET_POWER),
        unfinished=meta.get("unfinished", []),
        latency=read_table(results_dir / LATENCY_FILE, "latency") if (results_dir / LATENCY_FILE).is_file() else None,
    )
