"""Services a sweep leans on that go away while it runs: a real `mlflow server` (the records are
the truth, MLflow a view of them: one warning, the sweep goes on, the next run logs the rest) and
Tune's S3 storage (a moto server: one line, and a run once it is back finishes the sweep)."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flowbench.cli.progress import PROGRESS_LINE
from flowbench.results.tables import read_table
from tests.sweep.test_runner import child_runs, free_port, spec_file

pytestmark = pytest.mark.slow
STEPS = 60  # evaluations and checkpoints every 10 steps (spec_file)
PROGRESS = PROGRESS_LINE


def sweep_command(spec: Path, results: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "flowbench.cli", "sweep", str(spec), "--results", str(results), *options]


def wait_for(ready, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout  # generous: a loaded CI runner is slow to start servers
    while not ready():
        assert time.time() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback over an sqlite store in ``folder``, once it answers /health."""
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *(
                "--backend-store-uri",
                f"sqlite:///{folder / 'server.db'}",
                "--artifacts-destination",
                str(folder / "art"),
            ),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # no job runner: a sweep uses the tracking API only, and the runner's seven job consumers keep
        # half a core busy while idle (MLflow 3.17)
        env=os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )

    def healthy() -> bool:
        assert server.poll() is None, "mlflow server ended"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
        except OSError:
            return False

    wait_for(healthy, "mlflow server answering /health")
    return server


def stop(process: subprocess.Popen) -> None:
    """End a server and its children (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)


def test_a_tracking_server_lost_mid_sweep_costs_one_warning_and_the_next_run_logs_the_rest(tmp_path):
    """The server is killed once the trials have checkpointed: the sweep warns once, trains on,
    writes its tables and exits 0; with the server back, the next run trains nothing and logs every
    trial's curve, record and samples, and the sweep's files, once."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    spec = spec_file(tmp_path, "served", models=("glow",), seeds=(0, 1), steps=STEPS)
    results = tmp_path / "results"
    command = sweep_command(spec, results, "--mlflow-uri", uri, "--num-cpus", "2")
    server = start_mlflow_server(tmp_path, port)
    try:
        with (tmp_path / "first.err").open("w") as err:
            driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
            try:
                wait_for(lambda: list(results.glob("served/tune/*/*/checkpoint_*")), "a first checkpoint", 300)
                stop(server)  # the next evaluations find nobody there
                stdout, _ = driver.communicate(timeout=600)
            finally:
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
                    driver.wait()
        text = (tmp_path / "first.err").read_text()
        assert driver.returncode == 0, text[-3000:]
        said = [line for line in text.splitlines() if line.strip() and not PROGRESS.match(line)]
        assert len(said) == 1 and "Traceback" not in text, text[-3000:]
        assert re.fullmatch(
            rf"WARNING flowbench\.sweep\.tracking: MLflow tracking store {re.escape(uri)}: unreachable "
            r"\(connection refused\) while logging glow-digits-seed\d's (evaluation at step \d+|record); nothing more "
            r"is logged there in this run, which goes on \(trials\.parquet and records/ hold every record\): run "
            r"the same flowbench sweep again to log what is missing",
            said[0],
        ), said[0]
        assert f"mlflow   {uri} (experiment served): incomplete" in stdout
        trials = read_table(results / "served" / "trials.parquet", "trials")
        assert sorted(trials.trial_id) == ["glow-digits-seed0", "glow-digits-seed1"]
        assert (trials.status == "ok").all() and (trials.steps == STEPS).all()

        server = start_mlflow_server(tmp_path, port)  # the same store, back
        again = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "MLflow" not in again.stderr, again.stderr[-3000:]
        assert "ran      nothing" in again.stdout and "incomplete" not in again.stdout
        # nothing left to train: no Ray started (the first run's is the one in the log)
        assert (results / "served" / "sweep.log").read_text().count("Started a local Ray instance") == 1
        client, parents, children = child_runs(uri, "served")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert {"report.md", "trials.parquet"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
        assert sorted(c.info.run_name for c in children) == sorted(trials.trial_id)  # one run each
        by_id = trials.set_index("trial_id")
        for child in children:
            assert child.info.status == "FINISHED"
            assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")]
            assert steps == list(range(10, STEPS + 1, 10)), (child.info.run_name, steps)  # each once
            assert child.data.metrics["final_test_bpd"] == by_id.test_bpd[child.info.run_name]
            assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["samples.png"]
    finally:
        stop(server)


BUCKET = "flowbench"


def start_moto(port: int) -> subprocess.Popen:
    """moto's S3 API on loopback, with the bucket made."""
    from pyarrow import fs

    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    s3 = fs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    )

    def made() -> bool:
        try:
            s3.create_dir(BUCKET)
            return True
        except OSError:
            return False

    wait_for(made, "moto_server answering")
    return server


def test_tune_storage_lost_mid_sweep_is_one_line_and_a_run_once_it_is_back_finishes(tmp_path, monkeypatch):
    """moto's S3 server, Tune's storage, killed once a trial has checkpointed there: the sweep ends
    with one line (no traceback). moto keeps nothing when it stops, so the server that comes back is
    empty: the next run starts the unfinished trials over and ends with every trial ok."""
    from pyarrow import fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    port = free_port()
    storage = f"s3://{BUCKET}/tune?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    spec = spec_file(tmp_path, "stored", models=("glow",), seeds=(0,), steps=STEPS)
    results = tmp_path / "results"
    command = sweep_command(spec, results, "--storage", storage, "--num-cpus", "2")
    moto = start_moto(port)
    s3, root = fs.FileSystem.from_uri(storage)

    def checkpointed() -> bool:
        found = s3.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
        return any("/checkpoint_" in f.path for f in found)

    try:
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(checkpointed, "a checkpoint in S3", 300)
            stop(moto)
            _, err = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        said = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
        assert driver.returncode == 2 and len(said) == 1 and "Traceback" not in err, err[-3000:]
        assert said[0].startswith(
            f"flowbench: error: --storage {storage} stopped answering while the sweep ran (unreachable ("
        ), said[0]
        assert said[0].endswith("once it answers, run the same command to resume"), said[0]

        moto = start_moto(port)
        again = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        trials = read_table(results / "stored" / "trials.parquet", "trials")
        assert trials.trial_id.tolist() == ["glow-digits-seed0"]
        assert (trials.status == "ok").all() and (trials.steps == STEPS).all()
    finally:
        stop(moto)
