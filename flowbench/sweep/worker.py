"""What runs inside a Tune trial, on a worker node of the Ray cluster.

Ray imports this module in the trial's process (and in Ray Train's worker processes of a
data-parallel trial), so everything here must be importable on any node from the installed
package and everything passed in must be serialisable: plain dicts of the trial's config. The
driver (``flowbench.sweep.driver``) never runs these functions itself; it hands ``tune_trial``
to Ray Tune.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from flowbench.sweep.spec import trial_config
from flowbench.trial import CHECKPOINT_FILE, TrialConfig, load_checkpoint, model_from_checkpoint, run_trial

RECORD_FILE = "record.json"


def tune_trial(tune_config: dict) -> None:
    """The Tune trainable: one trial, resumed from Tune's checkpoint when it has one. Its last
    report carries the record and a checkpoint holding the weights and the sample figures."""
    from ray import tune

    trial_dir = Path(tune.get_context().get_trial_dir())
    config = TrialConfig.model_validate(trial_config(tune_config) | {"out_dir": str(trial_dir)})
    checkpoint = tune.get_checkpoint()
    restored = Path(checkpoint.to_directory(str(trial_dir / "restored"))) if checkpoint is not None else None
    if restored is not None and (restored / RECORD_FILE).is_file():  # finished before the driver died
        _attempt(trial_dir, "finished already")
        tune.report(json.loads((restored / RECORD_FILE).read_text()), checkpoint=checkpoint)
        return
    final = trial_dir / "final"
    if tune_config["resources"]["workers"] > 1:
        _attempt(trial_dir, "data-parallel")  # Ray Train restarts and resumes its workers itself
        _data_parallel_trial(config, tune_config, final)
    else:
        _attempt(trial_dir, "resumed" if restored else "fresh")

        def report(metrics, checkpoint_dir):
            ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            tune.report(metrics, checkpoint=ckpt)

        record = run_trial(config, report, resume_from=restored / CHECKPOINT_FILE if restored else None)
        final.mkdir(exist_ok=True)
        if record.status == "ok":  # a trial that diverged early may have no checkpoint
            shutil.copy2(trial_dir / "checkpoint" / CHECKPOINT_FILE, final / CHECKPOINT_FILE)
        (final / RECORD_FILE).write_text(json.dumps(record.row() | {"step": record.steps}))
    row = json.loads((final / RECORD_FILE).read_text())
    if row["status"] == "ok":
        write_figures(final / CHECKPOINT_FILE, final, config.seed)
    tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(final)))


def _data_parallel_trial(config: TrialConfig, tune_config: dict, final: Path) -> None:
    """Run the trial as a Ray Train TorchTrainer inside this Tune trial and copy its final
    checkpoint (weights and record) to ``final``. Ray Train's reports reach Tune through
    TuneReportCallback; a failed worker group restarts from the run's latest checkpoint, as does
    a re-run of the same trial (same run name and storage)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = tune_config["resources"]
    per_worker = {"CPU": res["cpu"]} | ({"GPU": res["gpu"]} if res["gpu"] else {})
    result = TorchTrainer(
        ddp_worker,
        train_loop_config={"trial": config.model_dump()},
        scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=res["gpu"] > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=config.trial_id, storage_path=tune_config["train_storage"],
                             failure_config=FailureConfig(max_failures=tune_config["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest resumes
                             callbacks=[TuneReportCallback()]),
    ).fit()
    result.checkpoint.to_directory(str(final))


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
        resume = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume = Path(checkpoint.to_directory(str(out / "restored"))) / CHECKPOINT_FILE

        def report(metrics, checkpoint_dir):
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)

        record = run_trial(config, report, resume_from=resume)
        row = record.row() | {"step": record.steps}
        final = None
        if rank == 0:  # the run's last checkpoint holds the record: the Tune trial reads it from there
            (out / "checkpoint").mkdir(exist_ok=True)  # a trial that diverged early has no checkpoint
            (out / "checkpoint" / RECORD_FILE).write_text(json.dumps(row))
            final = ray.train.Checkpoint.from_directory(str(out / "checkpoint"))
        ray.train.report(row, checkpoint=final)


def _attempt(trial_dir: Path, how: str) -> None:
    """Provenance: one line per time this trial's process started (retries, resumes)."""
    with open(trial_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"at": time.time(), "how": how}) + "\n")


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
    save_png(image_grid(torch.cat([pixels, recon]).numpy(), columns=len(pixels)), folder / "reconstructions.png", scale=2)
