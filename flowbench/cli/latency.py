"""``flowbench latency RESULTS_DIR``: a finished sweep's selected weights timed again on the machine at
hand (train on a cluster, time on the GPU you deploy on; or time on an idle machine), that device's
rows added to its latency table and the report written again."""

from __future__ import annotations

import os
from pathlib import Path

from flowbench.errors import FlowbenchError
from flowbench.locks import exclusive_lock


def cmd_latency(args) -> None:
    import torch

    from flowbench.results.report import report_from_dir
    from flowbench.sweep.latency import LATENCY_FILE, retime

    out = Path(args.results_dir)
    if not (out / "trials.parquet").is_file():
        raise FlowbenchError(f"{out}: no trials.parquet there; give a sweep's results folder (results/NAME)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or len(os.sched_getaffinity(0))
    with exclusive_lock(out, f"flowbench latency {out.name}"):
        table, timed = retime(out, device, args.batch_sizes, args.rounds, args.warmup, threads)
        paths = report_from_dir(out)
    devices = sorted(table["device"].unique())
    print(f"timed {len(timed)} rows on {timed[0]['device']} ({args.rounds} interleaved rounds)")
    print(f"{out / LATENCY_FILE}: {len(table)} rows on {len(devices)} device(s): {'; '.join(devices)}")
    print(f"wrote {paths['md']} and {paths['html']}")
