"""MLflow tracking: one parent run per sweep, one child run per trial.

Runs are found by a deterministic key tag before one is created, so a retried or resumed
trial logs into the run it already has instead of duplicating it. Logging happens in the
driver (a Tune callback), so trials never write to the store concurrently.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ray import tune

from flowbench.results.from_mlflow import FINAL_PREFIX, PARENT_TAG
from flowbench.results.tables import CURVE_METRICS, PROVENANCE_COLUMNS
from flowbench.sweep.spec import trial_config
from flowbench.trial import TrialConfig

log = logging.getLogger(__name__)

KEY_TAG = "flowbench.key"
FINAL_METRICS = (
    "test_bpd", "train_bpd", "num_params", "steps", "images_seen", "epochs", "train_seconds",
    "throughput_images_per_s", "peak_memory_mb", "density_latency_ms", "sample_latency_ms",
)


def default_tracking_uri(results_dir: Path) -> str:
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


class MlflowTracker:
    """A thin layer over ``MlflowClient``: get-or-create experiment, parent and child runs."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=artifact_location)
        )

    def find_run(self, key: str, parent_id: str | None = None):
        query = f"tags.`{KEY_TAG}` = '{key}'"
        if parent_id:
            query += f" and tags.`{PARENT_TAG}` = '{parent_id}'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=1)
        return runs[0] if runs else None

    def get_or_create_run(self, key: str, parent_id: str | None = None, params: dict | None = None) -> str:
        run = self.find_run(key, parent_id)
        if run is None:
            tags = {KEY_TAG: key} | ({PARENT_TAG: parent_id} if parent_id else {})
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=key)
            for name, value in (params or {}).items():
                self.client.log_param(run.info.run_id, name, value)
        elif run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def last_step(self, run_id: str, metric: str = "test_bpd") -> int:
        history = self.client.get_metric_history(run_id, metric)
        return max((m.step for m in history), default=-1)


def flat_params(config: dict) -> dict:
    """Trial config as MLflow params: hparams flattened, nothing nested."""
    params = {k: v for k, v in config.items() if k not in ("hparams", "out_dir", "data_root")}
    params.update({f"hparams.{k}": v for k, v in config.get("hparams", {}).items()})
    return {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in params.items()}


class MlflowCallback(tune.Callback):
    """Logs each Tune trial into a child run of the sweep's parent run, from the driver."""

    def __init__(self, uri: str, experiment: str, parent_id: str, artifact_location: str | None = None):
        self.uri, self.experiment, self.parent_id = uri, experiment, parent_id
        self.artifact_location = artifact_location
        self._tracker = None
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
            config = trial_config(trial.config)
            run_id = self.tracker.get_or_create_run(config["trial_id"], self.parent_id, flat_params(config))
            self.tracker.client.set_tag(run_id, "phase", "search" if trial.config.get("search") else "final")
            self.tracker.client.set_tag(run_id, "config_hash", TrialConfig.model_validate(config).config_hash())
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
        metrics = {k: result[k] for k in CURVE_METRICS if _finite(result.get(k))}
        for name, value in metrics.items():
            self.tracker.client.log_metric(run_id, name, value, step=int(result["step"]))
        self._runs[trial.trial_id] = (run_id, int(result["step"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id, _ = self._run_for(trial)
        result = trial.last_result or {}
        client = self.tracker.client
        for name in FINAL_METRICS:
            if _finite(result.get(name)):
                client.log_metric(run_id, f"{FINAL_PREFIX}{name}", float(result[name]))
        client.set_tag(run_id, "status", result.get("status", "stopped"))
        for name in PROVENANCE_COLUMNS:
            if name in result:
                client.set_tag(run_id, name, str(result[name]))
        if result.get("reason"):
            client.set_tag(run_id, "reason", str(result["reason"])[:5000])
        if trial.checkpoint is not None:
            samples = Path(trial.checkpoint.path) / "samples.png"
            if samples.is_file():
                client.log_artifact(run_id, str(samples))
        client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id, _ = self._run_for(trial)
        self.tracker.client.set_tag(run_id, "status", "failed")
        self.tracker.client.set_terminated(run_id, "FAILED")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
