"""What runs inside a Tune trial, on a worker node of the Ray cluster.

Ray imports this module in the trial's process (and in Ray Train's worker processes of a
data-parallel trial), so everything here must be importable on any node from the installed
package and everything passed in must be serialisable: the trial's Tune config (a plain dict) and
the sweep's ``TrialContext``. The driver (``flowbench.sweep.driver``) never runs these functions
itself; it hands ``tune_trial`` to Ray Tune.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback

from flowbench.errors import FlowbenchError
from flowbench.sweep.plan import Unit, trial_of
from flowbench.sweep.search import INTERRUPTED, METRIC, tune_metrics
from flowbench.sweep.stop_broadcast import stop_asked
from flowbench.sweep.storage import stored_checkpoints, tune_storage
from flowbench.trial import (
    CHECKPOINT_FILE,
    SELECTED_FILE,
    TrialConfig,
    TrialInterrupted,
    load_checkpoint,
    model_from_checkpoint,
    run_trial,
)

RECORD_FILE = "record.json"
ATTEMPTS_FILE = "attempts.jsonl"
CURVE_FILE = "curve.jsonl"  # the trial's evaluations so far, one line each, in every checkpoint it reports


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of a Tune experiment shares, handed to the trainable once for all of them
    (``tune.with_parameters``, through Ray's object store) rather than in each trial's config."""

    units: dict[str, Unit]  # the experiment's units by id: each trial's configuration (``trial_of``)
    resources: dict  # ``ResourcesSpec``: per trial, or per data-parallel worker
    max_failures: int
    storage: str  # Tune's storage, as the user gave it
    train_storage: str  # where a data-parallel trial's Ray Train run keeps its state


def tune_trial(tune_config: dict, context: TrialContext) -> None:
    """The Tune trainable: one trial, resumed from Tune's checkpoint when it has one. It reports
    to Tune only what Tune's scheduler and searcher use (``tune_metrics``), with a checkpoint
    that holds the curve so far (``CURVE_FILE``) and the trial's attempts; its last checkpoint
    also holds the record (``RECORD_FILE``), the weights and the sample figures. Every report
    carries ``busy``: when this attempt started and when it reported, the driver's measure of the
    slots' busy time (a pair: Tune keeps running statistics of every number a result holds, for
    every trial, all sweep long; a list it keeps as it is).

    Everything the driver reads travels in reports and checkpoints, never in the trial's
    working folder, which Tune does not sync when it reuses the trial's actor."""
    from ray import tune

    started_at, node = time.time(), ray_node_id()
    trial_dir = Path(tune.get_context().get_trial_dir())
    config = trial_of(tune_config, context.units[tune_config["unit"]]).model_copy(update={"out_dir": str(trial_dir)})
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        restored: Path | None = Path(checkpoint.to_directory(str(trial_dir / "restored")))
    else:
        # none from Tune: a driver killed after this trial uploaded a checkpoint but before Tune saved
        # the experiment's state naming it restores the trial as new; what it left in storage resumes it
        stored = stored_checkpoints(context.storage, tune.get_context().get_experiment_name(), config.trial_id)
        earlier_paths = tune_config.get("earlier_checkpoints", []) or stored
        restored = whole_checkpoint(earlier_paths, context.storage, trial_dir)
    earlier = _lines(restored / ATTEMPTS_FILE) if restored is not None else []
    curve = _lines(restored / CURVE_FILE) if restored is not None else []

    def report(metrics: dict, folder: Path | None, how: str) -> None:
        if folder is not None:
            _write_lines(folder / ATTEMPTS_FILE, earlier + [{"at": started_at, "how": how, "node": node}])
            _write_lines(folder / CURVE_FILE, curve)
        ckpt = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        reported = tune_metrics(metrics, config.budget_kind) | {"node": node, "busy": [started_at, time.time()]}
        tune.report(reported, checkpoint=ckpt)

    def evaluated(point: dict, folder: Path | None, how: str) -> None:
        curve.append(point)
        report(point, folder, how)

    if restored is not None and (restored / RECORD_FILE).is_file():  # finished before the driver died
        report(json.loads((restored / RECORD_FILE).read_text()), restored, "finished already")
        return
    final = trial_dir / "final"
    if context.resources["workers"] > 1:
        how = "data-parallel"  # Ray Train restarts and resumes its workers itself
        _data_parallel_trial(config, context, final)
        curve[:] = _lines(final / CURVE_FILE)  # rank 0 wrote it into each of its checkpoints
    else:
        how = "resumed" if restored else "fresh"
        try:
            record = run_trial(
                config,
                lambda point, folder: evaluated(point, folder, how),
                resume_from=restored / CHECKPOINT_FILE if restored else None,
                stop=stop_asked(tune.get_context().get_experiment_name()).is_set,
            )
        except TrialInterrupted as stopped:
            # the checkpoint of the current step (None: the one it resumed from is current); Tune's
            # metric is asked of every result, so it is there, NaN
            report({INTERRUPTED: True, "step": stopped.step, METRIC: math.nan}, stopped.checkpoint_dir, how)
            # Tune pauses the trial on this report and ends this process; returning would end the
            # trial as finished in Tune's saved state, where it stays unfinished to be resumed
            threading.Event().wait()
        if (trial_dir / "checkpoint").is_dir():  # a trial that diverged at once has none
            shutil.copytree(trial_dir / "checkpoint", final, dirs_exist_ok=True)
        final.mkdir(exist_ok=True)
        (final / RECORD_FILE).write_text(json.dumps(record.row() | {"step": record.steps, "node": ray_node_id()}))
    row = json.loads((final / RECORD_FILE).read_text())
    weights = final / SELECTED_FILE if (final / SELECTED_FILE).is_file() else final / CHECKPOINT_FILE
    if row["status"] == "ok":
        write_figures(weights, final, config.seed)
    report(row, final, how)


def whole_checkpoint(paths: list[str], storage: str, trial_dir: Path) -> Path | None:
    """The newest of ``paths`` (checkpoints of this trial that an earlier experiment left in
    storage, newest first) that is whole, copied into ``trial_dir``; None if none is. A driver
    killed while a trial uploaded its checkpoint leaves that one partial: its weights must load
    and the files every report writes must be there and readable."""
    from ray import tune

    filesystem = tune_storage(storage)[0]
    for index, path in enumerate(paths):
        folder = Path(tune.Checkpoint(path, filesystem=filesystem).to_directory(str(trial_dir / f"earlier-{index}")))
        try:
            step = load_checkpoint(folder)["progress"]["step"]
            curve = [json.loads(line) for line in (folder / CURVE_FILE).read_text().splitlines()]
            for line in (folder / ATTEMPTS_FILE).read_text().splitlines():
                json.loads(line)
            if (folder / RECORD_FILE).is_file():
                json.loads((folder / RECORD_FILE).read_text())
        except (OSError, FlowbenchError, ValueError, KeyError):  # a file missing or cut short
            continue
        if all(point["step"] <= step for point in curve):
            return folder
    return None


def _data_parallel_trial(config: TrialConfig, context: TrialContext, final: Path) -> None:
    """Run the trial as a Ray Train TorchTrainer inside this Tune trial and copy its final
    checkpoint (weights, curve and record) to ``final``. What Tune uses of Ray Train's reports
    reaches it through ``TuneMetricsCallback``; a failed worker group restarts from the run's
    latest checkpoint, as does a re-run of the same trial (same run name and storage)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = context.resources
    per_worker = {"CPU": res["cpu"]} | ({"GPU": res["gpu"]} if res["gpu"] else {})
    result = TorchTrainer(
        ddp_worker,
        train_loop_config={"trial": config.model_dump()},
        scaling_config=ScalingConfig(
            num_workers=res["workers"], use_gpu=res["gpu"] > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=config.trial_id,
            storage_path=context.train_storage,
            storage_filesystem=tune_storage(context.storage)[0],
            failure_config=FailureConfig(max_failures=context.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest resumes
            # ray.train's RunConfig is Ray Train v2's at runtime (a UserCallback list); mypy follows the
            # v1 import ray.train makes before its is_v2_enabled() branch
            callbacks=[TuneMetricsCallback(config.budget_kind)],  # type: ignore[list-item]
        ),
    ).fit()
    assert result.checkpoint is not None, "rank 0 reports the record's checkpoint last"
    result.checkpoint.to_directory(str(final))


class TuneMetricsCallback(TuneReportCallback):
    """Ray Train's reports of a data-parallel trial passed on to Tune as ``tune_metrics`` keeps
    them; the run's own result and checkpoints keep the whole record and curve."""

    def __init__(self, budget_kind: str):
        super().__init__()
        self.budget_kind = budget_kind

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [tune_metrics(metrics[0], self.budget_kind)], checkpoint)


def ddp_worker(train_config: dict) -> None:
    """One Ray Train worker of a data-parallel trial: ``run_trial`` on its shard of each batch
    (Ray Train has set up the process group: gloo on CPU, nccl on GPU). Rank 0 checkpoints;
    every rank reports, as Ray Train asks, with the same all-reduced figures."""
    import tempfile

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    # scratch only: Ray Train copies each reported checkpoint to the run's storage
    with tempfile.TemporaryDirectory(prefix=f"flowbench-rank{rank}-") as scratch:
        out = Path(scratch)
        config = TrialConfig.model_validate(train_config["trial"] | {"out_dir": scratch})
        resume, curve = None, []
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            restored = Path(checkpoint.to_directory(str(out / "restored")))
            resume, curve = restored / CHECKPOINT_FILE, _lines(restored / CURVE_FILE)

        def report(metrics, checkpoint_dir):
            curve.append(metrics)
            if checkpoint_dir:  # rank 0's
                _write_lines(Path(checkpoint_dir) / CURVE_FILE, curve)
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)

        record = run_trial(config, report, resume_from=resume)
        row = record.row() | {"step": record.steps, "node": ray_node_id()}
        final = None
        if rank == 0:  # the run's last checkpoint holds the record: the Tune trial reads it from there
            (out / "checkpoint").mkdir(exist_ok=True)  # a trial that diverged early has no checkpoint
            (out / "checkpoint" / RECORD_FILE).write_text(json.dumps(row))
            _write_lines(out / "checkpoint" / CURVE_FILE, curve)
            final = ray.train.Checkpoint.from_directory(str(out / "checkpoint"))
        ray.train.report(row, checkpoint=final)


def ray_node_id() -> str:
    """The Ray node this process runs on, for the record's ``node`` column: hostnames repeat
    (containers, the test's two nodes on one machine), Ray node ids do not."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _lines(path: Path) -> list[dict]:
    """A JSON-lines file carried in the trial's checkpoints (its attempts: one line per time its
    process started; its curve: one per evaluation); none yet: empty."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _write_lines(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_figures(checkpoint: Path, folder: Path, seed: int) -> None:
    """samples.png (temperature 0.7, the paper's Figure 1) and reconstructions.png (Figure 5)."""
    import torch

    from flowbench.data import load_dataset
    from flowbench.results.plots import image_grid, save_png

    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        samples = model.images(model.sample(36, temperature=0.7, generator=gen))
        config = state["config"]
        test = load_dataset(config["dataset"], config["data_root"]).test
        pixels = test.batch(range(min(12, len(test))))
        x, _ = model.preprocess_pixels(pixels, gen)
        recon = model.images(model.decode(model.encode(x)[0]))
    save_png(image_grid(samples.numpy(), columns=6), folder / "samples.png", scale=2)
    save_png(
        image_grid(torch.cat([pixels, recon]).numpy(), columns=len(pixels)), folder / "reconstructions.png", scale=2
    )
