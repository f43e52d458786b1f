"""Long-format Parquet tables with a schema version, written atomically.

``trials.parquet`` holds one row per trial, exactly the columns of ``flowbench.record.TrialRecord``;
``curves.parquet`` one row per (trial, evaluation); ``table2.parquet`` one row per (model, variant,
dataset); ``latency.parquet`` one row per (trial, kind, batch size, device).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flowbench.atomic import atomic_write
from flowbench.errors import FlowbenchError
from flowbench.record import RECORD_COLUMNS

# 2: val_bpd (selection) beside test_bpd (once, on the selected checkpoint), variant, effective and
# allocated parameter counts, FLOPs. Version 1 tables ranked trials by test bits/dim: not read.
# 3: evaluations at milestones along the budget (curves: milestone, budget_fraction; trials:
# evaluations, eval_images); version 2 curves were evaluated every N steps, at unequal compute. Trials
# name what their numbers depend on (numerics mode, CPU, ATen's kernels, threads, math libraries, GPU) and
# their compile_seconds
# 4: latency is a table of its own (latency.parquet, one row per trial × kind × batch size × device,
# timed after training with nothing else running); trials and table2 no longer carry latency columns
SCHEMA_VERSION = 4
# one evaluation of a trial (on the validation split): what curves.parquet and MLflow's metric
# histories hold per step
CURVE_METRICS = (
    "val_bpd",
    "train_bpd",
    "lr",
    "train_seconds",
    "train_flops",
    "images_seen",
    "epochs",
    "milestone",  # k: the evaluation at k/N of the budget (N: the trial's evaluations)
    "budget_fraction",  # what of the budget was spent, in its own unit
)
# what identifies a trial's rows in curves.parquet
CURVE_KEYS = ("sweep", "trial_id", "model", "variant", "dataset", "seed", "config_hash")
METADATA_KEY = b"flowbench"
REQUIRED = {
    "trials": RECORD_COLUMNS,
    "curves": [*CURVE_KEYS, "step", "val_bpd", "train_bpd", "train_flops", "milestone", "budget_fraction"],
    "table2": [
        "model",
        "variant",
        "dataset",
        "n_seeds",
        "test_bpd_mean",
        "test_bpd_ci_low",
        "test_bpd_ci_high",
        "val_bpd_mean",
        "num_params",
        "flops_per_image",
        "paper_bpd",
    ],
    "latency": ["trial_id", "model", "dataset", "seed", "kind", "batch_size", "device", "median_ms", "times_ms"],
}


def write_table(frame: pd.DataFrame, path: str | Path, kind: str) -> Path:
    """Write ``frame`` as ``kind`` to ``path``: temp file then rename, never half a file.

    A trials table holds exactly the TrialRecord's columns, in their declared order."""
    missing = [c for c in REQUIRED[kind] if c not in frame.columns]
    if missing:
        raise ValueError(f"a {kind} table needs columns {missing}")
    if kind == "trials":
        extra = [c for c in frame.columns if c not in RECORD_COLUMNS]
        if extra:
            raise ValueError(f"columns {extra} are not declared in flowbench.record.TrialRecord; declare them there")
        frame = frame[RECORD_COLUMNS]
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    meta = {METADATA_KEY: json.dumps({"kind": kind, "schema_version": SCHEMA_VERSION}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(path: str | Path, kind: str) -> pd.DataFrame:
    """Read a table written by ``write_table``; a foreign, corrupted or other-version file is refused."""
    path = Path(path)
    if not path.is_file():
        raise FlowbenchError(f"{path}: no {kind} table there; run the sweep first (flowbench sweep SPEC)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise FlowbenchError(f"{path}: corrupted or not a Parquet file ({err}); delete it and re-run") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not meta or meta.get("kind") != kind:
        found = meta.get("kind") if meta else "no flowbench table"
        raise FlowbenchError(f"{path}: not a flowbench {kind} table ({found}); give the file flowbench wrote")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise FlowbenchError(
            f"{path}: {kind} table of schema version {meta.get('schema_version')}, this flowbench reads "
            f"version {SCHEMA_VERSION} (latency in a table of its own, timed after training); re-run "
            f"the sweep (flowbench sweep SPEC) or use the flowbench version that wrote it"
        )
    return table.to_pandas()


def trials_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def curves_frame(trials: list[dict], curves: list[list[dict]]) -> pd.DataFrame:
    """Long format: one row per (trial, evaluation), keyed by the trial's identity."""
    rows = [
        {**{k: t[k] for k in CURVE_KEYS}, **point} for t, curve in zip(trials, curves, strict=True) for point in curve
    ]
    return pd.DataFrame(rows, columns=None if rows else REQUIRED["curves"])
