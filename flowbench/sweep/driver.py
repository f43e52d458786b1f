"""The sweep driver: it runs in the process that called ``flowbench sweep``, never on a worker.

Top to bottom, a sweep: plan its units (``plan``), drop what is recorded at its current
configuration and archive what changed (``records``), run the rest as ONE Ray Tune experiment
(``experiment``, with the searcher and scheduler of ``search``), collect each trial's record and
curve, write the tables and the report and log them to MLflow. What runs inside a trial lives in
``flowbench.sweep.worker``.

The records are the sweep's truth and MLflow a view of them: a tracking store that fails costs
one warning, and the next run logs what it missed. A stop asked for by a signal
(``flowbench.stopping``) ends the sweep in order: the running trials checkpoint where they are and
stay unfinished (the next run resumes them), the finished ones are written to the tables and
report, which say the sweep is incomplete, and ``Interrupted`` says how many are left.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import pandas as pd

from flowbench import stopping
from flowbench.atomic import atomic_write
from flowbench.errors import FlowbenchError
from flowbench.locks import exclusive_lock
from flowbench.numerics import environment_for
from flowbench.sweep.experiment import (
    check_resources,
    cluster_slots,
    ray_log_to,
    run_experiment,
    slot_efficiency,
    start_ray,
    stored_results,
)
from flowbench.sweep.latency import LATENCY_FILE, WEIGHTS_DIR, read_latency, run_phase
from flowbench.sweep.plan import SweepPlan, Unit, experiment_name, plan_sweep
from flowbench.sweep.records import RecordStore, archive_stale, collect, curve_of, record_of
from flowbench.sweep.search import INTERRUPTED
from flowbench.sweep.spec import SweepSpec
from flowbench.sweep.storage import stored_checkpoints, tune_storage
from flowbench.sweep.tracking import (
    UNIT_TAG,
    MlflowCallback,
    MlflowTracker,
    clear_outage,
    default_tracking_uri,
    failure_reason,
    log_missing,
)

__all__ = ["SweepOutcome", "run_sweep"]
log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepOutcome:
    spec: SweepSpec
    results_dir: Path
    trials: pd.DataFrame
    curves: pd.DataFrame
    latency: pd.DataFrame | None  # the latency table (None: no trial ok yet, or the phase was stopped first)
    mlflow_uri: str
    parent_run_id: str
    efficiency: dict  # efficiency, busy_seconds, slots, wall_seconds, trials_run (efficiency, slots None: nothing ran)
    changed: list[str]  # units re-run because their configuration changed
    archive: Path | None  # where their old records went
    tracked: bool  # whether MLflow holds everything (False: its store failed; the next run logs the rest)


# --------------------------------------------------------------------------- the sweep
def _read_meta(out: Path) -> dict:
    path = out / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_meta(out: Path, meta: dict) -> None:
    with atomic_write(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def run_sweep(
    spec_path: str | Path,
    results_root: str | Path = "results",
    address: str | None = None,
    mlflow_uri: str | None = None,
    callbacks: tuple = (),
    num_cpus: int | None = None,
    storage: str | None = None,
    planned: SweepPlan | None = None,
) -> SweepOutcome:
    """Run (or resume) every trial of the spec; write the tables and the report, log them to MLflow.
    ``planned``: the spec's plan when the caller has made it already (``plan_sweep``).

    ``storage`` is Tune's storage (default ``results/NAME/tune``): on a multi-node cluster give one
    that every node reaches (``s3://bucket/prefix``, an NFS path). The results folder is held
    with an exclusive lock for the whole run: a second driver of the same sweep is refused.
    """
    planned = planned or plan_sweep(spec_path)
    spec = planned.spec
    out = Path(results_root).resolve() / spec.name
    with exclusive_lock(out, f"flowbench sweep {spec.name}"), ray_log_to(out / "sweep.log"):
        units = planned.units
        try:
            return _run_locked(spec, units, spec_path, out, address, mlflow_uri, callbacks, num_cpus, storage)
        except FlowbenchError:
            raise
        except Exception as err:  # Tune's, pyarrow's: first ask whether Tune's storage has gone
            lost = _storage_lost(storage, out, [err])
            if lost is None:
                raise
            raise lost from None


def _storage_lost(storage: str | None, out: Path, errors: list[BaseException]) -> FlowbenchError | None:
    """The one line for remote Tune storage that stopped answering while the sweep ran, found by
    asking it or in the errors (None for a local folder, or errors of another kind): what the
    trials saved there stays, as do the records."""
    if storage is None or "://" not in storage or not errors:
        return None
    reasons = [failure_reason(err) for err in errors]
    said = [r for r in reasons if r.startswith("unreachable")]
    try:
        tune_storage(storage)
    except FlowbenchError:
        said = said or reasons
    if not said:
        return None
    return FlowbenchError(
        f"--storage {storage} stopped answering while the sweep ran ({said[0]}): the trials keep the "
        f"checkpoints they saved there and the finished ones are recorded in {out}; once it answers, run "
        "the same command to resume"
    )


def _unfinished(units: list[Unit], ended: set[str]) -> list[str]:
    """The planned trials (a search group's: its final ones) without a row in the tables."""
    return [c.trial_id for u in units for c in u.configs if c.trial_id not in ended]


def _stop_if_asked(when: str, units: list[Unit], store: RecordStore) -> None:
    stop = stopping.current()
    if stop is not None:
        recorded = {t["row"]["trial_id"] for u in units for t in store.load(u) or []}
        left = _unfinished(units, recorded)
        stop.check(f"{when}: {len(left)} of {sum(len(u.configs) for u in units)} trials unfinished")


def _run_locked(spec, units, spec_path, out, address, mlflow_uri, callbacks, num_cpus, storage) -> SweepOutcome:
    from flowbench.results.report import build_report
    from flowbench.results.tables import curves_frame, trials_frame, write_table

    started = time.time()
    store = RecordStore(out)
    todo = [u for u in units if store.load(u) is None]
    slots = None  # a run with nothing left to train starts no Ray
    if todo:
        start_ray(address, num_cpus, environment_for(spec.numerics))
        _stop_if_asked("while Ray was starting", units, store)
        check_resources(spec, address)
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
    clear_outage(uri)
    parent = tracker.attempt(
        "the sweep's run",
        tracker.get_or_create_run,
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
    left_behind: dict[str, list[str]] = {}  # trial id -> checkpoints an earlier experiment left, newest first
    stamp = time.strftime("%Y%m%dT%H%M%S")

    # units whose records are of another configuration: archived, run again
    stale = store.stale(units)
    changed = sorted(p.stem for p in stale if p.stem in by_id)
    name, previous = experiment_name(todo), meta.get("experiment")
    if todo and previous not in (None, name):
        # another set of units than the earlier (perhaps killed) run's: keep what it finished
        # at the planned configurations, then run the rest as a new experiment
        earlier = stored_results(storage, previous)
        if earlier is not None:
            collect(earlier, {u.id: u for u in todo}, store, out / "figures", out / WEIGHTS_DIR)
        todo = [u for u in units if store.load(u) is None]
        name = experiment_name(todo)
        # its unfinished trials of units planned as they were go on from the newest whole checkpoint they
        # left there, not from step 0 (a unit whose configuration changed starts over)
        current = {u.id: u.hash for u in todo}
        left_behind = {
            r.config["trial_id"]: stored_checkpoints(storage, previous, r.config["trial_id"])
            for r in earlier or []
            if r.config and "trial_id" in r.config and current.get(r.config.get("unit")) == r.config.get("unit_hash")
        }
    archive = None
    old_experiment = previous if todo and previous not in (None, name) else None
    if stale or old_experiment:
        archive = archive_stale(out, stamp, stale, storage, old_experiment)
    if changed:
        log.warning(
            "%d of %d units changed configuration since the last run (%s): running them again; their old "
            "records are in %s",
            len(changed),
            len(units),
            ", ".join(changed),
            archive,
        )
    if parent is not None:
        tracker.attempt("the deletion of changed trials' runs", _forget_runs, tracker, parent, units)
    _write_meta(
        out,
        meta | {"mlflow_uri": uri, "experiment": name if todo else previous, "units": {u.id: u.hash for u in units}},
    )

    efficiency: dict = {"efficiency": None, "busy_seconds": 0.0, "slots": slots, "wall_seconds": 0.0, "trials_run": 0}
    fresh: dict[str, list[dict]] = {}
    checkpointed = 0  # unfinished trials that checkpointed their current step when the sweep stopped
    if todo:
        assert slots is not None, "Ray started: todo only shrinks after the start"
        trial_row = functools.partial(record_of, units=by_id)
        callbacks = [MlflowCallback(uri, spec.name, parent, artifacts, trial_row, curve_of), *callbacks]
        results, resumed = run_experiment(spec, storage, name, todo, slots, callbacks, left_behind)
        lost = _storage_lost(storage, out, [r.error for r in results if r.error is not None])
        if lost is not None:
            raise lost  # trials that failed for want of their storage resume when it is back
        fresh = collect(results, {u.id: u for u in todo}, store, out / "figures", out / WEIGHTS_DIR)
        checkpointed = sum(bool((r.metrics or {}).get(INTERRUPTED)) for r in results)
        left = [u for u in todo if store.load(u) is None]
        if resumed and left and not stopping.requested():
            # Tune deletes a trial's older checkpoint as it registers a newer one but saves the
            # experiment's state (which names the checkpoint to resume from) after, in the
            # background: a driver killed in between leaves a state older than the trials'
            # checkpoints (trials missing from it, or pointing at checkpoints deleted since), and
            # Tune fails those trials on restore. What the restored experiment left unfinished runs
            # once more as a new experiment, each grid trial from the newest whole checkpoint it
            # left in storage (its evaluations logged into its MLflow run, once)
            earlier = {c.trial_id: stored_checkpoints(storage, name, c.trial_id) for u in left for c in u.configs}
            name = f"{experiment_name(left)}-{stamp}"
            log.warning(
                "%d units unfinished after resuming (%s); running them again as %s, from their latest checkpoints",
                len(left),
                ", ".join(u.id for u in left),
                name,
            )
            _write_meta(out, _read_meta(out) | {"experiment": name})
            again, _ = run_experiment(spec, storage, name, left, slots, callbacks, earlier)
            fresh |= collect(again, {u.id: u for u in left}, store, out / "figures", out / WEIGHTS_DIR)
            results += again
        efficiency = slot_efficiency(results, started, time.time(), slots)
    interrupted = bool(todo) and stopping.requested()  # Tune stopped in order (or before any trial started)

    ended = [(unit.hash, trial) for unit in units for trial in store.load(unit) or fresh.get(unit.id, [])]
    rows = [trial["row"] for _, trial in ended]
    unfinished = _unfinished(units, {row["trial_id"] for row in rows}) if interrupted else []
    trials = trials_frame(rows)
    latency, timed_all = read_latency(out), False
    if not unfinished and not stopping.requested():  # every trial trained: the latency phase, alone
        latency, timed_all = run_phase(
            spec, out, trials, lambda: start_ray(address, num_cpus, environment_for(spec.numerics))
        )
    write_table(trials, out / "trials.parquet", "trials")
    curve_table = curves_frame(rows, [trial["curve"] for _, trial in ended])
    write_table(curve_table, out / "curves.parquet", "curves")
    report = build_report(
        out,
        trials,
        curve_table,
        detect=spec.power.difference,
        target_power=spec.power.target,
        unfinished=unfinished,
        latency=latency,
    )
    ran = {"last_run": efficiency, "power": spec.power.model_dump(), "unfinished": unfinished}
    _write_meta(out, _read_meta(out) | ran)
    if parent is not None and unfinished:
        tracker.attempt("the sweep's run", tracker.client.set_terminated, parent, "KILLED")
    elif parent is not None:
        tracker.attempt("trials the store missed", log_missing, tracker, parent, ended, out / "figures")
        tracker.attempt(
            "the sweep's tables and report", _log_sweep, tracker, parent, spec_path, out, report, efficiency
        )
    stop = stopping.current()
    if stop is not None and unfinished:
        stop.check(
            f"while trials ran: {len(unfinished)} of {sum(len(u.configs) for u in units)} trials unfinished, "
            f"{checkpointed} running ones checkpointed at the step they had reached; the tables and report hold "
            "the finished ones and say the sweep is incomplete"
        )
    if stop is not None and not unfinished and not timed_all:
        stop.check(
            "before the latency phase had timed every trial: every trial is recorded; the next run times what the "
            "latency table lacks, without training"
        )
    if stop is not None:
        stop.check(
            "while the tables were written: every trial had finished, and the tables and report are complete", False
        )
    tracked = parent is not None and not tracker.down
    return SweepOutcome(
        spec, out, trials, curve_table, latency, uri, parent or "", efficiency, changed, archive, tracked
    )


def _log_sweep(tracker: MlflowTracker, parent: str, spec_path, out: Path, report: dict, efficiency: dict) -> None:
    """The parent run's figures and files: slot efficiency, the spec, the tables, the report, its plots."""
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
        *([out / LATENCY_FILE] if (out / LATENCY_FILE).is_file() else []),
        report["table2"],
        report["md"],
        report["html"],
    ]:
        client.log_artifact(parent, str(path))
    for path in report["plots"]:
        client.log_artifact(parent, str(path), artifact_path="plots")
    client.set_terminated(parent, "FINISHED")


def _forget_runs(tracker: MlflowTracker, parent: str, units: list[Unit]) -> None:
    """Trial runs of units no longer planned at their hash are soft-deleted (MLflow's deleted
    lifecycle: hidden from the UI and the read-back, restorable with ``mlflow runs restore``)."""
    current = {u.hash for u in units}
    for run in tracker.find_runs(f"tags.`mlflow.parentRunId` = '{parent}'"):
        if run.data.tags.get(UNIT_TAG) not in current:
            tracker.client.delete_run(run.info.run_id)
