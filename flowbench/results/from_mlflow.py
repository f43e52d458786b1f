"""Rebuild the trials and curves tables from an MLflow experiment's child runs alone.

A trial run holds its record as ``flowbench.record`` declares it (params, ``final_<name>``
metrics, tags); ``row_from_mlflow`` turns them back into the trials.parquet row, so a table
rebuilt here has exactly the Parquet table's columns. The evaluations are metric histories.
"""

from __future__ import annotations

import os

import pandas as pd

from flowbench.errors import FlowbenchError
from flowbench.record import RECORD_COLUMNS, row_from_mlflow
from flowbench.results.tables import CURVE_KEYS, CURVE_METRICS

PARENT_TAG = "mlflow.parentRunId"  # trial runs are the sweep run's children


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
        row = row_from_mlflow(run.data.params, run.data.metrics, run.data.tags)
        trials.append(row)
        by_step = {
            name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in CURVE_METRICS
        }
        identity = {key: row[key] for key in CURVE_KEYS}
        curves += [
            identity | {"step": step} | {name: values[step] for name, values in by_step.items() if step in values}
            for step in sorted(by_step[CURVE_METRICS[0]])
        ]
    trials_frame = pd.DataFrame(trials, columns=RECORD_COLUMNS)
    trials_frame = trials_frame.sort_values(["model", "variant", "dataset", "seed"], kind="stable")
    return trials_frame.reset_index(drop=True), pd.DataFrame(curves, columns=[*CURVE_KEYS, "step", *CURVE_METRICS])
