"""The report: table2.parquet, report.md, a self-contained report.html and PNG plots, all
regenerated from the trials and curves tables alone."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from flowbench.atomic import atomic_write
from flowbench.results.table2 import final_trials, paired_comparisons, table2_frame
from flowbench.results.tables import read_table, write_table

PLOTS = "plots"


def paper_bpd_from_cards(model: str, dataset: str):
    from flowbench.cards import load_card

    return load_card(model).paper_bpd(dataset)


def _fmt(value, digits=2, suffix="") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"


def _bpd_cell(row) -> str:
    ci = f" ± {row.bpd_ci95:.2f}" if not math.isnan(row.bpd_ci95) else ""
    return f"{_fmt(row.bpd_mean)}{ci}" if row.n_seeds else f"— ({row.n_trials} failed)"


def paper_shaped(table2: pd.DataFrame) -> pd.DataFrame:
    """Models × datasets of 'mean ± CI', with the paper's figure beside each dataset."""
    out = pd.DataFrame(index=pd.Index(table2["model"].unique(), name="model"))
    for dataset in table2["dataset"].unique():
        part = table2[table2["dataset"] == dataset].set_index("model")
        out[f"{dataset} (ours)"] = [_bpd_cell(part.loc[m]) if m in part.index else "" for m in out.index]
        out[f"{dataset} (paper)"] = [_fmt(part.loc[m, "paper_bpd"]) if m in part.index else "" for m in out.index]
    return out


def cost_table(table2: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": table2["model"], "dataset": table2["dataset"],
        "parameters": [f"{p / 1e6:.2f}M" for p in table2["num_params"]],
        "steps (mean)": [_fmt(s, 0) for s in table2["steps_mean"]],
        "train images/s": [_fmt(t, 1) for t in table2["throughput_images_per_s"]],
        "log_prob ms": [_fmt(v, 1) for v in table2["density_latency_ms"]],
        "sample ms": [_fmt(v, 1) for v in table2["sample_latency_ms"]],
    })


def comparison_table(pairs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "dataset": pairs["dataset"], "a": pairs["model_a"], "b": pairs["model_b"], "seeds": pairs["n_seeds"],
        "bpd a − b": [f"{d:+.3f} ± {c:.3f}" if not math.isnan(c) else _fmt(d, 3) for d, c in zip(pairs["a_minus_b"], pairs["ci95"])],
        "p (paired t)": [_fmt(p, 3) for p in pairs["p_value"]],
        "significant (Holm, 5%)": ["yes" if s else "no" for s in pairs["significant"]],
    })


def _plots(out: Path, trials: pd.DataFrame, curves: pd.DataFrame, table2: pd.DataFrame) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = out / PLOTS
    plot_dir.mkdir(parents=True, exist_ok=True)
    models = list(table2["model"].unique())
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(models)}
    written = []

    def save(fig, name):
        path = plot_dir / name
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    finals = final_trials(trials)
    seconds = (finals["budget_kind"] == "seconds").all() and "train_seconds" in curves.columns
    x_axis = "train_seconds" if seconds else "step"
    for dataset in table2["dataset"].unique():
        fig, ax = plt.subplots(figsize=(6, 4))
        ids = set(finals.loc[finals["dataset"] == dataset, "trial_id"])
        part = curves[curves["trial_id"].isin(ids) & (curves["dataset"] == dataset)]
        for (model, _), c in part.groupby(["model", "trial_id"], sort=False):
            label = model if model not in ax.get_legend_handles_labels()[1] else None
            ax.plot(c[x_axis], c["test_bpd"], color=colours.get(model), alpha=0.8, label=label, marker=".")
        ax.set(xlabel="training seconds" if x_axis == "train_seconds" else "step", ylabel="test bits/dim",
               title=f"{dataset}: test bits/dim during training (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"curves-{dataset}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = dict(zip(table2["dataset"].unique(), "osD^vP*"))
    for row in table2.itertuples():
        ax.errorbar(row.num_params / 1e6, row.bpd_mean, yerr=0 if math.isnan(row.bpd_ci95) else row.bpd_ci95,
                    fmt=markers[row.dataset], color=colours[row.model], capsize=3, label=f"{row.model} ({row.dataset})")
    ax.set(xlabel="parameters (millions)", ylabel="test bits/dim (mean ± 95% CI)", title="bits/dim against size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "bpd-vs-params.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r.model}\n{r.dataset}" for r in table2.itertuples()]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, table2["density_latency_ms"], 0.4, label="log_prob")
    ax.bar(x + 0.2, table2["sample_latency_ms"], 0.4, label="sample")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylabel="ms per batch (median)", title="inference latency")
    ax.legend()
    save(fig, "latency.png")
    return written


def _sample_figures(out: Path, trials: pd.DataFrame) -> list[tuple[str, Path, Path | None]]:
    """(caption, samples.png, reconstructions.png) for the lowest-seed ok trial per model and data set."""
    finals = final_trials(trials)
    ok = finals[finals["status"] == "ok"].sort_values("seed")
    figures = []
    for (model, dataset), group in ok.groupby(["model", "dataset"], sort=False):
        trial = group.iloc[0]["trial_id"]
        samples = out / "figures" / f"samples-{trial}.png"
        recon = out / "figures" / f"reconstructions-{trial}.png"
        if samples.is_file():
            figures.append((f"{model} on {dataset} (seed {group.iloc[0]['seed']})", samples, recon if recon.is_file() else None))
    return figures


def build_report(out: str | Path, trials: pd.DataFrame, curves: pd.DataFrame, paper_bpd=paper_bpd_from_cards) -> dict:
    """Write table2.parquet, plots, report.md and report.html under ``out``; return their paths."""
    out = Path(out)
    table2 = table2_frame(trials, paper_bpd)
    pairs = paired_comparisons(trials)
    paths = {"table2": write_table(table2, out / "table2.parquet", "table2")}
    plots = _plots(out, trials, curves, table2)
    figures = _sample_figures(out, trials)
    name = trials["sweep"].iloc[0] if len(trials) else out.name
    finals = final_trials(trials)
    budget = f"{finals['budget'].iloc[0]:g} {finals['budget_kind'].iloc[0]}" if len(finals) else "?"
    status = ", ".join(f"{n} {s}" for s, n in finals["status"].value_counts().items())
    first = finals.iloc[0] if len(finals) else {}
    provenance = (f"flowbench {first.get('flowbench_version', '?')}, torch {first.get('torch_version', '?')}, "
                  f"device {first.get('device', '?')}, commit {str(first.get('git_commit', '?'))[:10]}")
    intro = (f"Sweep **{name}**: {len(finals)} trials ({status}), equal budget of {budget} per trial. "
             f"Bits/dim on the held-out split, mean ± 95% CI over seeds. {provenance}.")
    sections = [
        ("Table 2 (bits/dim, lower is better)", paper_shaped(table2).reset_index()),
        ("Parameters, throughput and latency", cost_table(table2)),
        ("Paired comparisons over seeds", comparison_table(pairs)),
    ]
    paths["md"] = _write_atomic(out / "report.md", _markdown(name, intro, sections, plots, figures, out))
    paths["html"] = _write_atomic(out / "report.html", _html(name, intro, sections, plots, figures))
    paths["plots"] = plots
    return paths


def _markdown(name, intro, sections, plots, figures, out: Path) -> str:
    lines = [f"# flowbench report: {name}", "", intro, ""]
    for title, frame in sections:
        lines += [f"## {title}", "", frame.to_markdown(index=False, disable_numparse=True) if len(frame) else "(none)", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots] + [""]
    if figures:
        lines += ["## Samples (temperature 0.7) and reconstructions (top: data, bottom: decode(encode(x)))", ""]
        for caption, samples, recon in figures:
            lines += [f"**{caption}**", "", f"![samples]({samples.relative_to(out)})"]
            lines += [f"![reconstructions]({recon.relative_to(out)})"] if recon else []
            lines.append("")
    return "\n".join(lines)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html(name, intro, sections, plots, figures) -> str:
    import re

    intro_html = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(intro))
    body = [f"<h1>flowbench report: {html.escape(name)}</h1>", f"<p>{intro_html}</p>"]
    for title, frame in sections:
        body += [f"<h2>{html.escape(title)}</h2>", frame.to_html(index=False, border=0, na_rep="—") if len(frame) else "<p>(none)</p>"]
    body += ["<h2>Plots</h2>", '<div class="row">'] + [_img(p, p.stem) for p in plots] + ["</div>"]
    if figures:
        body.append("<h2>Samples (temperature 0.7) and reconstructions</h2>")
        for caption, samples, recon in figures:
            body += [f"<figure>{_img(samples, 'samples')}" + (_img(recon, "reconstructions") if recon else "")
                     + f"<figcaption>{html.escape(caption)}</figcaption></figure>"]
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:4px}.row img{width:48%}"
             "figure{display:inline-block;margin:8px;vertical-align:top}figcaption{font-size:90%;color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>flowbench: {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def _write_atomic(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


def report_from_dir(results_dir: str | Path) -> dict:
    results_dir = Path(results_dir)
    trials = read_table(results_dir / "trials.parquet", "trials")
    curves = read_table(results_dir / "curves.parquet", "curves")
    return build_report(results_dir, trials, curves)
