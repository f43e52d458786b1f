"""Ray and one Tune experiment: start (or join) Ray, run or resume the experiment of a set of
units, read an earlier one back, and measure how busy its slots were. The terminal stays
flowbench's: Ray's, Tune's and Optuna's own output goes to the sweep's log.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ray import tune

from flowbench import stopping
from flowbench.errors import FlowbenchError
from flowbench.sweep.plan import Unit
from flowbench.sweep.search import METRIC, MODE, SweepScheduler, SweepSearch
from flowbench.sweep.spec import SweepSpec
from flowbench.sweep.stop_broadcast import StopBroadcast, stop_broadcast_name
from flowbench.sweep.storage import tune_storage
from flowbench.sweep.worker import TrialContext, tune_trial

log = logging.getLogger(__name__)
# how long a stopping sweep waits for its running trials to checkpoint their current step
GRACE_SECONDS = float(os.environ.get("FLOWBENCH_STOP_GRACE_SECONDS", "20"))


def start_ray(address: str | None, num_cpus: int | None = None, env: dict[str, str] | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray on loopback; ``env`` goes to every
    worker process of this job (a portable sweep's numerics, set before its torch starts)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local Ray needs no token
    # checkpoint-driven state snapshots are deliberate (see run_experiment): no warning about them
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    # flows registered outside the package ($FLOWBENCH_PLUGINS) must exist in every worker too
    from flowbench.flows.registry import plugin_env_vars

    runtime_env = {"env_vars": plugin_env_vars() | (env or {})}
    started = threading.Event()
    failed: list[BaseException] = []

    def init() -> None:
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
        except BaseException as err:  # the caller's to raise
            failed.append(err)
        started.set()
        # Ray's processes die with the thread that started them (Linux's parent-death signal, Ray's
        # fate sharing): this one stays until the process ends
        threading.Event().wait()

    # ray.init in the main thread puts its own SIGTERM handler in place, which exits by a SystemExit
    # raised wherever the process is, even where Python ignores it and prints it (a fork's hooks: the
    # sweep then runs on). From another thread it leaves the process's handlers alone, and a stop
    # asked for while Ray starts waits for Ray to have started
    threading.Thread(target=init, name="flowbench-ray", daemon=True).start()
    started.wait()
    if failed and isinstance(failed[0], ConnectionError):
        raise FlowbenchError(
            f"cannot reach the Ray cluster at {address!r} ({failed[0]}); start it with "
            "`ray up cluster.yaml` (or `ray start --head`) first"
        ) from None
    if failed:
        raise failed[0]


def _trial_demand(spec: SweepSpec) -> dict[str, float]:
    workers = spec.resources.workers
    return {"CPU": spec.resources.cpu * workers, "GPU": spec.resources.gpu * workers}


def check_resources(spec: SweepSpec, address: str | None) -> None:
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
    lines, warnings) goes to ``path`` while the block runs: the terminal is flowbench's. So does
    what native code writes to file descriptor 2 (Ray's C++ core, Arrow's S3 client: "Error ignored
    when destroying file …" once a storage stops answering), while Python's ``sys.stderr`` (flowbench's
    progress and errors) still reaches the terminal."""
    with open(path, "a", buffering=1) as stream, contextlib.redirect_stdout(stream):  # Tune prints its boxes
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        import optuna  # noqa: F401 -- its logger gets its own terminal handler on import: swapped below

        loggers = [logging.getLogger(name) for name in ("ray", "optuna")]
        saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
        for logger in loggers:
            logger.handlers[:], logger.propagate = [handler], False
        try:
            with _native_stderr_to(stream):
                yield
        finally:
            for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
                logger.handlers[:], logger.propagate = handlers, propagate


@contextlib.contextmanager
def _native_stderr_to(stream):
    """File descriptor 2 points at ``stream`` while the block runs. What Python writes to standard error
    goes on to the terminal: ``sys.stderr`` and the logging handlers that write to it (the CLI's) are
    given a copy of the terminal's descriptor. Left alone where ``sys.stderr`` is not descriptor 2 (a
    test's captured stream)."""
    try:
        python_writes_to_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        python_writes_to_fd2 = False
    if not python_writes_to_fd2:
        yield
        return
    python_stderr = sys.stderr
    handlers = [
        h
        for logger in (logging.getLogger(), logging.getLogger("flowbench"))
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and h.stream is python_stderr
    ]
    python_stderr.flush()
    terminal_fd = os.dup(2)
    os.dup2(stream.fileno(), 2)
    terminal = open(terminal_fd, "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace")
    sys.stderr = terminal
    for handler in handlers:
        handler.setStream(terminal)
    try:
        yield
    finally:
        # what failed uploads left behind (Arrow's streams, held by exceptions' frames) is destroyed now,
        # while its last words still go to the log
        gc.collect()
        for handler in handlers:
            handler.setStream(python_stderr)
        sys.stderr = python_stderr
        terminal.flush()
        os.dup2(terminal_fd, 2)
        terminal.close()  # and its descriptor, the copy


def trial_name(trial) -> str:
    return trial.config["trial_id"]


@functools.cache
def _malloc_trim():
    """The C library's malloc_trim, or None (looked up once; Tune pickles callbacks, not ctypes)."""
    import ctypes
    import ctypes.util

    return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)


class ReturnFreedMemory(tune.Callback):
    """glibc's ``malloc_trim(0)`` each time a trial ends: the driver's heap gives back to the system
    the memory Tune and MLflow freed for that trial, which glibc otherwise keeps (a 300-trial sweep's
    driver grew 0.213 MiB a trial without, 0.124 with: ``benchmarks/bench_load.py --trials 300``). A no-op where
    the C library has no malloc_trim (musl, macOS)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trim := _malloc_trim()) is not None:
            trim(0)

    on_trial_error = on_trial_complete


class StopInOrder(tune.Callback):
    """flowbench's stop (``flowbench.stopping``) of a Tune experiment. Once asked: no trial starts
    (``SweepScheduler``), and every running trial is asked to checkpoint its current step
    (``StopBroadcast``), which Tune registers as it pauses the trial (``SweepScheduler``). When
    none runs any more (paused, finished or failed), or after ``GRACE_SECONDS``, Tune's own stop
    ends the run: SIGUSR1, the signal Tune's run loop listens to, saves the experiment's state and
    ends the trials. Paused or still running, they are unfinished in that state and resume from
    their latest checkpoint when the experiment is restored."""

    def __init__(self, experiment: str):
        self.experiment = experiment
        self.deadline: float | None = None
        self.ended = False

    def on_step_begin(self, iteration, trials, **info):
        if self.ended or not stopping.requested():
            return
        if self.deadline is None:
            import ray

            self.deadline = time.monotonic() + GRACE_SECONDS
            ray.get_actor(stop_broadcast_name(self.experiment)).ask.remote()
        waiting = [t for t in trials if t.status == t.RUNNING]
        if waiting and time.monotonic() < self.deadline:
            return
        self.ended = True
        log.info(
            "ending the experiment (%d running trials not checkpointed within %.0f s)", len(waiting), GRACE_SECONDS
        )
        if callable(signal.getsignal(signal.SIGUSR1)):  # Tune listens when run from the main thread, as by the CLI
            signal.raise_signal(signal.SIGUSR1)
        else:  # no saved state now: the trials resume from their checkpoints Tune saved last
            stop = stopping.current()
            assert stop is not None, "a stop was requested"
            stop.check("while trials ran, at their last checkpoint saved")


def run_experiment(
    spec: SweepSpec,
    storage: str,
    name: str,
    units: list[Unit],
    slots: int,
    callbacks,
    earlier: dict[str, list[str]] | None = None,
):
    """Run (or resume: an experiment of the same name holds the same units at the same hashes)
    the Tune experiment of ``units``; returns its results and whether it was resumed. A new
    experiment's grid trials resume from the checkpoints ``earlier`` names (trial id -> paths in
    storage, newest first), if any."""
    import ray

    # a data-parallel trial only drives its Ray Train workers, which ask for the resources
    # (Tune needs a non-empty request: a token of memory instead of a CPU the workers need)
    own: dict[str, float] = (
        {"cpu": 0, "memory": 2**20}
        if spec.resources.workers > 1
        else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    )
    filesystem, root = tune_storage(storage)
    context = TrialContext(
        units={u.id: u for u in units},
        resources=spec.resources.model_dump(),
        max_failures=spec.max_failures,
        storage=storage,
        train_storage=f"{root.rstrip('/')}/{name}-train",
    )
    trainable = tune.with_resources(tune.with_parameters(tune_trial, context=context), own)
    path = f"{root.rstrip('/')}/{name}"
    resumed = tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    if resumed:
        log.info("resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=SweepSearch(spec, units, earlier),
                # two trials a slot out at once: the next trial waits beside each running one (its
                # actor is then reused), every slot of a cluster is asked for at the start (with a
                # custom searcher Tune otherwise keeps one trial pending: one node fills first), and
                # Optuna samples late enough to learn from the samples before
                max_concurrent_trials=2 * slots,
                scheduler=SweepScheduler(spec),
                metric=METRIC,
                mode=MODE,
                num_samples=-1,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
                # a reused actor saves its start-up (~2-3 s a trial); Ray then does not sync the
                # trial's working folder, so everything the driver reads travels in checkpoints. On
                # several nodes Tune would also hand a trial whose actor is still starting on one node
                # to an actor freed on another, so a node slow to start its actors (a cold worker)
                # could train nothing: there each trial trains where Ray placed it
                reuse_actors=len([node for node in ray.nodes() if node["Alive"]]) == 1,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=root,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # keeping one checkpoint makes Tune save its experiment state after every trial
                # checkpoint, so a killed driver resumes each trial from its latest one
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[*callbacks, ReturnFreedMemory(), StopInOrder(name)],
                verbose=0,
            ),
        )
    if stopping.current() is not None:  # Ctrl-C is flowbench's to handle (StopInOrder), not Tune's
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    broadcast = ray.remote(num_cpus=0)(StopBroadcast).options(name=stop_broadcast_name(name)).remote()
    try:
        grid = tuner.fit()
    finally:
        ray.kill(broadcast)  # type: ignore[arg-type]  # an actor handle, which ray.remote's overloads hide
    return [grid[i] for i in range(len(grid))], resumed


def stored_results(storage: str, name: str):
    """The ResultGrid of an earlier experiment, read from its storage without running anything."""
    filesystem, root = tune_storage(storage)
    path = f"{root.rstrip('/')}/{name}"
    if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return None
    return tune.Tuner.restore(path, trainable=tune_trial, storage_filesystem=filesystem).get_results()


def slot_efficiency(results, started: float, ended: float, slots: int) -> dict:
    """Sum of the busy seconds of the trials run by this invocation (each from its start in the
    worker to its record written, or its last report if stopped or failed) over slots × wall."""
    busy, ran = 0.0, 0
    for result in results:
        began, reported = (result.metrics or {}).get("busy", (0.0, 0.0))
        if began >= started:
            busy += reported - began
            ran += 1
    wall = ended - started
    return {
        "efficiency": busy / (slots * wall) if ran else None,
        "busy_seconds": busy,
        "slots": slots,
        "wall_seconds": wall,
        "trials_run": ran,
    }
