"""A data-parallel trial (Ray Train TorchTrainer, 2 gloo workers on CPU) against one process."""

import pytest
import torch

from flowbench.sweep.worker import ddp_worker
from flowbench.trial import TrialConfig, load_checkpoint, run_trial
from tests.sweep.test_runner import local_ray, spec_file  # noqa: F401 -- one local Ray for the file's Ray tests

pytestmark = pytest.mark.slow


class Interrupt(Exception):
    pass


def _interrupt_after_first_checkpoint(metrics, checkpoint_dir):
    if metrics["step"] >= 3:  # every rank stops at the same step; rank 0 has written the checkpoint
        raise Interrupt


def _rank(rank: int, world: int, port: int, config: dict, out: str, resume: str | None) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run_trial(
            TrialConfig(**config, out_dir=out),
            None if resume else _interrupt_after_first_checkpoint,
            resume_from=resume,
        )
    except Interrupt:
        pass
    finally:
        torch.distributed.destroy_process_group()


def test_an_interrupted_two_process_memory_lean_trial_resumes_to_the_one_process_result(tmp_path):
    import socket

    # memory-lean too: DDP's gradient hooks must fire once per parameter through recomputed steps
    config = dict(
        model="nxn_shift",
        dataset="digits",
        hparams=dict(depth=2, levels=2, hidden_channels=8),
        seed=1,
        batch_size=32,
        budget=6,
        evaluations=2,
        memory_saving=True,
    )
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
    assert [p["val_bpd"] for p in state["curve"]] == pytest.approx([p["val_bpd"] for p in alone["curve"]], rel=1e-5)
    for key in alone["model"]:
        torch.testing.assert_close(state["model"][key], alone["model"][key], rtol=1e-4, atol=1e-5)


def _train_worker_pids() -> list[int]:
    """The Ray Train workers of this process's local Ray (not those of another test process's)."""
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    found = psutil.process_iter(["cmdline"])
    return [p.pid for p in found if p.pid in ours and "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.usefixtures("local_ray")
def test_a_killed_worker_restarts_from_the_latest_checkpoint(tmp_path):
    """A sweep runs a data-parallel trial through Tune; SIGKILL one of its Ray Train workers
    mid-trial: Ray Train restarts the group from the latest checkpoint and the trial ends where
    an uninterrupted one-process trial ends."""
    import json
    import os
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from flowbench.results.tables import read_table
    from flowbench.sweep.driver import run_sweep
    from flowbench.sweep.plan import plan

    spec = spec_file(
        tmp_path, "restart", models=("glow",), steps=100, extra="resources: {cpu: 1, workers: 2}\nmax_failures: 1\n"
    )
    tune_dir = tmp_path / "results" / "restart" / "tune"
    killed = {}

    def registered_step() -> int:
        """The step of the checkpoint Ray Train would restart from: the latest its controller
        registered (a checkpoint folder in storage may not be registered yet)."""
        try:
            (snapshot,) = tune_dir.glob("trials-*-train/*/checkpoint_manager_snapshot.json")
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        except (ValueError, TypeError, KeyError):  # not there yet, or caught mid-write
            return 0

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not registered_step():
            time.sleep(0.1)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed["after_step"] = registered_step()

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    killer.start()
    try:
        outcome = run_sweep(spec, tmp_path / "results", num_cpus=2)
    finally:
        killer.join()
    assert 10 <= killed.get("after_step", 0) < 100, f"the worker was not killed mid-trial: {killed}"

    row = read_table(outcome.results_dir / "trials.parquet", "trials").iloc[0]
    assert (row.trial_id, row.status, row.workers, row.steps) == ("glow-digits-seed0", "ok", 2, 100)
    curves = read_table(outcome.results_dir / "curves.parquet", "curves")
    assert sorted(curves.step) == list(range(10, 101, 10))
    # resumed, not restarted from scratch: Tune saw every evaluation step once, in order
    (result_file,) = [p for p in tune_dir.glob("trials-*/*/result.json") if not p.parts[-3].endswith("-train")]
    reported = [json.loads(line) for line in result_file.read_text().splitlines()]
    evaluations = [r["step"] for r in reported if "status" not in r]  # not the reports of the record
    assert evaluations == list(range(10, 101, 10)), evaluations
    (planned,) = plan(spec)[1]  # the same trial in one process: the card's recipe, the spec's settings
    alone = run_trial(planned.model_copy(update={"out_dir": str(tmp_path / "alone")}))
    # 2 shards sum in another order than 1 process: the 1e-7 gaps grow over 100 steps to ~1e-5
    assert row.test_bpd == pytest.approx(alone.test_bpd, rel=1e-4)
    # the data-parallel trial's sample grid reaches MLflow and the report, as a one-worker trial's does
    assert (outcome.results_dir / "figures" / f"samples-{row.trial_id}.png").is_file()
    client = MlflowClient(outcome.mlflow_uri)
    (child,) = client.search_runs(
        [client.get_experiment_by_name("restart").experiment_id], "tags.mlflow.parentRunId != ''"
    )
    assert "samples.png" in [a.path for a in client.list_artifacts(child.info.run_id)]


def _step_log(path):
    """A Ray Train callback (it runs in Train's controller) appending each report's step to ``path``."""
    from ray.train import UserCallback

    class StepLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(f"{metrics[0]['step']}\n")

    return StepLog()


@pytest.mark.usefixtures("local_ray")
def test_two_gloo_workers_reach_the_one_worker_parameters_and_a_run_again_continues(tmp_path):
    """A data-parallel trial (TorchTrainer, 2 gloo workers) ends where one process does; then what
    resumes it after the driver dies: the Tune trial starts the same Ray Train run (name and
    storage) again, and its workers get the run's latest checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = dict(
        model="glow",
        dataset="digits",
        hparams=dict(depth=2, levels=2, hidden_channels=8),
        seed=3,
        batch_size=32,
        budget=6,
        evaluations=2,
    )
    single = run_trial(TrialConfig(**config, out_dir=str(tmp_path / "single")))

    def fit(attempt: str):
        return TorchTrainer(
            ddp_worker,
            train_loop_config={"trial": config},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name="ddp",
                storage_path=str(tmp_path / "train"),
                callbacks=[_step_log(str(tmp_path / f"{attempt}.log"))],
            ),
        ).fit()

    result = fit("first")
    assert result.metrics["workers"] == 2 and result.metrics["status"] == "ok" and result.metrics["steps"] == 6
    assert result.metrics["test_bpd"] == pytest.approx(single.test_bpd, rel=1e-5)
    assert result.metrics["images_seen"] == single.images_seen
    parallel = load_checkpoint(result.checkpoint.path)["model"]
    alone = load_checkpoint(tmp_path / "single" / "checkpoint")["model"]
    assert parallel.keys() == alone.keys()
    for key in alone:
        torch.testing.assert_close(parallel[key], alone[key], rtol=1e-4, atol=1e-5)

    again = fit("again")
    assert (tmp_path / "first.log").read_text().split() == ["3", "6", "6"]  # two evaluations, the record
    assert (tmp_path / "again.log").read_text().split() == ["6"]  # at its budget already: the record only
    assert again.metrics["status"] == "ok" and again.metrics["test_bpd"] == result.metrics["test_bpd"]
