"""Long-format Parquet tables with a schema version, written atomically.

``trials.parquet`` holds one row per trial (the TrialRecord), ``curves.parquet`` one row per
(trial, evaluation), ``table2.parquet`` one row per (model, dataset).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flowbench.atomic import atomic_write
from flowbench.errors import FlowbenchError

SCHEMA_VERSION = 1
# one evaluation of a trial: what curves.parquet and MLflow's metric histories hold per step
CURVE_METRICS = ("test_bpd", "train_bpd", "lr", "train_seconds", "images_seen", "epochs")
# where and with what a trial ran; MLflow keeps them as tags of the trial's run
PROVENANCE_COLUMNS = ("flowbench_version", "torch_version", "device", "git_commit", "hostname", "workers",
                      "memory_kind", "finished_at")
METADATA_KEY = b"flowbench"
REQUIRED = {
    "trials": ["sweep", "trial_id", "model", "dataset", "seed", "config_hash", "status", "test_bpd", "num_params"],
    "curves": ["sweep", "trial_id", "model", "dataset", "seed", "step", "test_bpd", "train_bpd"],
    "table2": ["model", "dataset", "bpd_mean", "bpd_ci95", "n_seeds", "paper_bpd"],
}


def write_table(frame: pd.DataFrame, path: str | Path, kind: str) -> Path:
    """Write ``frame`` as ``kind`` to ``path``: temp file then rename, never half a file."""
    missing = [c for c in REQUIRED[kind] if c not in frame.columns]
    if missing:
        raise ValueError(f"a {kind} table needs columns {missing}")
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
            f"version {SCHEMA_VERSION}; re-run the sweep or use the flowbench version that wrote it"
        )
    return table.to_pandas()


def trials_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else REQUIRED["trials"])


def curves_frame(trials: list[dict], curves: list[list[dict]]) -> pd.DataFrame:
    """Long format: one row per (trial, evaluation), keyed by the trial's identity."""
    keys = ["sweep", "trial_id", "model", "dataset", "seed", "config_hash"]
    rows = [{**{k: t[k] for k in keys}, **point} for t, curve in zip(trials, curves) for point in curve]
    return pd.DataFrame(rows, columns=None if rows else REQUIRED["curves"])
