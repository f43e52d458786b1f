"""A data-parallel trial (Ray Train TorchTrainer, 2 gloo workers on CPU) against one process."""

import pytest
import torch

from flowbench.sweep.runner import ddp_worker, start_ray
from flowbench.trial import TrialConfig, load_checkpoint, run_trial

pytestmark = pytest.mark.slow


def test_two_gloo_workers_reach_the_one_worker_parameters(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = dict(model="glow", dataset="digits", hparams=dict(depth=2, levels=2, hidden_channels=8), seed=3,
                  batch_size=32, budget=6, eval_every=3, checkpoint_every=3, latency_repeats=2)
    single = run_trial(TrialConfig(**config, out_dir=str(tmp_path / "single")))
    start_ray(None, num_cpus=2)
    try:
        trainer = TorchTrainer(
            ddp_worker, train_loop_config={"trial": config},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "train")),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    assert result.metrics["workers"] == 2 and result.metrics["status"] == "ok" and result.metrics["steps"] == 6
    assert result.metrics["test_bpd"] == pytest.approx(single.test_bpd, rel=1e-5)
    assert result.metrics["images_seen"] == single.images_seen
    parallel = load_checkpoint(result.checkpoint.path)["model"]
    alone = load_checkpoint(tmp_path / "single" / "checkpoint")["model"]
    assert parallel.keys() == alone.keys()
    for key in alone:
        torch.testing.assert_close(parallel[key], alone[key], rtol=1e-4, atol=1e-5)


def test_a_sweep_runs_data_parallel_trials_through_tune(tmp_path):
    from flowbench.results.tables import read_table
    from flowbench.sweep.runner import run_sweep

    spec = tmp_path / "ddp.yaml"
    spec.write_text("""\
name: ddp
models: [glow]
datasets: [digits]
budget: {steps: 10}
train: {batch_size: 32, eval_every: 5, checkpoint_every: 5}
overrides: {glow: {depth: 2, levels: 2, hidden_channels: 8}}
resources: {cpu: 1, workers: 2}
latency: {batch_size: 8, repeats: 2}
""")
    import ray

    try:
        run_sweep(spec, tmp_path / "results", num_cpus=2)
    finally:
        ray.shutdown()
    trials = read_table(tmp_path / "results" / "ddp" / "trials.parquet", "trials")
    row = trials.iloc[0]
    assert (row.trial_id, row.status, row.workers, row.steps) == ("glow-digits-seed0", "ok", 2, 10)
    curves = read_table(tmp_path / "results" / "ddp" / "curves.parquet", "curves")
    assert sorted(curves.step) == [5, 10]


class Interrupt(Exception):
    pass


def _interrupt_after_first_checkpoint(metrics, checkpoint_dir):
    if metrics["step"] >= 3:  # every rank stops at the same step; rank 0 has written the checkpoint
        raise Interrupt


def _rank(rank: int, world: int, port: int, config: dict, out: str, resume: str | None) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run_trial(TrialConfig(**config, out_dir=out), None if resume else _interrupt_after_first_checkpoint,
                  resume_from=resume)
    except Interrupt:
        pass
    finally:
        torch.distributed.destroy_process_group()


def test_an_interrupted_two_process_trial_resumes_to_the_one_process_result(tmp_path):
    import socket

    config = dict(model="nxn_shift", dataset="digits", hparams=dict(depth=2, levels=2, hidden_channels=8), seed=1,
                  batch_size=32, budget=6, eval_every=3, checkpoint_every=3, latency_repeats=2)
    run_trial(TrialConfig(**config, out_dir=str(tmp_path / "single")))
    out = str(tmp_path / "parallel")
    for resume in (None, str(tmp_path / "parallel" / "checkpoint")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_rank, args=(2, port, config, out, resume), nprocs=2)
        if resume is None:
            assert load_checkpoint(tmp_path / "parallel" / "checkpoint")["progress"]["step"] == 3
    state = load_checkpoint(tmp_path / "parallel" / "checkpoint")
    assert state["progress"]["step"] == 6
    alone = load_checkpoint(tmp_path / "single" / "checkpoint")
    assert [p["test_bpd"] for p in state["curve"]] == pytest.approx([p["test_bpd"] for p in alone["curve"]], rel=1e-5)
    for key in alone["model"]:
        torch.testing.assert_close(state["model"][key], alone["model"][key], rtol=1e-4, atol=1e-5)
