"""The sweep driver: it runs in the process that called ``flowbench sweep``, never on a worker.

It plans the trials (spec, cards, data shapes), runs them as Ray Tune experiments, collects each
trial's record and curve, writes the tables and the report and logs them to MLflow. What runs
inside a trial lives in ``flowbench.sweep.worker``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from flowbench.errors import FlowbenchError
from flowbench.record import RECORD_COLUMNS, TrialRecord
from flowbench.results.tables import CURVE_METRICS
from flowbench.sweep.spec import TIME_ATTR, SweepSpec, check_data, expand, load_sweep_spec, trial_config
from flowbench.sweep.tracking import MlflowCallback, MlflowTracker, default_tracking_uri
from flowbench.sweep.worker import tune_trial
from flowbench.trial import TrialConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepOutcome:
    spec: SweepSpec
    results_dir: Path
    trials: pd.DataFrame
    curves: pd.DataFrame
    mlflow_uri: str
    parent_run_id: str


def plan(spec_path: str | Path) -> tuple[SweepSpec, list[TrialConfig]]:
    """Validate everything a sweep needs (spec, models, data) and expand its trials."""
    spec = load_sweep_spec(spec_path)
    shapes = check_data(spec, spec_path)
    return spec, expand(spec, shapes)


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local Ray needs no token
    # checkpoint-driven state snapshots are deliberate (see fit_group): no warning about them
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # an embedded local Ray that listens on loopback only
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    except ConnectionError as err:
        raise FlowbenchError(f"cannot reach the Ray cluster at {address!r} ({err}); start it with "
                             "`ray up cluster.yaml` (or `ray start --head`) first") from None


def _check_resources(spec: SweepSpec, address: str | None) -> None:
    import ray

    if address:  # an autoscaling cluster may add the nodes later
        return
    have = ray.cluster_resources()
    workers = spec.resources.workers
    for kind, need in (("CPU", spec.resources.cpu * workers), ("GPU", spec.resources.gpu * workers)):
        if need > have.get(kind, 0):
            raise FlowbenchError(f"resources: each trial asks {need:g} {kind} in all, this machine's Ray has "
                                 f"{have.get(kind, 0):g}: lower resources.{kind.lower()} or join a cluster "
                                 "with --address")


def _trial_name(trial) -> str:
    return trial_config(trial.config)["trial_id"]


def fit_group(spec: SweepSpec, storage: str, name: str, param_space: dict, tune_config, callbacks):
    """One Tuner: restored when its experiment exists (finished trials are not run again)."""
    from ray import tune

    # a data-parallel trial only drives its Ray Train workers, which ask for the resources
    # (Tune needs a non-empty request: a token of memory instead of a CPU the workers need)
    own = {"cpu": 0, "memory": 2**20} if spec.resources.workers > 1 else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    trainable = tune.with_resources(tune_trial, own)
    extra = {"resources": spec.resources.model_dump(), "max_failures": spec.max_failures,
             "train_storage": f"{storage.rstrip('/')}/{name}-train"}
    param_space = param_space | extra
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        log.info("resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # keeping one checkpoint makes Tune save its experiment state after every trial
                # checkpoint, so a killed driver resumes each trial from its latest one
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    return tuner.fit()


def _grid_config():
    from ray import tune

    # reuse_actors would save ~2 s a trial, but Ray then never syncs a reused trial's files
    # (attempts.jsonl, final/) from its working directory to storage
    return tune.TuneConfig(trial_name_creator=_trial_name, trial_dirname_creator=_trial_name, reuse_actors=False)


def _search_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    space = {}
    for key, dist in spec.search.space.items():
        (kind, args), = dist.items()
        space[key] = tune.choice(args) if kind == "choice" else make[kind](*args)
    return space


def _spec_fingerprint(spec: SweepSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def _claim_results_dir(out: Path, spec: SweepSpec, mlflow_uri: str) -> None:
    """A results folder belongs to one spec and one tracking store; a re-run must match both."""
    meta_path = out / "sweep.json"
    meta = {"spec": _spec_fingerprint(spec), "mlflow_uri": mlflow_uri}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old["spec"] != meta["spec"]:
            raise FlowbenchError(f"{out} holds sweep {spec.name!r} run from a different spec: rename the sweep "
                                 "(name:) or delete that folder to start over")
        if old["mlflow_uri"] != mlflow_uri:
            raise FlowbenchError(f"{out} was tracked in {old['mlflow_uri']}: resume with --mlflow-uri "
                                 f"{old['mlflow_uri']} (it logs where it started)")
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta))


def run_sweep(
    spec_path: str | Path,
    results_root: str | Path = "results",
    address: str | None = None,
    mlflow_uri: str | None = None,
    callbacks: tuple = (),
    num_cpus: int | None = None,
    storage: str | None = None,
) -> SweepOutcome:
    """Run (or resume) every trial of the spec; write the tables and the report, log them to MLflow.

    ``storage`` is Tune's storage (default ``results/NAME/tune``): on a multi-node cluster give one
    that every node reaches (``s3://bucket/prefix``, an NFS path).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from flowbench.results.report import build_report
    from flowbench.results.tables import curves_frame, write_table

    spec, configs = plan(spec_path)
    start_ray(address, num_cpus)
    _check_resources(spec, address)
    out = Path(results_root).resolve() / spec.name
    uri = mlflow_uri or default_tracking_uri(out)
    _claim_results_dir(out, spec, uri)
    artifacts = (out / "mlartifacts").as_uri() if mlflow_uri is None else None
    tracker = MlflowTracker(uri, spec.name, artifacts)
    parent = tracker.get_or_create_run(f"sweep:{spec.name}", params={
        "models": ",".join(spec.models), "datasets": ",".join(spec.datasets), "seeds": ",".join(map(str, spec.seeds)),
        "budget": f"{spec.budget.amount:g} {spec.budget.kind}", "spec": Path(spec_path).name,
    })
    callbacks = [MlflowCallback(uri, spec.name, parent, artifacts), *callbacks]
    # Tune's trial state and checkpoints; a multi-node cluster needs storage every node reaches
    storage = storage or str(out / "tune")
    metric = dict(metric="test_bpd", mode="min")
    groups: list[tuple[str, object]] = []
    if spec.search is None:
        space = {"trial": tune.grid_search([c.model_dump() for c in configs])}
        groups.append(("final", fit_group(spec, storage, "grid", space, _grid_config(), callbacks)))
    else:
        for key in dict.fromkeys((c.model, c.dataset) for c in configs):
            group = [c for c in configs if (c.model, c.dataset) == key]
            asha = spec.search.asha
            # max_t past the budget: ASHA stops a trial that reaches max_t, before it reports its record
            scheduler = ASHAScheduler(time_attr=TIME_ATTR[spec.budget.kind], max_t=2 * spec.budget.amount,
                                      grace_period=asha.grace_period, reduction_factor=asha.reduction_factor) if asha else None
            tc = tune.TuneConfig(search_alg=OptunaSearch(seed=group[0].seed), scheduler=scheduler, **metric,
                                 num_samples=spec.search.num_samples, trial_name_creator=_trial_name,
                                 trial_dirname_creator=_trial_name, reuse_actors=False)
            name = f"{key[0]}-{key[1]}"
            grid = fit_group(spec, storage, f"search-{name}", {"trial": group[0].model_dump(), "search": _search_space(spec)},
                             tc, callbacks)
            groups.append(("search", grid))
            best = grid.get_best_result(filter_nan_and_inf=True, **metric)
            # the best sample's values, run on every seed under the plain trial ids
            chosen = [trial_config({"trial": c.model_dump(), "search": best.config["search"]}) | {"trial_id": c.trial_id}
                      for c in group]
            groups.append(("final", fit_group(spec, storage, f"final-{name}", {"trial": tune.grid_search(chosen)},
                                              _grid_config(), callbacks)))

    rows, curves = [], []
    for phase, grid in groups:
        for result in grid:
            row, curve = _record_of(result, spec.name)
            rows.append(row | {"phase": phase})
            curves.append(curve)
            if phase == "final" and result.checkpoint is not None:  # the report's sample figures
                for figure in ("samples", "reconstructions"):
                    src = Path(result.checkpoint.path) / f"{figure}.png"
                    if src.is_file():
                        (out / "figures").mkdir(exist_ok=True)
                        shutil.copy2(src, out / "figures" / f"{figure}-{row['trial_id']}.png")
    trials = pd.DataFrame(rows)
    write_table(trials, out / "trials.parquet", "trials")
    curve_table = curves_frame(rows, curves)
    write_table(curve_table, out / "curves.parquet", "curves")
    report = build_report(out, trials, curve_table)
    for path in [out / "trials.parquet", out / "curves.parquet", report["table2"], report["md"], report["html"]]:
        tracker.client.log_artifact(parent, str(path))
    for path in report["plots"]:
        tracker.client.log_artifact(parent, str(path), artifact_path="plots")
    tracker.client.set_terminated(parent, "FINISHED")
    return SweepOutcome(spec, out, trials, curve_table, uri, parent)


def _record_of(result, sweep: str) -> tuple[dict, list[dict]]:
    """The TrialRecord row of a Tune result; a trial stopped by ASHA or failed gets one too."""
    metrics = result.metrics or {}
    config = trial_config(result.config)
    history = result.metrics_dataframe
    curve = []
    if history is not None and "final" in history.columns:
        evals = history[history["final"].notna()].drop_duplicates("step", keep="last").sort_values("step")
        keep = ["step", *CURVE_METRICS]
        curve = evals[[k for k in keep if k in evals.columns]].to_dict("records")
    if "status" in metrics and "config_hash" in metrics:
        # Tune stamps its own trial_id (and hostname) on every result: ours comes from the config
        return {k: metrics.get(k) for k in RECORD_COLUMNS} | {"trial_id": config["trial_id"]}, curve
    status, reason = ("failed", str(result.error).splitlines()[0][:500]) if result.error else ("stopped", "stopped early by ASHA")
    tc = TrialConfig.model_validate(config)
    record = TrialRecord(
        sweep=sweep, trial_id=tc.trial_id, model=tc.model, dataset=tc.dataset, seed=tc.seed,
        config_hash=tc.config_hash(), hparams=json.dumps(tc.hparams, sort_keys=True), budget_kind=tc.budget_kind,
        budget=tc.budget, batch_size=tc.batch_size, lr=tc.lr, status=status, reason=reason,
    )
    if curve:
        last = curve[-1]
        record.steps, record.images_seen, record.epochs = int(last["step"]), int(last["images_seen"]), last["epochs"]
        record.train_seconds, record.test_bpd, record.train_bpd = last["train_seconds"], last["test_bpd"], last["train_bpd"]
    return record.row(), curve
