"""The sweep driver: it runs in the process that called ``flowbench sweep``, never on a worker.

It plans the trials (spec, cards, data shapes), runs them as ONE Ray Tune experiment, collects
each trial's record and curve, writes the tables and the report and logs them to MLflow. What
runs inside a trial lives in ``flowbench.sweep.worker``.

Planning works in *units*: a grid trial, or a search group (Optuna samples of one model, data
set and variant, then the best sample on every seed). A unit's identity is the hash of its fully
expanded configuration (``TrialConfig.config_hash``). A finished unit's rows live in
``results/NAME/records/``; a re-run runs exactly the units without a record of their current
hash and archives the records (and the Tune experiment) of units whose configuration changed.

One Tune experiment holds every unit still to run, so no slot idles while another group
searches: ``SweepSearch`` hands Tune the trials longest first (grid trials, search samples, and
each group's final trials as soon as its search has ended) and ``SweepScheduler`` runs ASHA
within each search group only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from flowbench.atomic import atomic_write
from flowbench.data import DatasetInfo
from flowbench.errors import FlowbenchError
from flowbench.locks import exclusive_lock
from flowbench.record import RECORD_COLUMNS
from flowbench.results.tables import CURVE_METRICS
from flowbench.sweep.spec import TIME_ATTR, Search, SweepSpec, check_data, expand, load_sweep_spec, trial_config
from flowbench.sweep.storage import copy_from_checkpoint, tune_storage
from flowbench.sweep.tracking import (
    UNIT_TAG,
    MlflowCallback,
    MlflowTracker,
    default_tracking_uri,
    store_write_error,
)
from flowbench.sweep.worker import tune_trial
from flowbench.trial import TrialConfig

log = logging.getLogger(__name__)
METRIC, MODE = "val_bpd", "min"  # selection (search, ASHA, the best sample) is on validation bits/dim
FIGURES = ("samples", "reconstructions")


@dataclasses.dataclass
class SweepOutcome:
    spec: SweepSpec
    results_dir: Path
    trials: pd.DataFrame
    curves: pd.DataFrame
    mlflow_uri: str
    parent_run_id: str
    efficiency: dict  # efficiency, busy_seconds, slots, wall_seconds, trials_run (efficiency None: nothing ran)
    changed: list[str]  # units re-run because their configuration changed
    archive: Path | None  # where their old records went


def plan(spec_path: str | Path) -> tuple[SweepSpec, list[TrialConfig]]:
    """Validate everything a sweep needs (spec, models, data) and expand its trials."""
    spec, configs, _ = _plan(spec_path)
    return spec, configs


def _plan(spec_path: str | Path) -> tuple[SweepSpec, list[TrialConfig], dict[str, DatasetInfo]]:
    spec = load_sweep_spec(spec_path)
    infos = check_data(spec, spec_path)
    return spec, expand(spec, infos), infos


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local Ray needs no token
    # checkpoint-driven state snapshots are deliberate (see run_experiment): no warning about them
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    # flows registered outside the package ($FLOWBENCH_PLUGINS) must exist in every worker too
    from flowbench.flows.registry import plugin_env_vars

    runtime_env = {"env_vars": plugin_env_vars()}
    try:
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        else:  # an embedded local Ray that listens on loopback only
            # address="local": a new Ray of our own, never a cluster that `ray start` left recorded in /tmp/ray
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                runtime_env=runtime_env,
            )
    except ConnectionError as err:
        raise FlowbenchError(
            f"cannot reach the Ray cluster at {address!r} ({err}); start it with "
            "`ray up cluster.yaml` (or `ray start --head`) first"
        ) from None


def _trial_demand(spec: SweepSpec) -> dict[str, float]:
    workers = spec.resources.workers
    return {"CPU": spec.resources.cpu * workers, "GPU": spec.resources.gpu * workers}


def _check_resources(spec: SweepSpec, address: str | None) -> None:
    import ray

    if address:  # an autoscaling cluster may add the nodes later
        return
    have = ray.cluster_resources()
    for kind, need in _trial_demand(spec).items():
        if need > have.get(kind, 0):
            raise FlowbenchError(
                f"resources: each trial asks {need:g} {kind} in all, this machine's Ray has "
                f"{have.get(kind, 0):g}: lower resources.{kind.lower()} or join a cluster "
                "with --address"
            )


def cluster_slots(spec: SweepSpec) -> int:
    """How many trials the cluster runs at once (at least 1: an autoscaler may add nodes)."""
    import ray

    have = ray.cluster_resources()
    fits = [int(have.get(kind, 0) // need) for kind, need in _trial_demand(spec).items() if need > 0]
    return max(1, min(fits))


@contextlib.contextmanager
def ray_log_to(path: Path):
    """Ray's, Tune's and Optuna's output (start-up box, experiment box, TensorBoard hints, status
    lines, warnings) goes to ``path`` while the block runs: the terminal is flowbench's."""
    with open(path, "a", buffering=1) as stream, contextlib.redirect_stdout(stream):  # Tune prints its boxes
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        import optuna  # noqa: F401 -- its logger gets its own terminal handler on import: swapped below

        loggers = [logging.getLogger(name) for name in ("ray", "optuna")]
        saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
        for logger in loggers:
            logger.handlers[:], logger.propagate = [handler], False
        try:
            yield
        finally:
            for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
                logger.handlers[:], logger.propagate = handlers, propagate


# --------------------------------------------------------------------------- units: what is planned
@dataclasses.dataclass
class Unit:
    """A grid trial (``configs`` one trial) or a search group (``configs`` its trials on every seed,
    searched on the first seed's)."""

    id: str
    hash: str
    configs: list[TrialConfig]
    search: bool
    cost: list[float]  # ordering key, larger first: see estimated_cost


def estimated_cost(config: TrialConfig, info: DatasetInfo) -> list[float]:
    """How long a trial will take, to start the longest first: the images it trains on times the
    parameter count times the pixels (a convolutional flow's FLOPs per image grow with both).
    Budgets in seconds or FLOPs are equal by construction: the parameter count breaks the tie
    (evaluation, latency and figures grow with it)."""
    import flowbench

    model = flowbench.build_model(config.model, info.image_shape, **config.hparams)
    params = float(model.num_parameters())
    pixels = float(math.prod(info.image_shape))
    images = {
        "steps": config.budget * config.batch_size,
        "images": config.budget,
        "epochs": config.budget * info.sizes["train"],
    }
    if config.budget_kind in images:
        return [images[config.budget_kind] * params * pixels, params]
    return [config.budget, params]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def plan_units(spec: SweepSpec, configs: list[TrialConfig], infos: dict[str, DatasetInfo]) -> list[Unit]:
    costs = {}
    for c in configs:  # one model build per (model, dataset, variant): seeds share it
        key = (c.model, c.dataset, c.variant)
        if key not in costs:
            costs[key] = estimated_cost(c, infos[c.dataset])
    if spec.search is None:
        return [Unit(c.trial_id, c.config_hash(), [c], False, costs[(c.model, c.dataset, c.variant)]) for c in configs]
    units = []
    for key in dict.fromkeys((c.model, c.dataset, c.variant) for c in configs):
        group = [c for c in configs if (c.model, c.dataset, c.variant) == key]
        name = "-".join(part for part in key if part)
        identity = [[c.config_hash() for c in group], spec.search.model_dump(mode="json")]
        units.append(Unit(f"search-{name}", _digest(identity), group, True, costs[key]))
    return units


def sample_id(base: TrialConfig, index: int, values: dict) -> str:
    """A search sample's trial id: unique (the sample's index in its group) and stable (the same
    sampled values under the same index give the same id on a re-run)."""
    stem = base.trial_id.rsplit("-seed", 1)[0]
    return f"{stem}-search{index}-{_digest(values)[:6]}"


# --------------------------------------------------------------------------- Tune: search and schedule
def _search_space(search: Search) -> dict:
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    space = {}
    for key, dist in search.space.items():
        ((kind, args),) = dist.items()
        space[key] = tune.choice(args) if kind == "choice" else make[kind](*args)
    return space


def _tune_config(unit: Unit, phase: str, trial: dict) -> dict:
    return {"trial": trial, "unit": unit.id, "unit_hash": unit.hash, "phase": phase, "cost": unit.cost}


class SweepSearch(Searcher):
    """Tune's searcher for a whole sweep: hands out every trial of ``units``, longest first.

    Grid trials are ready from the start. A search group's samples come from its own Optuna
    study (seeded by the group's first seed); once all of them have ended, the best sample by
    validation bits/dim (among those that reached the budget, else among all) is run on every
    seed of the group under the plain trial ids. At most two trials per slot are handed out
    ahead, so Tune always has the next trial waiting when one ends (its actor is then reused),
    and Optuna samples late enough to learn from the samples before.
    """

    def __init__(self, spec: SweepSpec, units: list[Unit]):
        from ray.tune.search.optuna import OptunaSearch

        super().__init__(metric=METRIC, mode=MODE)
        self.ready: list[dict] = [_tune_config(u, "final", u.configs[0].model_dump()) for u in units if not u.search]
        self.groups: dict = {}  # unit id -> its search group's state; looked up with ids that may be None
        for u in units:
            if u.search:
                assert spec.search is not None, "search units come from the spec's search section"
                self.groups[u.id] = {
                    "unit": u,
                    "left": spec.search.num_samples,
                    "index": 0,
                    "live": {},
                    "ended": {},
                    "optuna": OptunaSearch(
                        _search_space(spec.search), metric=METRIC, mode=MODE, seed=u.configs[0].seed
                    ),
                    "finals": False,
                }
        self.live: dict[str, str] = {}  # Tune trial id -> unit id

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # set at construction

    def _candidates(self) -> list[tuple[list[float], int, str]]:
        """(cost, priority, source): finals before samples before grid trials at equal cost."""
        found = [(c["cost"], 0, f"ready:{i}") for i, c in enumerate(self.ready)]
        for gid, g in self.groups.items():
            if g["left"] > 0:
                found.append((g["unit"].cost, 1, f"sample:{gid}"))
        return found

    def suggest(self, trial_id: str):
        candidates = self._candidates()
        if not candidates:
            waiting = any(g["live"] or (g["left"] == 0 and not g["finals"]) for g in self.groups.values())
            return None if waiting else Searcher.FINISHED
        _, _, source = max(candidates, key=lambda c: (c[0], -c[1]))
        kind, key = source.split(":", 1)
        if kind == "ready":
            config = self.ready.pop(int(key))
        else:
            group = self.groups[key]
            values = group["optuna"].suggest(trial_id)
            base, unit = group["unit"].configs[0], group["unit"]
            trial = trial_config({"trial": base.model_dump(), "search": values})
            trial["trial_id"] = sample_id(base, group["index"], values)
            config = _tune_config(unit, "search", trial)
            group["left"] -= 1
            group["index"] += 1
            group["live"][trial_id] = values
        self.live[trial_id] = config["unit"]
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group = self.groups.get(self.live.get(trial_id))
        if group is not None and trial_id in group["live"] and METRIC in result:  # a sample, not a final trial
            group["optuna"].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        unit = self.live.pop(trial_id, None)
        group = self.groups.get(unit)
        if group is None or trial_id not in group["live"]:
            return
        values = group["live"].pop(trial_id)
        result = result or {}  # None: the trial ended without a result
        usable = not error and isinstance(result.get(METRIC), float) and math.isfinite(result[METRIC])
        group["optuna"].on_trial_complete(trial_id, result if usable else None, error=error or not usable)
        if usable:
            group["ended"][trial_id] = {
                "value": result[METRIC],
                "reached": result.get("status") == "ok",
                "search": values,
            }
        if group["left"] == 0 and not group["live"] and not group["finals"]:
            self._add_finals(group)

    def _add_finals(self, group: dict) -> None:
        group["finals"] = True
        ended = list(group["ended"].values())
        pool = [e for e in ended if e["reached"]] or ended
        unit = group["unit"]
        if not pool:
            log.warning("%s: no search sample gave a finite %s; its final trials are not run", unit.id, METRIC)
            return
        best = min(pool, key=lambda e: e["value"])
        for c in unit.configs:
            trial = trial_config({"trial": c.model_dump(), "search": best["search"]}) | {"trial_id": c.trial_id}
            self.ready.append(_tune_config(unit, "final", trial))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class SweepScheduler(FIFOScheduler):
    """Starts the costliest waiting trial first; ASHA within each search group's samples (a
    sample competes with its own group only), FIFO for grid and final trials."""

    def __init__(self, spec: SweepSpec):
        super().__init__()
        asha = spec.search.asha if spec.search is not None else None
        # max_t past the budget: ASHA stops a trial that reaches max_t, before it reports its record
        self.asha_args: dict[str, Any] | None = (
            None
            if asha is None
            else dict(
                time_attr=TIME_ATTR[spec.budget.kind],
                max_t=2 * spec.budget.amount,
                grace_period=asha.grace_period,
                reduction_factor=asha.reduction_factor,
                metric=METRIC,
                mode=MODE,
            )
        )
        self.asha: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _for(self, trial) -> AsyncHyperBandScheduler | None:
        if self.asha_args is None or trial.config.get("phase") != "search":
            return None
        from ray.tune.schedulers import ASHAScheduler

        unit = trial.config["unit"]
        if unit not in self.asha:
            self.asha[unit] = ASHAScheduler(**self.asha_args)
        return self.asha[unit]

    def on_trial_add(self, tune_controller, trial):
        if (asha := self._for(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        asha = self._for(trial)
        return TrialScheduler.CONTINUE if asha is None else asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if (asha := self._for(trial)) is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        if (asha := self._for(trial)) is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        from ray.tune.experiment import Trial

        for status in (Trial.PENDING, Trial.PAUSED):
            waiting = [t for t in tune_controller.get_trials() if t.status == status]
            if waiting:
                return max(waiting, key=lambda t: t.config.get("cost", [0.0]))
        return None

    def debug_string(self) -> str:
        return f"flowbench: longest first, ASHA per search group ({len(self.asha)} groups)"


def _trial_name(trial) -> str:
    return trial.config["trial"]["trial_id"]


def experiment_name(units: list[Unit]) -> str:
    """The Tune experiment of exactly these units at these configurations."""
    return "trials-" + _digest(sorted((u.id, u.hash) for u in units))[:10]


def run_experiment(spec: SweepSpec, storage: str, name: str, units: list[Unit], slots: int, callbacks):
    """Run (or resume: an experiment of the same name holds the same units at the same hashes)
    the Tune experiment of ``units``; returns its results and whether it was resumed."""
    from ray import tune

    # a data-parallel trial only drives its Ray Train workers, which ask for the resources
    # (Tune needs a non-empty request: a token of memory instead of a CPU the workers need)
    own: dict[str, float] = (
        {"cpu": 0, "memory": 2**20}
        if spec.resources.workers > 1
        else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    )
    trainable = tune.with_resources(tune_trial, own)
    filesystem, root = tune_storage(storage)
    path = f"{root.rstrip('/')}/{name}"
    resumed = tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    if resumed:
        log.info("resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        shared = {
            "resources": spec.resources.model_dump(),
            "max_failures": spec.max_failures,
            "storage": storage,
            "train_storage": f"{root.rstrip('/')}/{name}-train",
        }
        tuner = tune.Tuner(
            trainable,
            param_space=shared,
            tune_config=tune.TuneConfig(
                search_alg=SweepSearch(spec, units),
                # two trials a slot out at once: the next trial waits beside each running one (its
                # actor is then reused), every slot of a cluster is asked for at the start (with a
                # custom searcher Tune otherwise keeps one trial pending: one node fills first), and
                # Optuna samples late enough to learn from the samples before
                max_concurrent_trials=2 * slots,
                scheduler=SweepScheduler(spec),
                metric=METRIC,
                mode=MODE,
                num_samples=-1,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
                # a reused actor saves its start-up (~2-3 s a trial); Ray then does not sync the
                # trial's working folder, so everything the driver reads travels in checkpoints
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=root,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # keeping one checkpoint makes Tune save its experiment state after every trial
                # checkpoint, so a killed driver resumes each trial from its latest one
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    grid = tuner.fit()
    return [grid[i] for i in range(len(grid))], resumed


def stored_results(storage: str, name: str):
    """The ResultGrid of an earlier experiment, read from its storage without running anything."""
    from ray import tune

    filesystem, root = tune_storage(storage)
    path = f"{root.rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return None
    return tune.Tuner.restore(path, trainable=tune_trial, storage_filesystem=filesystem).get_results()


# --------------------------------------------------------------------------- records
def error_reason(error: BaseException) -> str:
    """A failed trial's reason: the last line of its error (the exception raised in the trial)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def record_of(tune_config: dict, last: dict, error: BaseException | None) -> dict:
    """The trials.parquet row of a Tune trial from its config and last result; MLflow logs the same.
    A trial stopped by ASHA or failed gets a row too, from its last evaluation."""
    config = TrialConfig.model_validate(tune_config["trial"])
    if error is None and "status" in last and "config_hash" in last:
        row = {k: last[k] for k in RECORD_COLUMNS}
    else:
        status, reason = ("failed", error_reason(error)) if error is not None else ("stopped", "stopped early by ASHA")
        record = config.record(
            status=status,
            reason=reason,
            node=last.get("node", ""),
        )
        if "step" in last:  # the last evaluation: how far the trial got
            record.steps, record.images_seen, record.epochs = (
                int(last["step"]),
                int(last["images_seen"]),
                last["epochs"],
            )
            record.train_seconds, record.train_flops = last["train_seconds"], last.get("train_flops", 0.0)
            record.val_bpd, record.train_bpd = last[METRIC], last["train_bpd"]
        row = record.row()
    # Tune stamps its own trial_id on every result: ours comes from the config
    return row | {"trial_id": config.trial_id, "phase": tune_config["phase"]}


def _curve_of(result) -> list[dict]:
    history = result.metrics_dataframe
    if history is None or "final" not in history.columns:
        return []
    evals = history[history["final"].notna()].drop_duplicates("step", keep="last").sort_values("step")
    return evals[["step", *[k for k in CURVE_METRICS if k in evals.columns]]].to_dict("records")


class RecordStore:
    """``results/NAME/records/<unit>.json``: a finished unit's rows and curves under its hash.
    A unit is finished when its final trials all ended without failing."""

    def __init__(self, out: Path):
        self.out, self.folder = out, out / "records"

    def _path(self, unit_id: str) -> Path:
        return self.folder / f"{unit_id}.json"

    def load(self, unit: Unit) -> list[dict] | None:
        path = self._path(unit.id)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        return stored["trials"] if stored["unit_hash"] == unit.hash else None

    def save(self, unit: Unit, trials: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self._path(unit.id)) as tmp:
            tmp.write_text(json.dumps({"unit_hash": unit.hash, "trials": trials}))

    def stale(self, units: list[Unit]) -> list[Path]:
        """Records of units no longer planned at their stored hash."""
        current = {u.id: u.hash for u in units}
        found = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        return [p for p in found if current.get(p.stem) != json.loads(p.read_text())["unit_hash"]]


def collect(results, units: dict[str, Unit], store: RecordStore, figures: Path) -> dict[str, list[dict]]:
    """Store every unit of ``results`` (a ResultGrid) that finished at its planned hash, with its
    trials' figures; returns the trials of every unit found, finished or not (a failed trial is
    in this run's tables, and runs again next time)."""
    by_unit: dict[str, list] = {}
    for result in results:
        config: dict = result.config or {}
        unit = units.get(config.get("unit", ""))  # no unit: not a trial of this sweep
        if unit is not None and config.get("unit_hash") == unit.hash:
            by_unit.setdefault(unit.id, []).append(result)
    found = {}
    for unit_id, unit_results in by_unit.items():
        unit = units[unit_id]
        trials: list[dict] = [
            {"row": record_of(r.config, r.metrics or {}, r.error), "curve": _curve_of(r)} for r in unit_results
        ]
        found[unit_id] = trials
        finals = [
            (t, r)
            for t, r in zip(trials, unit_results, strict=True)
            if t["row"]["phase"] == "final" and t["row"]["status"] != "failed"
        ]
        if len(finals) < len(unit.configs):
            continue  # not finished: the unit runs (again)
        for t, r in finals:
            if r.checkpoint is not None:  # the report's sample figures
                for figure in FIGURES:
                    copy_from_checkpoint(
                        r.checkpoint, f"{figure}.png", figures / f"{figure}-{t['row']['trial_id']}.png"
                    )
        store.save(unit, trials)
    return found


# --------------------------------------------------------------------------- the sweep
def _read_meta(out: Path) -> dict:
    path = out / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_meta(out: Path, meta: dict) -> None:
    with atomic_write(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def _archive(out: Path, stamp: str, paths: list[Path], storage: str, experiment: str | None) -> Path:
    """Move stale records, their figures and (local storage) the old Tune experiment under
    ``results/NAME/archive/<stamp>/``; nothing is deleted."""
    archive = out / "archive" / stamp
    for path in paths:
        trial_ids = [t["row"]["trial_id"] for t in json.loads(path.read_text())["trials"]]
        dest = archive / path.relative_to(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), dest)
        for figure in (out / "figures" / f"{kind}-{trial_id}.png" for trial_id in trial_ids for kind in FIGURES):
            if figure.is_file():
                (archive / "figures").mkdir(parents=True, exist_ok=True)
                shutil.move(str(figure), archive / "figures" / figure.name)
    filesystem, root = tune_storage(storage)
    if experiment is not None and filesystem is None:
        for folder in (Path(root) / experiment, Path(root) / f"{experiment}-train"):
            if folder.exists():
                (archive / "tune").mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), archive / "tune" / folder.name)
    elif experiment is not None:  # remote storage: the experiment stays where it is, named here
        archive.mkdir(parents=True, exist_ok=True)
        (archive / "tune-experiment.txt").write_text(f"{storage.rstrip('/')}/{experiment}\n")
    return archive


def _efficiency(results, started: float, ended: float, slots: int) -> dict:
    """Sum of the busy seconds of the trials run by this invocation (each from its start in the
    worker to its record written, or its last report if stopped or failed) over slots × wall."""
    busy, ran = 0.0, 0
    for result in results:
        last = result.metrics or {}
        if last.get("started_at", 0) >= started:
            busy += last["reported_at"] - last["started_at"]
            ran += 1
    wall = ended - started
    return {
        "efficiency": busy / (slots * wall) if ran else None,
        "busy_seconds": busy,
        "slots": slots,
        "wall_seconds": wall,
        "trials_run": ran,
    }


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
    that every node reaches (``s3://bucket/prefix``, an NFS path). The results folder is held
    with an exclusive lock for the whole run: a second driver of the same sweep is refused.
    """
    spec, configs, infos = _plan(spec_path)
    out = Path(results_root).resolve() / spec.name
    with exclusive_lock(out, f"flowbench sweep {spec.name}"), ray_log_to(out / "sweep.log"):
        units = plan_units(spec, configs, infos)
        try:
            return _run_locked(spec, units, spec_path, out, address, mlflow_uri, callbacks, num_cpus, storage)
        except Exception as err:
            translated = store_write_error(err, mlflow_uri or default_tracking_uri(out))
            if translated is None:
                raise
            raise translated from None


def _run_locked(spec, units, spec_path, out, address, mlflow_uri, callbacks, num_cpus, storage) -> SweepOutcome:
    from flowbench.results.report import build_report
    from flowbench.results.tables import curves_frame, trials_frame, write_table

    started = time.time()
    start_ray(address, num_cpus)
    _check_resources(spec, address)
    slots = cluster_slots(spec)
    # Tune's trial state and checkpoints; a multi-node cluster needs storage every node reaches
    storage = storage or str(out / "tune")
    tune_storage(storage)  # an unreachable --storage fails here, before anything is tracked
    meta = _read_meta(out)
    uri = mlflow_uri or default_tracking_uri(out)
    if meta.get("mlflow_uri", uri) != uri:
        raise FlowbenchError(
            f"{out} was tracked in {meta['mlflow_uri']}: resume with --mlflow-uri "
            f"{meta['mlflow_uri']} (it logs where it started)"
        )
    artifacts = (out / "mlartifacts").as_uri() if mlflow_uri is None else None
    tracker = MlflowTracker(uri, spec.name, artifacts)
    parent = tracker.get_or_create_run(
        f"sweep:{spec.name}",
        params={
            "models": ",".join(spec.models),
            "datasets": ",".join(spec.datasets),
            "seeds": ",".join(map(str, spec.seeds)),
            "budget": f"{spec.budget.amount:g} {spec.budget.kind}",
            "spec": Path(spec_path).name,
        },
    )
    by_id = {u.id: u for u in units}
    store = RecordStore(out)
    stamp = time.strftime("%Y%m%dT%H%M%S")

    # units whose records are of another configuration: archived, run again
    stale = store.stale(units)
    changed = sorted(p.stem for p in stale if p.stem in by_id)
    todo = [u for u in units if store.load(u) is None]
    name, previous = experiment_name(todo), meta.get("experiment")
    if todo and previous not in (None, name):
        # another set of units than the earlier (perhaps killed) run's: keep what it finished
        # at the planned configurations, then run the rest as a new experiment
        earlier = stored_results(storage, previous)
        if earlier is not None:
            collect(earlier, {u.id: u for u in todo}, store, out / "figures")
        todo = [u for u in units if store.load(u) is None]
        name = experiment_name(todo)
    archive = None
    old_experiment = previous if todo and previous not in (None, name) else None
    if stale or old_experiment:
        archive = _archive(out, stamp, stale, storage, old_experiment)
    if changed:
        log.warning(
            "%d of %d units changed configuration since the last run (%s): running them again; their old "
            "records are in %s",
            len(changed),
            len(units),
            ", ".join(changed),
            archive,
        )
    _forget_runs(tracker, parent, units)
    _write_meta(
        out,
        meta | {"mlflow_uri": uri, "experiment": name if todo else previous, "units": {u.id: u.hash for u in units}},
    )

    efficiency: dict = {"efficiency": None, "busy_seconds": 0.0, "slots": slots, "wall_seconds": 0.0, "trials_run": 0}
    fresh = {}
    if todo:
        callbacks = [MlflowCallback(uri, spec.name, parent, artifacts, record_of), *callbacks]
        results, resumed = run_experiment(spec, storage, name, todo, slots, callbacks)
        fresh = collect(results, {u.id: u for u in todo}, store, out / "figures")
        left = [u for u in todo if store.load(u) is None]
        if resumed and left:
            # Tune syncs its experiment state to storage in the background: a driver killed mid-sync
            # leaves a state older than the trials' checkpoints (trials missing from it, or pointing
            # at checkpoints deleted since), so what the restored experiment left unfinished runs
            # once more, as a new experiment (its trials logged into their MLflow runs, once)
            name = f"{experiment_name(left)}-{stamp}"
            log.warning("%d units unfinished after resuming; running them afresh as %s", len(left), name)
            _write_meta(out, _read_meta(out) | {"experiment": name})
            again, _ = run_experiment(spec, storage, name, left, slots, callbacks)
            fresh |= collect(again, {u.id: u for u in left}, store, out / "figures")
            results += again
        efficiency = _efficiency(results, started, time.time(), slots)

    rows, curves = [], []
    for unit in units:
        for trial in store.load(unit) or fresh.get(unit.id, []):
            rows.append(trial["row"])
            curves.append(trial["curve"])
    trials = trials_frame(rows)
    write_table(trials, out / "trials.parquet", "trials")
    curve_table = curves_frame(rows, curves)
    write_table(curve_table, out / "curves.parquet", "curves")
    report = build_report(out, trials, curve_table)
    _write_meta(out, _read_meta(out) | {"last_run": efficiency})
    client = tracker.client
    if efficiency["efficiency"] is not None:
        client.log_metric(parent, "efficiency", efficiency["efficiency"])
        client.log_metric(parent, "busy_seconds", efficiency["busy_seconds"])
        client.log_metric(parent, "wall_seconds", efficiency["wall_seconds"])
    for path in [
        Path(spec_path),
        out / "sweep.json",
        out / "trials.parquet",
        out / "curves.parquet",
        report["table2"],
        report["md"],
        report["html"],
    ]:
        client.log_artifact(parent, str(path))
    for path in report["plots"]:
        client.log_artifact(parent, str(path), artifact_path="plots")
    client.set_terminated(parent, "FINISHED")
    return SweepOutcome(spec, out, trials, curve_table, uri, parent, efficiency, changed, archive)


def _forget_runs(tracker: MlflowTracker, parent: str, units: list[Unit]) -> None:
    """Trial runs of units no longer planned at their hash are soft-deleted (MLflow's deleted
    lifecycle: hidden from the UI and the read-back, restorable with ``mlflow runs restore``)."""
    current = {u.hash for u in units}
    for run in tracker.find_runs(f"tags.`mlflow.parentRunId` = '{parent}'"):
        if run.data.tags.get(UNIT_TAG) not in current:
            tracker.client.delete_run(run.info.run_id)
