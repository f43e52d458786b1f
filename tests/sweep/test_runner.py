"""Real Ray Tune sweeps on a local Ray (loopback only), tiny budgets, end to end."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flowbench.results.tables import read_table
from flowbench.sweep.driver import run_sweep, start_ray

pytestmark = pytest.mark.slow

TINY = "{depth: 2, levels: 2, hidden_channels: 8}"


def spec_file(tmp_path, name, models=("glow", "nxn_shift"), seeds=(0,), steps=20, extra=""):
    overrides = "\n".join(f"  {m}: {TINY}" for m in models)
    text = f"""\
name: {name}
models: [{', '.join(models)}]
datasets: [digits]
seeds: [{', '.join(map(str, seeds))}]
budget: {{steps: {steps}}}
train: {{batch_size: 32, eval_every: 10, checkpoint_every: 10}}
overrides:
{overrides}
latency: {{batch_size: 8, repeats: 2}}
""" + textwrap.dedent(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def local_ray():
    import ray

    start_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def child_runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def attempts(trial_dir: Path, with_time: bool = False) -> list:
    path = trial_dir / "attempts.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(a["how"], a["at"]) if with_time else a["how"] for a in lines]


def test_sweep_end_to_end_and_rerun_runs_nothing_again(tmp_path, local_ray):
    spec = spec_file(tmp_path, "e2e", seeds=(0, 1))
    outcome = run_sweep(spec, tmp_path / "results")
    out = tmp_path / "results" / "e2e"
    trials = read_table(out / "trials.parquet", "trials")
    assert sorted(trials.trial_id) == ["glow-digits-seed0", "glow-digits-seed1", "nxn_shift-digits-seed0",
                                       "nxn_shift-digits-seed1"]
    assert (trials.status == "ok").all() and (trials.steps == 20).all()
    assert trials.test_bpd.between(0, 16).all() and (trials.num_params > 0).all()
    assert (trials.density_latency_ms > 0).all() and (trials.sample_latency_ms > 0).all()
    curves = read_table(out / "curves.parquet", "curves")
    assert sorted(curves.groupby("trial_id").step.apply(list).iloc[0]) == [10, 20]

    client, parents, children = child_runs(outcome.mlflow_uri, "e2e")
    assert [p.info.run_name for p in parents] == ["sweep:e2e"] and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    child = children[0]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "test_bpd")] == [10, 20]
    assert child.data.metrics["final_test_bpd"] == pytest.approx(
        trials.set_index("trial_id").test_bpd[child.info.run_name])
    assert "samples.png" in [a.path for a in client.list_artifacts(child.info.run_id)]

    # the report from MLflow alone: the same Table 2 as from the Parquet tables
    from flowbench.results.from_mlflow import tables_from_mlflow
    from flowbench.results.report import build_report

    mlflow_trials, mlflow_curves = tables_from_mlflow(outcome.mlflow_uri, "e2e")
    build_report(tmp_path / "from-mlflow", mlflow_trials, mlflow_curves)
    pd.testing.assert_frame_equal(read_table(tmp_path / "from-mlflow" / "table2.parquet", "table2"),
                                  read_table(out / "table2.parquet", "table2"))
    assert sorted(mlflow_curves.step.tolist()) == sorted(curves.step.tolist())

    # the same command again: Tune restores the finished experiment, no trial runs again
    before = {d.name: attempts(d) for d in (out / "tune" / "grid").iterdir() if d.is_dir()}
    run_sweep(spec, tmp_path / "results")
    after = {d.name: attempts(d) for d in (out / "tune" / "grid").iterdir() if d.is_dir()}
    assert after == before and all(v == ["fresh"] for v in after.values())
    assert len(child_runs(outcome.mlflow_uri, "e2e")[2]) == 4


def test_diverging_trial_is_recorded_while_the_sweep_goes_on(tmp_path, local_ray):
    spec = spec_file(tmp_path, "div", extra="""\
        max_failures: 0
        """)
    text = spec.read_text().replace(f"glow: {TINY}", "glow: {depth: 2, levels: 2, hidden_channels: 8, lr: 1.0e4, grad_clip: null}")
    spec.write_text(text)
    outcome = run_sweep(spec, tmp_path / "results")
    status = dict(zip(outcome.trials.model, outcome.trials.status))
    assert status == {"glow": "diverged", "nxn_shift": "ok"}
    reason = outcome.trials.set_index("model").reason["glow"]
    assert "loss became nan or inf at step" in reason


def test_optuna_search_with_asha_then_best_on_every_seed(tmp_path, local_ray):
    spec = spec_file(tmp_path, "search", models=("glow",), seeds=(0, 1), steps=30, extra="""\
        search:
          num_samples: 4
          space: {lr: {loguniform: [1.0e-4, 3.0e-2]}}
          asha: {grace_period: 10, reduction_factor: 2}
        """)
    outcome = run_sweep(spec, tmp_path / "results")
    t = outcome.trials
    search, final = t[t.phase == "search"], t[t.phase == "final"]
    assert len(search) == 4 and len(set(search.lr)) == 4  # Optuna sampled four learning rates
    assert set(search.status) <= {"ok", "stopped"}
    stopped = search[search.status == "stopped"]
    assert (stopped.steps < 30).all()
    best_lr = search.loc[search.test_bpd.idxmin(), "lr"] if (search.status == "ok").all() else None
    assert sorted(final.trial_id) == ["glow-digits-seed0", "glow-digits-seed1"]
    assert final.lr.nunique() == 1 and (final.status == "ok").all()
    if best_lr is not None:
        assert final.lr.iloc[0] == pytest.approx(best_lr)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_logs_to_a_real_mlflow_server(tmp_path, local_ray):
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 60 s")
        spec = spec_file(tmp_path, "served", models=("glow",), seeds=(0, 1))
        run_sweep(spec, tmp_path / "results", mlflow_uri=uri)
        client, parents, children = child_runs(uri, "served")
        assert len(parents) == 1 and sorted(c.info.run_name for c in children) == ["glow-digits-seed0", "glow-digits-seed1"]
        assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
        assert "samples.png" in [a.path for a in client.list_artifacts(children[0].info.run_id)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_resume_after_the_driver_is_killed(tmp_path):
    """Kill the whole driver (and its local Ray) once one trial has finished; run again."""
    spec = spec_file(tmp_path, "killed", seeds=(0, 1), steps=60)
    results = tmp_path / "results"
    grid = results / "killed" / "tune" / "grid"
    cmd = [sys.executable, "-m", "flowbench.cli", "sweep", str(spec), "--results", str(results), "--num-cpus", "2"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(grid.glob("*/final/record.json")):
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    killed_at = time.time()
    driver.wait()
    finished = {p.parts[-3] for p in grid.glob("*/final/record.json")}
    checkpointed = {p.parent.name for p in grid.glob("*/checkpoint_*")} - finished
    assert finished, "no trial finished before the deadline"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trials = read_table(results / "killed" / "trials.parquet", "trials")
    assert len(trials) == 4 and (trials.status == "ok").all() and (trials.steps == 60).all()
    for trial in finished:  # finished before the kill: never trained again (at most its record re-reported)
        trained_after_kill = [how for how, at in attempts(grid / trial, True) if how != "finished already" and at > killed_at]
        assert not trained_after_kill, trial
    for trial in checkpointed:  # interrupted after a checkpoint: continued from it
        assert attempts(grid / trial)[-1] == "resumed", trial
    client, _, children = child_runs(f"sqlite:///{results / 'killed' / 'mlflow.db'}", "killed")
    assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)  # no duplicate runs
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_bpd")]
        assert steps == [10, 20, 30, 40, 50, 60], (child.info.run_name, steps)
