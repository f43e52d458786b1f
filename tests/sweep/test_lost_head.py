"""A head that is lost with its disk: a sweep with Tune's storage in S3 (moto's server) loses its driver, its Ray
and its trials at once (SIGKILL) once Tune's saved state names a checkpoint of a trial still training, and its
results folder is deleted; the same command on the empty folder finishes the sweep from storage. Against an
uninterrupted run of the same sweep: the same trials and bits/dim, that trial resumed from its checkpoints in S3,
and an MLflow store rebuilt with one parent run and one child run a trial."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pyarrow import fs

from flowbench.results.tables import read_table
from flowbench.sweep.experiment import stored_results
from tests.data.test_remote import s3_uri  # noqa: F401 -- the moto server fixture
from tests.sweep.test_lost_services import sweep_command, wait_for
from tests.sweep.test_runner import child_runs, spec_file

pytestmark = pytest.mark.slow
STEPS = 60  # an evaluation and a checkpoint every 10 steps (spec_file)
TRIALS = ["glow-digits-seed0", "glow-digits-seed1"]


def stored_files(s3: fs.FileSystem, root: str) -> dict[str, list[str]]:
    """The files of each trial in Tune's storage, as experiment/trial/... paths under ``root``."""
    found: dict[str, list[str]] = {}
    for info in s3.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True)):
        path = info.path[len(root) + 1 :]
        parts = path.split("/")
        if info.type == fs.FileType.File and len(parts) > 2 and parts[1] in TRIALS:
            found.setdefault(parts[1], []).append(path)
    return found


def records(files: list[str]) -> list[str]:
    """A trial's records among its stored files: its last checkpoint holds one."""
    return [f for f in files if f.split("/")[2].startswith("checkpoint_") and f.endswith("/record.json")]


def saved_states(s3: fs.FileSystem, root: str) -> set[tuple[str, int, int]]:
    """Tune's saved experiment states in storage, each with when it was last written and its size."""
    found = s3.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {(f.path, f.mtime_ns or 0, f.size or 0) for f in found if f.base_name.startswith("experiment_state-")}


def named_while_training(storage: str, root: str, files: dict[str, list[str]]) -> list[str]:
    """The trials, unfinished in storage, whose checkpoint Tune's saved state names: a restore resumes them."""
    named = []
    for experiment in {path.split("/")[0] for paths in files.values() for path in paths}:
        try:
            results = stored_results(storage, experiment) or []
        except RuntimeError:  # no state saved yet ("experiment has not been run")
            continue
        for result in results:
            trial = result.path.rsplit("/", 1)[1]
            if result.checkpoint is not None and not records(files.get(trial, [])):
                named.append(trial)
    return sorted(named)


def session(sid: int) -> list[int]:
    """The live processes of a session (zombies are dead). A session, not a process group: Ray's workers
    lead process groups of their own."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:  # ended while read
            continue
        state, _, _, session_id = rest.rsplit(") ", 1)[1].split()[:4]
        if int(session_id) == sid and state != "Z":
            found.append(int(pid))
    return found


def lose(driver: subprocess.Popen) -> None:
    """The head lost: SIGKILL to every process of the driver's session (its Ray's, its trials'), once none
    is left to start more."""
    with contextlib.suppress(ProcessLookupError):  # the driver, Ray's GCS and raylet: nothing starts after
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    def gone() -> bool:
        for pid in session(driver.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not session(driver.pid)

    wait_for(gone, "every process of the lost head ended", 60)


def attempts(s3: fs.FileSystem, root: str, trial: str) -> list[tuple[str, float]]:
    """How each attempt at a trial started, and when, from its last checkpoint in storage."""
    (record,) = records(stored_files(s3, root)[trial])
    with s3.open_input_stream(f"{root}/{record.rsplit('/', 1)[0]}/attempts.jsonl") as f:
        return [(a["how"], a["at"]) for a in map(json.loads, f.read().decode().splitlines())]


def test_a_head_lost_with_its_disk_resumes_from_storage_on_an_empty_folder(tmp_path, s3_uri):  # noqa: F811
    s3, uri = s3_uri
    # no retries: a trial whose saved state names a checkpoint deleted since fails at once, then resumes from the
    # newest whole checkpoint it left in storage (the driver's second experiment)
    spec = spec_file(tmp_path, "lost-head", models=("glow",), seeds=(0, 1), steps=STEPS, extra="max_failures: 0\n")
    ray_tmp = tempfile.mkdtemp(prefix="fbhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = os.environ | {"RAY_TMPDIR": ray_tmp}

    def sweep(results: Path, key: str) -> list[str]:
        return sweep_command(spec, results, "--storage", uri(key), "--num-cpus", "2")

    def run(command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    try:
        uninterrupted = tmp_path / "uninterrupted"
        run(sweep(uninterrupted, "uninterrupted"))

        results, storage = tmp_path / "results", uri("lost")
        root = fs.FileSystem.from_uri(storage)[1]
        with (tmp_path / "lost.err").open("w") as err:
            driver = subprocess.Popen(
                sweep(results, "lost"), stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
            )
        try:
            deadline = time.time() + 300
            seen: set[tuple[str, int, int]] = set()
            named: list[str] = []
            while not named:
                said = (tmp_path / "lost.err").read_text()[-3000:]
                assert driver.poll() is None, f"the sweep ended before a running trial's checkpoint was saved\n{said}"
                assert time.time() < deadline, f"no running trial's checkpoint saved within 300 s\n{said}"
                if (states := saved_states(s3, root)) != seen:  # Tune saves its state after each checkpoint
                    seen, named = states, named_while_training(storage, root, stored_files(s3, root))
                time.sleep(0.5)
        finally:
            lose(driver)
            killed_at = time.time()
        shutil.rmtree(results)  # its disk
        unfinished = [t for t, files in stored_files(s3, root).items() if not records(files)]
        assert set(named) <= set(unfinished)

        run(sweep(results, "lost"))  # the same command, on the empty folder
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # the same trials to the same bits, evaluation by evaluation
    trials = read_table(results / "lost-head" / "trials.parquet", "trials").set_index("trial_id")
    expected = read_table(uninterrupted / "lost-head" / "trials.parquet", "trials").set_index("trial_id")
    assert sorted(trials.index) == sorted(expected.index) == TRIALS
    assert (trials.status == "ok").all() and (trials.steps == STEPS).all()
    assert trials.test_bpd.to_dict() == expected.test_bpd.to_dict()
    curves, expected_curves = (
        read_table(folder / "lost-head" / "curves.parquet", "curves").set_index(["trial_id", "step"]).val_bpd.to_dict()
        for folder in (results, uninterrupted)
    )
    assert curves == expected_curves

    # each trial unfinished at the kill whose checkpoint Tune's saved state named went on from the lost head's
    # checkpoints in storage: its last checkpoint carries the lost head's attempt, then this run's. (A trial that
    # state shows with no checkpoint yet starts again from step 0, its checkpoints in storage unread: not asserted)
    for name in named:
        tried = attempts(s3, root, name)
        assert [how for how, _ in tried] == ["fresh", "resumed"], (name, tried)
        assert tried[0][1] < killed_at < tried[1][1], (name, tried, killed_at)

    # the store rebuilt from storage: one run for the sweep, one for each trial under it, every evaluation once
    client, parents, children = child_runs(f"sqlite:///{results / 'lost-head' / 'mlflow.db'}", "lost-head")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == TRIALS
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")]
        assert sorted(steps) == list(range(10, STEPS + 1, 10)), (child.info.run_name, steps)
        assert child.data.metrics["final_test_bpd"] == trials.test_bpd[child.info.run_name]
