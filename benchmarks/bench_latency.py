"""A sweep's latency table checked against an isolated benchmark of the same architectures.

    python benchmarks/bench_latency.py results/table2-cpu [--batch-sizes 1 16 --rounds 5]

The sweep's latency phase (``flowbench.sweep.latency``) times every checkpoint once per round,
interleaved, in a process of its own. Here each model (one checkpoint per model and data set: seeds
barely change an architecture's cost) is timed by ``torch.utils.benchmark`` in this process, in
interleaved rounds (``timing.py``), at the threads the table records, on the CPU. Printed per kind
and batch size: each model's time over Glow's (or the first model's) by both methods, and their
quotient; the two methods agree where it is near 1. Run it on the machine and at the threads the
table's rows name: ratios from other machines are not comparable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from flowbench.results.latency import latency_summary
from flowbench.results.tables import read_table
from flowbench.sweep.latency import latency_items
from flowbench.trial.latency import model_for
from timing import time_interleaved  # benchmarks/timing.py: the script's folder is on sys.path


def models_of(out: Path, latency: pd.DataFrame) -> dict[str, torch.nn.Module]:
    """One model per model name, its lowest seed's, built as the latency phase builds it."""
    trials = read_table(out / "trials.parquet", "trials")
    first = set(latency.sort_values("seed").groupby("model", sort=False).trial_id.first())
    items = latency_items(trials[trials.trial_id.isin(first)], out, set(), [1])
    return {item["model"]: model_for(item, torch.device("cpu"))[0] for item in items}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds each candidate is timed per round")
    args = p.parse_args()
    out = Path(args.results_dir)
    latency = read_table(out / "latency.parquet", "latency")
    latency = latency[latency.device_kind == "cpu"]
    device = sorted(latency.device.unique())[0]  # one device's rows: the table never mixes them
    latency = latency[(latency.device == device) & (latency.variant == "")]
    threads = int(latency.threads.iloc[0])
    torch.set_num_threads(threads)
    models = models_of(out, latency)
    base = "glow" if "glow" in models else next(iter(models))
    table = latency_summary(latency).set_index(["model", "kind", "batch_size"])["median ms"]
    print(f"{out}: its latency table on {device}; here: torch.utils.benchmark, {threads} threads")
    for batch in args.batch_sizes:
        with torch.inference_mode():
            inputs = {m: model.sample(batch, generator=torch.Generator().manual_seed(0)) for m, model in models.items()}
            candidates = {}
            for m, model in models.items():
                candidates[(m, "density")] = lambda model=model, x=inputs[m]: model.log_prob(x)
                candidates[(m, "sampling")] = lambda model=model, b=batch: model.sample(b)
            named = {f"{m} {k}": fn for (m, k), fn in candidates.items()}
            timed = time_interleaved(named, args.rounds, threads, args.min_run_time, label=f"batch {batch}")
        for kind in ("density", "sampling"):
            print(f"  {kind}, batch {batch}: model / {base}   table   here   table÷here")
            for m in models:
                if (m, kind, batch) not in table.index:
                    continue
                in_table = table[(m, kind, batch)] / table[(base, kind, batch)]
                here, lo, hi = timed.ratio(f"{m} {kind}", f"{base} {kind}")
                print(f"    {m:12s} {in_table:6.3f}  {here:6.3f} ({lo:.2f}–{hi:.2f})  {in_table / here:6.3f}")


if __name__ == "__main__":
    main()
