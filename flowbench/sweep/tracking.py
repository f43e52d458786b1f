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
import shutil
import tempfile
import time
from pathlib import Path

from ray import tune

from flowbench.record import FINAL_PREFIX, METRIC, PARAM, TAG, columns
from flowbench.results.from_mlflow import PARENT_TAG
from flowbench.results.tables import CURVE_METRICS
from flowbench.sweep.storage import copy_from_checkpoint

log = logging.getLogger(__name__)

KEY_TAG = "flowbench.key"  # a run's deterministic name: the sweep, or a trial's id
UNIT_TAG = "flowbench.unit"  # the hash of the planned unit (trial or search group) a trial run belongs to
# MLflow's UI opens an experiment in its training-runs view (not the GenAI one) with this tag
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on a log_batch call
SAMPLES = "samples.png"  # a trial run's artifact: the samples figure of its checkpoint


def default_tracking_uri(results_dir: Path) -> str:
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


# MLflow's HTTP client retries a refused or unanswered request 7 times with exponential backoff
# and waits 120 s for each answer: minutes in which the trials' results would wait on a view of
# them. A sweep asks little of it (a variable set in the environment wins)
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# SQLite's words for a store it cannot write (MLflow passes them on inside an MlflowException)
_STORE_FAILURES = {
    "database or disk is full": "no space left on device",
    "attempt to write a readonly database": "read-only or not writable for you",
    "unable to open database file": "cannot be opened or created",
}
# words of a server that is not answering: requests' (MLflow's HTTP client) and the AWS SDK's (pyarrow's S3)
_UNREACHABLE = (
    "Connection refused",
    "Read timed out",
    "timed out",
    "Timeout was reached",
    "Couldn't connect to server",
    "Could not connect to server",
    "Connection reset",
    "Name or service not known",
)
_outages: dict[str, str] = {}  # tracking URI -> what it failed to log, in this process's sweep
_drivers: dict[str, MlflowCallback] = {}  # MLflow experiment -> the callback this process's sweep made for it


def failure_reason(err: BaseException) -> str:
    """What is wrong with a store, briefly, from anywhere in ``err``'s chain (Tune and MLflow
    wrap): SQLite's words for a full or read-only disk, a refused or timed-out connection, else
    the error's last line."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        for words, what in _STORE_FAILURES.items():
            if words in text:
                return f"{what} ({words})"
        for words in _UNREACHABLE:
            if words in text:
                return f"unreachable ({words.lower()})"
        cause = cause.__cause__ or cause.__context__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def clear_outage(uri: str) -> None:
    """Try ``uri`` again (a new sweep run): the records say what it lacks."""
    _outages.pop(uri, None)


class MlflowTracker:
    """A thin layer over ``MlflowClient``: get-or-create experiment, parent and child runs.

    MLflow is a view of the sweep's records (``trials.parquet``, ``records/``), so it is kept off
    the sweep's critical path: ``attempt`` runs a call against the store, and the first one that
    fails costs one warning naming the store and what was not logged; every later attempt in this
    process's sweep returns None at once, and the next run logs what is missing (``log_missing``)."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None

    def attempt(self, what: str, call, *args, **kwargs):
        """``call(*args, **kwargs)``, or None once the store has failed in this sweep."""
        if self.uri in _outages:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as err:  # MLflow's, requests', SQLAlchemy's: the store is given up for this run
            _outages[self.uri] = what
            log.warning(
                "MLflow tracking store %s: %s while logging %s; nothing more is logged there in this run, which "
                "goes on (trials.parquet and records/ hold every record): run the same flowbench sweep again "
                "to log what is missing",
                self.uri,
                failure_reason(err),
                what,
            )
            return None

    @property
    def down(self) -> bool:
        """Whether the store failed in this sweep."""
        return self.uri in _outages

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location, tags=EXPERIMENT_KIND
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

    def trial_run(self, parent_id: str, row: dict, unit_hash: str) -> tuple[str, int]:
        """A trial's child run and the last step of its curve logged so far. A run that ended with a
        failed attempt's record (the trial runs again: a failed unit is not finished) is soft-deleted
        first, as a changed trial's is, and the attempt gets a new one: MLflow refuses to change a
        logged param, and a failed record's differ (its hyperparameters as planned, not as resolved)."""
        failed = self.find_run(row["trial_id"], parent_id)
        if failed is not None and failed.info.status == "FAILED":
            self.client.delete_run(failed.info.run_id)
        run_id = self.get_or_create_run(row["trial_id"], parent_id, tags={UNIT_TAG: unit_hash, "phase": row["phase"]})
        return run_id, self.last_step(run_id)

    def last_step(self, run_id: str, metric: str = CURVE_METRICS[0]) -> int:
        history = self.client.get_metric_history(run_id, metric)
        return max((m.step for m in history), default=-1)

    def log_points(self, run_id: str, points: list[dict]) -> None:
        """Evaluations (curve points) as metric histories by step; non-finite values are left out."""
        from mlflow.entities import Metric

        now = time.time()  # a recorded curve point has no time of its own
        metrics = [
            Metric(name, float(point[name]), int(point.get("timestamp", now)) * 1000, int(point["step"]))
            for point in points
            for name in CURVE_METRICS
            if _finite(point.get(name))
        ]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

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

    def finish_run(self, run_id: str, row: dict, samples: Path | None) -> None:
        """The record, the samples figure (as ``samples.png``) and the run's end: FAILED for a failed trial."""
        self.log_record(run_id, row)
        if samples is not None:
            with tempfile.TemporaryDirectory(prefix="flowbench-samples-") as scratch:
                named = Path(scratch) / SAMPLES
                shutil.copyfile(samples, named)
                self.client.log_artifact(run_id, str(named))
        self.client.set_terminated(run_id, _end_status(row))


def log_missing(tracker: MlflowTracker, parent_id: str, trials: list[tuple[str, dict]], figures: Path) -> int:
    """Log the recorded ``trials`` ((unit hash, {"row", "curve"}) each) whose runs the store
    missed (it was down, or the driver died before their end) or that end otherwise (an earlier
    attempt failed): the curve points after the last one logged, the record, the samples; returns
    how many. One query when nothing is missing."""
    runs = tracker.find_runs(f"tags.`{PARENT_TAG}` = '{parent_id}'")
    ended = {run.data.tags.get(KEY_TAG): run.info.status for run in runs}
    missing = [(unit_hash, t) for unit_hash, t in trials if ended.get(t["row"]["trial_id"]) != _end_status(t["row"])]
    for unit_hash, trial in missing:
        row = trial["row"]
        run_id, last = tracker.trial_run(parent_id, row, unit_hash)
        tracker.log_points(run_id, [p for p in trial["curve"] if p["step"] > last])
        samples = figures / f"samples-{row['trial_id']}.png"
        tracker.finish_run(run_id, row, samples if samples.is_file() else None)
    return len(missing)


def _end_status(row: dict) -> str:
    """How a trial's run ends with its record."""
    return "FAILED" if row["status"] == "failed" else "FINISHED"


def _text(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


class MlflowCallback(tune.Callback):
    """Logs each Tune trial into a child run of the sweep's parent run, from the driver; nothing
    when the store failed (``MlflowTracker.attempt``) or there is no parent run.

    ``record_of(tune_config, last_result, error, checkpoint)`` and ``curve_of(checkpoint)`` are the
    driver's builders of a trial's row and curve, so MLflow holds exactly what trials.parquet and
    curves.parquet hold. The curve points come with each checkpoint a trial reports (Tune's results
    carry only what its scheduler and searcher use).

    Tune pickles its callbacks into an experiment's saved state when the experiment starts, and a
    restored experiment runs the callbacks of that state: a restored one logs as the callback made by
    this process's sweep for the same MLflow experiment, into its store and under its parent run. The
    driver that saved the state may have logged elsewhere: a new head whose disk lost the results
    folder resumes the experiment from --storage with a new store, whose parent run has a new id."""

    def __init__(
        self, uri: str, experiment: str, parent_id: str | None, artifact_location: str | None, record_of, curve_of
    ):
        self.uri, self.experiment, self.parent_id = uri, experiment, parent_id
        self.artifact_location, self.record_of, self.curve_of = artifact_location, record_of, curve_of
        self._tracker: MlflowTracker | None = None
        self._runs: dict[str, tuple[str, int]] = {}
        _drivers[experiment] = self

    def __getstate__(self):
        return {"experiment": self.experiment}

    def __setstate__(self, state):
        driver = _drivers.get(state["experiment"])
        if driver is None:  # a saved experiment read, not run, by this process: nothing to log
            settings = dict.fromkeys(("uri", "parent_id", "artifact_location", "record_of", "curve_of"))
        else:
            settings = {k: v for k, v in driver.__dict__.items() if k not in ("_tracker", "_runs")}
        self.__dict__.update(settings, experiment=state["experiment"], _tracker=None, _runs={})

    @property
    def tracker(self) -> MlflowTracker:
        if self._tracker is None:
            self._tracker = MlflowTracker(self.uri, self.experiment, self.artifact_location)
        return self._tracker

    def _run_for(self, trial) -> tuple[str, int] | None:
        if trial.trial_id not in self._runs and self.parent_id is not None:
            config = trial.config
            key = config["trial_id"]
            found = self.tracker.attempt(
                f"{key}'s run",
                self.tracker.trial_run,
                self.parent_id,
                {"trial_id": key, "phase": config["phase"]},
                config["unit_hash"],
            )
            if found is not None:
                self._runs[trial.trial_id] = found
        return self._runs.get(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        found = self._run_for(trial)
        if found is None:
            return
        try:  # Tune's storage, not MLflow's store: the driver says so if it has gone
            # after the last step logged: a resumed trial's checkpoints repeat what is logged already
            points = [p for p in self.curve_of(checkpoint) if p["step"] > found[1]]
        except OSError:
            return
        if points:
            what = f"{trial.config['trial_id']}'s evaluation at step {points[-1]['step']}"
            self.tracker.attempt(what, self.tracker.log_points, found[0], points)
            self._runs[trial.trial_id] = (found[0], points[-1]["step"])

    def _finish(self, trial, error: Exception | None) -> None:
        found = self._run_for(trial)
        if found is None:
            return
        if trial.checkpoint is not None:  # a data-parallel trial's curve comes with its last checkpoint only
            self.on_checkpoint(None, None, trial, trial.checkpoint)
        try:
            row = self.record_of(trial.config, trial.last_result or {}, error, trial.checkpoint)
        except OSError:  # as in _log_end: the next run logs it from the records
            return
        if row is not None:
            self.tracker.attempt(f"{row['trial_id']}'s record", self._log_end, found[0], row, trial.checkpoint)

    def _log_end(self, run_id: str, row: dict, checkpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="flowbench-samples-") as scratch:
            samples = Path(scratch) / SAMPLES
            try:  # fetched from the sweep's storage, local or S3; a diverged trial has none
                found = checkpoint is not None and copy_from_checkpoint(checkpoint, SAMPLES, samples)
            except OSError:  # Tune's storage, not MLflow's store: the driver says so if it has gone
                found = False
            self.tracker.finish_run(run_id, row, samples if found else None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        # what Tune's ResultGrid gives as Result.error: the driver's tables see the same error, read
        # from Tune's storage (the driver stops with one line when that storage has gone)
        try:
            error = trial.get_pickled_error() or trial.get_error() or RuntimeError("failed")
        except OSError as err:
            error = RuntimeError(f"failed; its error is in Tune's storage, unreadable now ({failure_reason(err)})")
        self._finish(trial, error)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
