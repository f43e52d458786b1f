"""MLflow tracking: one parent run per sweep, one child run per trial. Runs in the driver.

What a child run holds follows ``flowbench.record`` (the one declaration of a trial's columns):
each ``param`` column is a run param (its ``str``), each ``metric`` column a metric
``final_<name>``, each ``tag`` column a tag; the evaluations (``CURVE_METRICS``) are metric
histories by step. ``flowbench.results.from_mlflow`` reads them back with ``row_from_mlflow``.

Runs are found by a deterministic key tag before one is created, so a retried or resumed
trial logs into the run it already has instead of duplicating it. Logging happens in the
driver (a Tune callback), so trials never write to the store concurrently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from ray import tune

from flowbench.errors import FlowbenchError
from flowbench.record import FINAL_PREFIX, METRIC, PARAM, TAG, columns
from flowbench.results.from_mlflow import PARENT_TAG
from flowbench.results.tables import CURVE_METRICS
from flowbench.sweep.storage import copy_from_checkpoint

log = logging.getLogger(__name__)

KEY_TAG = "flowbench.key"  # a run's deterministic name: the sweep, or a trial's id
UNIT_TAG = "flowbench.unit"  # the hash of the planned unit (trial or search group) a trial run belongs to
# MLflow's UI opens an experiment in its training-runs view (not the GenAI one) with this tag
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri(results_dir: Path) -> str:
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


# SQLite's words for a store it cannot write (MLflow passes them on inside an MlflowException)
_STORE_FAILURES = {
    "database or disk is full": "no space left on device",
    "attempt to write a readonly database": "read-only or not writable for you",
    "unable to open database file": "cannot be opened or created",
}


def store_write_error(err: BaseException, uri: str) -> FlowbenchError | None:
    """The one line for a tracking store that cannot be written (an sqlite file on a full or
    read-only disk), found anywhere in ``err``'s chain (Tune re-raises a callback's error); None
    for any other error."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        for words, what in _STORE_FAILURES.items():
            if words in str(cause):
                return FlowbenchError(
                    f"MLflow tracking store {uri}: {what} ({words}): free space there or pass another "
                    "--mlflow-uri, then run the same command again (finished trials are kept)"
                )
        cause = cause.__cause__ or cause.__context__
    return None


class MlflowTracker:
    """A thin layer over ``MlflowClient``: get-or-create experiment, parent and child runs."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._get_or_create_experiment(artifact_location)

    def _get_or_create_experiment(self, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location, tags=EXPERIMENT_KIND
                )
            except MlflowException:  # another driver created it between our look-up and create
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        for key, value in EXPERIMENT_KIND.items():
            if found.tags.get(key) != value:  # made by an older flowbench
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def find_runs(self, query: str) -> list:
        return self.client.search_runs([self.experiment_id], query, max_results=50000)

    def find_run(self, key: str, parent_id: str | None = None):
        query = f"tags.`{KEY_TAG}` = '{key}'"
        if parent_id:
            query += f" and tags.`{PARENT_TAG}` = '{parent_id}'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=1)
        return runs[0] if runs else None

    def get_or_create_run(
        self, key: str, parent_id: str | None = None, params: dict | None = None, tags: dict | None = None
    ) -> str:
        run = self.find_run(key, parent_id)
        if run is None:
            tags = {KEY_TAG: key} | ({PARENT_TAG: parent_id} if parent_id else {}) | (tags or {})
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=key)
            for name, value in (params or {}).items():
                self.client.log_param(run.info.run_id, name, value)
        elif run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def last_step(self, run_id: str, metric: str = CURVE_METRICS[0]) -> int:
        history = self.client.get_metric_history(run_id, metric)
        return max((m.step for m in history), default=-1)

    def log_record(self, run_id: str, row: dict) -> None:
        """A trial's record as ``flowbench.record`` declares it: params, final_ metrics, tags."""
        from mlflow.entities import Metric, Param, RunTag

        params = [Param(name, _text(row[name])) for name in columns(PARAM)]
        have = self.client.get_run(run_id).data.params
        params = [p for p in params if have.get(p.key) != p.value]  # logged by an earlier attempt
        # NaN and inf too (MLflow keeps them): the read-back then equals the row, not the default
        metrics = [Metric(FINAL_PREFIX + name, float(row[name]), 0, 0) for name in columns(METRIC)]
        tags = [RunTag(name, _text(row[name])) for name in columns(TAG)]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)


def _text(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


class MlflowCallback(tune.Callback):
    """Logs each Tune trial into a child run of the sweep's parent run, from the driver.

    ``record_of(tune_config, last_result, error)`` is the driver's one builder of a trial's row,
    so MLflow holds exactly what trials.parquet holds."""

    def __init__(self, uri: str, experiment: str, parent_id: str, artifact_location: str | None, record_of):
        self.uri, self.experiment, self.parent_id = uri, experiment, parent_id
        self.artifact_location, self.record_of = artifact_location, record_of
        self._tracker: MlflowTracker | None = None
        self._runs: dict[str, tuple[str, int]] = {}

    def __getstate__(self):  # Tune pickles callbacks with the experiment: no client inside
        return {k: v for k, v in self.__dict__.items() if k not in ("_tracker", "_runs")}

    def __setstate__(self, state):
        self.__dict__.update(state, _tracker=None, _runs={})

    @property
    def tracker(self) -> MlflowTracker:
        if self._tracker is None:
            self._tracker = MlflowTracker(self.uri, self.experiment, self.artifact_location)
        return self._tracker

    def _run_for(self, trial) -> tuple[str, int]:
        if trial.trial_id not in self._runs:
            config = trial.config
            run_id = self.tracker.get_or_create_run(
                config["trial"]["trial_id"],
                self.parent_id,
                tags={UNIT_TAG: config["unit_hash"], "phase": config["phase"]},
            )
            self._runs[trial.trial_id] = (run_id, self.tracker.last_step(run_id))
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "status" in result:  # the final record, not a curve point
            return
        run_id, last = self._run_for(trial)
        if result["step"] <= last:  # a resumed trial re-reporting what is logged already
            return
        from mlflow.entities import Metric

        at = int(result.get("timestamp", 0)) * 1000
        metrics = [
            Metric(name, float(result[name]), at, int(result["step"]))
            for name in CURVE_METRICS
            if _finite(result.get(name))
        ]
        self.tracker.client.log_batch(run_id, metrics=metrics)
        self._runs[trial.trial_id] = (run_id, int(result["step"]))

    def _finish(self, trial, error: Exception | None) -> None:
        run_id, _ = self._run_for(trial)
        row = self.record_of(trial.config, trial.last_result or {}, error)
        self.tracker.log_record(run_id, row)
        if trial.checkpoint is not None:  # fetched from the sweep's storage, local or S3
            with tempfile.TemporaryDirectory(prefix="flowbench-samples-") as scratch:
                samples = Path(scratch) / "samples.png"
                if copy_from_checkpoint(trial.checkpoint, "samples.png", samples):
                    self.tracker.client.log_artifact(run_id, str(samples))
        self.tracker.client.set_terminated(run_id, "FAILED" if error else "FINISHED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        # what Tune's ResultGrid gives as Result.error: the driver's tables see the same error
        self._finish(trial, trial.get_pickled_error() or trial.get_error() or RuntimeError("failed"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
