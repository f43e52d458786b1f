"""The mixer table: every invertible mixer of a sweep on the shared backbone, our bits/dim beside the
bits/dim its own paper reports, its size, its cost and how it is inverted."""

from __future__ import annotations

import math

import pandas as pd

from flowbench.results.render import Section

PAPER_DATASETS = {"cifar10": "CIFAR-10", "imagenet32": "ImageNet 32", "imagenet64": "ImageNet 64"}


def _card(model: str):
    from flowbench.cards import load_card
    from flowbench.errors import FlowbenchError

    try:
        return load_card(model)
    except FlowbenchError:  # a model no longer registered here: its rows stand without card columns
        return None


def published_cell(model: str, dataset: str) -> str:
    """The card's published bits/dim on a paper data set, with its source ("—" without one)."""
    card = _card(model)
    published = card.published(dataset) if card is not None else None
    if published is None:
        paper = card.paper_bpd(dataset) if card is not None else None  # the n×n paper's Table 2
        return "—" if paper is None else f"{paper:.2f} (n×n paper's Table 2)"
    if published.bpd is None:
        return published.source.split(":")[0].split(" (")[0]  # "not reported" / "not read here"
    return f"{published.bpd:.2f} ({published.source})"


def _ms(latency: pd.DataFrame | None, model: str, kind: str) -> str:
    if latency is None or not len(latency):
        return "—"
    rows = latency[(latency["model"] == model) & (latency["kind"] == kind) & (latency["batch_size"] == 1)]
    return "—" if rows.empty else f"{rows['median_ms'].median():.1f}"


def mixer_table(table2: pd.DataFrame, latency: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (model, data set) of the sweep's models that have a mixer (a card with ``inverse``):
    test bits/dim, mean [95% interval] over seeds; the bits/dim its paper reports per paper data set;
    effective parameters; training FLOPs per image; density and sampling latency at batch 1 (median
    over its checkpoints, on ``latency``'s one device); the inverse's kind."""
    rows = []
    for r in table2[table2["variant"] == ""].itertuples():
        card = _card(r.model)
        if card is None or card.inverse is None:
            continue
        interval = "" if math.isnan(r.test_bpd_ci_low) else f" [{r.test_bpd_ci_low:.3f}, {r.test_bpd_ci_high:.3f}]"
        rows.append(
            {
                "mixer": r.model,
                "inverse": card.inverse,
                f"test bpd, {r.dataset} (ours)": f"{r.test_bpd_mean:.3f}{interval}",
                "seeds": int(r.n_seeds),
                **{f"{label} (published)": published_cell(r.model, d) for d, label in PAPER_DATASETS.items()},
                "parameters (effective)": f"{int(r.num_params):,}",
                "FLOPs / image": f"{r.flops_per_image:.3g}",
                "density ms (batch 1)": _ms(latency, r.model, "density"),
                "sampling ms (batch 1)": _ms(latency, r.model, "sampling"),
            }
        )
    return pd.DataFrame(rows)


def mixer_sections(table2: pd.DataFrame, latency: pd.DataFrame | None = None) -> list[Section]:
    """The report's mixer section, where the sweep compares two or more mixers (none otherwise)."""
    table = mixer_table(table2, latency)
    if len(table) < 2:
        return []
    return [
        Section(
            "Mixers on one backbone",
            [
                "Every mixer sits in the same backbone (Glow's multi-scale architecture: ActNorm → mixer → affine "
                "coupling, learned priors) at the sweep's depth, levels and matched parameters, trained on the same "
                "budget: the mixer is the only difference. Ours: test bits/dim, mean [95% interval] over seeds, on "
                "this sweep's data. Published: what the mixer's own paper reports on its data sets with its own "
                "architecture and budget (the card's `published`, with its source): a reference, not a comparison "
                "at equal compute. Latency: median over the model's checkpoints at batch 1, where the sweep has "
                "a latency table."
            ],
            table,
        )
    ]
