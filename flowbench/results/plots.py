"""Figures: sample grids (the paper's Figures 1 and 5), curves, bits/dim against size, latency."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from flowbench.atomic import atomic_write
from flowbench.results.table2 import final_trials

PLOTS = "plots"  # the report's folder of figures


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] → one uint8 [H', W', 3] picture, images in rows of ``columns``."""
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(images):
        i, j = divmod(k, columns)
        rgb = np.repeat(img, 3, axis=0) if c == 1 else img[:3]
        top, left = pad + i * (h + pad), pad + j * (w + pad)
        grid[top : top + h, left : left + w] = rgb.transpose(1, 2, 0)
    return grid


def save_png(picture: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Atomically write an RGB uint8 array as PNG, enlarged ``scale``× (nearest neighbour)."""
    from PIL import Image

    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_write(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return Path(path)


def series_label(model: str, variant: str) -> str:
    return f"{model} ({variant})" if variant else model


def report_plots(
    out: Path, summary: pd.DataFrame, table2: pd.DataFrame, latency: pd.DataFrame | None = None
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = out / PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(series_label(m, v) for m, v in zip(table2["model"], table2["variant"], strict=True)))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(labels)}
    written = []

    def save(fig, name):
        path = plot_dir / name
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    for dataset in table2["dataset"].unique():
        fig, ax = plt.subplots(figsize=(6, 4))
        part = summary[summary["dataset"] == dataset]
        for (model, variant), c in part.groupby(["model", "variant"], sort=False):
            c = c.sort_values("train_flops_mean")
            label = series_label(model, variant)
            ax.plot(c["train_flops_mean"], c["val_bpd_mean"], color=colours.get(label), label=label, marker=".")
            ax.fill_between(
                c["train_flops_mean"], c["val_bpd_ci_low"], c["val_bpd_ci_high"], color=colours.get(label), alpha=0.2
            )
        ax.set(
            xlabel="training FLOPs",
            ylabel="validation bits/dim",
            title=f"{dataset}: along the budget (mean, 95% interval over seeds)",
        )
        ax.grid(alpha=0.3)
        if len(part):
            ax.legend()
        save(fig, f"curves-{dataset}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = dict(zip(table2["dataset"].unique(), "osD^vP*", strict=False))
    for row in table2.itertuples():
        label = series_label(row.model, row.variant)
        half = (row.test_bpd_ci_high - row.test_bpd_ci_low) / 2
        ax.errorbar(
            row.num_params / 1e6,
            row.test_bpd_mean,
            yerr=0 if math.isnan(half) else half,
            fmt=markers[row.dataset],
            color=colours[label],
            capsize=3,
            label=f"{label} ({row.dataset})",
        )
    ax.set(
        xlabel="effective parameters (millions)", ylabel="test bits/dim (mean ± 95% CI)", title="bits/dim against size"
    )
    ax.grid(alpha=0.3)
    if len(table2):  # an interrupted sweep may have finished nothing yet
        ax.legend(fontsize=8)
    save(fig, "bpd-vs-params.png")

    if latency is not None and len(latency):
        # one device (the first timed): latencies of different devices are never set side by side
        device = sorted(latency["device"].unique())[0]
        at = latency[(latency["device"] == device) & (latency["batch_size"] == latency["batch_size"].min())]
        medians = at.groupby(["model", "variant", "dataset", "kind"], sort=False)["median_ms"].median().unstack("kind")
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [f"{series_label(m, v)}\n{d}" for m, v, d in medians.index]
        x = np.arange(len(names))
        for offset, kind in ((-0.2, "density"), (0.2, "sampling")):
            if kind in medians:
                ax.bar(x + offset, medians[kind], 0.4, label=kind)
        ax.set_xticks(x, names, fontsize=8)
        batch = int(at["batch_size"].iloc[0])
        ax.set(ylabel=f"ms at batch {batch} (median over checkpoints)", title=f"inference latency on {device}")
        ax.legend()
        save(fig, "latency.png")
    return written


def sample_figures(out: Path, trials: pd.DataFrame) -> list[tuple[str, Path, Path | None]]:
    """(caption, samples.png, reconstructions.png) for the lowest-seed ok trial per model, variant and data set."""
    finals = final_trials(trials)
    ok = finals[finals["status"] == "ok"].sort_values("seed")
    figures = []
    for (model, variant, dataset), group in ok.groupby(["model", "variant", "dataset"], sort=False):
        trial = group.iloc[0]["trial_id"]
        samples = out / "figures" / f"samples-{trial}.png"
        recon = out / "figures" / f"reconstructions-{trial}.png"
        if samples.is_file():
            caption = f"{series_label(model, variant)} on {dataset} (seed {group.iloc[0]['seed']})"
            figures.append((caption, samples, recon if recon.is_file() else None))
    return figures
