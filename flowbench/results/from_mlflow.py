"""Rebuild the trials and curves tables from an MLflow experiment's child runs alone."""

from __future__ import annotations

import json
import os

import pandas as pd

from flowbench.errors import FlowbenchError
from flowbench.results.tables import CURVE_METRICS, PROVENANCE_COLUMNS

# what the sweep's MlflowCallback writes and this reads back
FINAL_PREFIX = "final_"  # a trial's final figures are metrics final_<column>
PARENT_TAG = "mlflow.parentRunId"  # trial runs are the sweep run's children
INT_COLUMNS = ("seed", "batch_size", "steps", "images_seen", "num_params", "latency_batch_size")


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def tables_from_mlflow(uri: str, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as err:
        raise FlowbenchError(f"cannot read MLflow at {uri}: {err.message.splitlines()[0]}") from None
    if exp is None:
        raise FlowbenchError(f"MLflow at {uri} has no experiment {experiment!r}; the experiment is the sweep's name")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=50000) if PARENT_TAG in r.data.tags]
    if not runs:
        raise FlowbenchError(f"experiment {experiment!r} at {uri} has no trial runs yet")
    trials, curves = [], []
    for run in runs:
        row = {k: _value(v) for k, v in run.data.params.items() if not k.startswith("hparams.")}
        row["hparams"] = json.dumps({k[8:]: _value(v) for k, v in run.data.params.items() if k.startswith("hparams.")},
                                    sort_keys=True)
        row.update({k[len(FINAL_PREFIX):]: v for k, v in run.data.metrics.items() if k.startswith(FINAL_PREFIX)})
        row.update(status=run.data.tags.get("status", "stopped"), reason=run.data.tags.get("reason", ""),
                   phase=run.data.tags.get("phase", "final"), config_hash=run.data.tags.get("config_hash", ""))
        row.update({k: _value(run.data.tags[k]) if k == "workers" else run.data.tags[k]
                    for k in PROVENANCE_COLUMNS if k in run.data.tags})
        for key in INT_COLUMNS:
            if isinstance(row.get(key), float):
                row[key] = int(row[key])
        trials.append(row)
        by_step = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
                   for name in CURVE_METRICS}
        identity = {"sweep": row.get("sweep", experiment), "trial_id": row["trial_id"], "model": row["model"],
                    "dataset": row["dataset"], "seed": row["seed"], "config_hash": row["config_hash"]}
        curves += [identity | {"step": s} | {name: values[s] for name, values in by_step.items() if s in values}
                   for s in sorted(by_step["test_bpd"])]
    order = ["model", "dataset", "seed"]
    trials_frame = pd.DataFrame(trials).sort_values(order, kind="stable").reset_index(drop=True)
    return trials_frame, pd.DataFrame(curves)
