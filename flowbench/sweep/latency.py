"""The latency table and the sweep's latency phase.

Once a sweep's trials have trained, the selected weights of its ok trials (``weights/TRIAL.pt`` in
the results folder, copied there as each unit is recorded) are timed by ``flowbench.trial.latency``
in ONE Ray task that holds every CPU of a node, and a GPU when timing on CUDA: Ray's scheduler keeps
any trial off that node while it runs. ``latency.parquet`` holds one row per trial × kind (density,
sampling) × batch size × device, with every round's time; the phase resumes like the rest of a
sweep: it times only what the table lacks for its kind of device. ``flowbench latency`` (``retime``)
times a finished sweep again on the machine at hand and adds (or replaces) that device's rows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from flowbench import stopping
from flowbench.errors import FlowbenchError
from flowbench.results.latency import LATENCY_FILE
from flowbench.results.table2 import compared, final_trials
from flowbench.results.tables import read_table, write_table
from flowbench.trial.latency import KINDS, time_in_native_process

WEIGHTS_DIR = "weights"  # a results folder's selected weights, one file a trial
KEY = ["trial_id", "kind", "batch_size", "device"]
IDENTITY = ["model", "variant", "dataset", "seed"]  # copied from trials.parquet beside each row


def weights_file(folder: Path, trial_id: str) -> Path:
    """A trial's selected weights in ``folder`` (a results folder's ``WEIGHTS_DIR``; the Ray task's own)."""
    return folder / f"{trial_id}.pt"


def read_latency(out: Path) -> pd.DataFrame | None:
    """The folder's latency table, or None when it has none yet."""
    return read_table(out / LATENCY_FILE, "latency") if (out / LATENCY_FILE).is_file() else None


def latency_items(
    trials: pd.DataFrame, out: Path, timed: set[tuple[str, str, int]], batch_sizes: list[int]
) -> list[dict]:
    """The ok final trials with some kind × batch size not in ``timed``: their weights, or what
    builds the architecture where the weights are gone (a committed reference run ships none)."""
    from flowbench.data import dataset_info

    items = []
    finals = final_trials(trials)
    for row in finals[compared(finals)].itertuples():
        if all((row.trial_id, kind, b) in timed for kind in KINDS for b in batch_sizes):
            continue
        weights = weights_file(out / WEIGHTS_DIR, row.trial_id)
        item = {"trial_id": row.trial_id, "model": row.model, "hparams": row.hparams, "weights": str(weights)}
        if not weights.is_file():
            item["image_shape"] = list(dataset_info(row.dataset).image_shape)
        items.append(item)
    return items


def add_rows(out: Path, trials: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """Merge timed ``rows`` into the folder's table (a row of the same key replaced), atomically."""
    if not rows:
        found = read_latency(out)
        return found if found is not None else pd.DataFrame()
    fresh = pd.DataFrame(rows).merge(trials[["trial_id", *IDENTITY]], on="trial_id", how="left")
    found = read_latency(out)
    if found is not None:
        keys = set(map(tuple, fresh[KEY].itertuples(index=False)))
        kept = found[[tuple(k) not in keys for k in found[KEY].itertuples(index=False)]]
        fresh = pd.concat([kept, fresh], ignore_index=True)
    write_table(fresh, out / LATENCY_FILE, "latency")
    return fresh


def retime(
    out: Path, device: str, batch_sizes: list[int], rounds: int, warmup: int, threads: int
) -> tuple[pd.DataFrame, list[dict]]:
    """``flowbench latency``: every ok final trial timed again here; returns the table and the rows timed."""
    trials = read_table(out / "trials.parquet", "trials")
    items = latency_items(trials, out, set(), batch_sizes)
    if not items:
        raise FlowbenchError(f"{out}: no ok final trial to time; run the sweep first")
    job = {"items": items, "device": device, "batch_sizes": batch_sizes, "rounds": rounds, "warmup": warmup}
    rows = time_in_native_process(job | {"threads": threads})
    return add_rows(out, trials, rows), rows


def _timed_on_a_node(job: dict, weights: dict[str, bytes]) -> list[dict]:
    """The Ray task's body: the weights written to a folder of its own, then timed."""
    with tempfile.TemporaryDirectory() as folder:
        for item in job["items"]:
            if item["trial_id"] in weights:
                path = weights_file(Path(folder), item["trial_id"])
                path.write_bytes(weights[item["trial_id"]])
                item["weights"] = str(path)
            else:
                item.pop("weights", None)
        return time_in_native_process(job)


def _node(trials: pd.DataFrame, gpus: int) -> tuple[str, int]:
    """The alive node to time on, and its CPUs: where most trials ran, among nodes with the
    resources (a GPU for CUDA, a CPU otherwise; a head with CPU 0 runs no trial)."""
    import ray

    able = {
        n["NodeID"]: int(n["Resources"].get("CPU", 0))
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("CPU", 0) >= 1 and n["Resources"].get("GPU", 0) >= gpus
    }
    if not able:
        kind = "a GPU and a CPU" if gpus else "a CPU"
        raise FlowbenchError(f"latency phase: no node of the cluster has {kind}; start one and run the sweep again")
    ran = trials["node"].value_counts()
    node = max(able, key=lambda n: (int(ran.get(n, 0)), able[n]))
    return node, able[node]


def run_phase(spec, out: Path, trials: pd.DataFrame, start_ray: Callable[[], None]) -> tuple[pd.DataFrame | None, bool]:
    """Time what the latency table lacks for this sweep's kind of device, in one Ray task holding a
    whole node (``start_ray`` joins Ray first: a run with nothing left to train has not); the table
    (None: no ok trial) and whether it lacks nothing now. A stop asked for meanwhile cancels the task:
    nothing is written, and the next run times the same again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    settings = spec.latency
    device = settings.device if settings.device != "auto" else ("cuda" if spec.resources.gpu > 0 else "cpu")
    found = read_latency(out)
    timed = set()
    if found is not None:
        mine = found[found["device_kind"] == device]
        timed = set(zip(mine["trial_id"], mine["kind"], mine["batch_size"].astype(int), strict=True))
    items = latency_items(trials, out, timed, settings.batch_sizes)
    if not items:
        return found, True
    start_ray()
    gpus = 1 if device == "cuda" else 0
    node, cpus = _node(trials, gpus)
    weights = {i["trial_id"]: Path(i["weights"]).read_bytes() for i in items if Path(i["weights"]).is_file()}
    job = {
        "items": items,
        "device": device,
        "batch_sizes": settings.batch_sizes,
        "rounds": settings.rounds,
        "warmup": settings.warmup,
        "threads": cpus,  # every CPU the task holds
    }
    task = ray.remote(_timed_on_a_node).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    )
    print(
        f"latency: timing {len(items)} trials' selected weights ({device}, batch sizes "
        f"{', '.join(map(str, settings.batch_sizes))}, {settings.rounds} interleaved rounds) on a node held whole",
        flush=True,
    )
    ref = task.remote(job, weights)
    while not ray.wait([ref], timeout=0.5)[0] and not stopping.requested():
        pass
    if stopping.requested():  # asked before the task ended (Ctrl-C reaches its process too, and fails it)
        ray.cancel(ref, force=True)
        return found, False
    try:
        rows = ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(err.cause, FlowbenchError) else err
        raise FlowbenchError(f"latency phase: {str(cause).strip().splitlines()[-1]}") from None
    return add_rows(out, trials, rows), True


def describe(latency: pd.DataFrame | None) -> str:
    """One line for a sweep's summary: the devices timed and when."""
    if latency is None or latency.empty:
        return "no latency table"
    devices = sorted(latency["device"].unique())
    when = str(latency["ended_at"].max())[:16].replace("T", " ")  # ISO 8601 UTC, to the minute
    return f"{len(latency)} rows on {'; '.join(devices)} (last timed {when} UTC)"
