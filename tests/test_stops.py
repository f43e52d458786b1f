"""Sweeps and trials stopped by a person (Ctrl-C: SIGINT to the foreground process group) or a
scheduler (SIGTERM to the flowbench process: `kill`, SLURM's --signal, Kubernetes) at different
moments. Every stop ends with the signal's exit status (130, 143) and one line; running the same
command again ends with every trial ok and every figure equal, to the last digit, to an
uninterrupted run's. Each moment is watched for from outside (a file appearing), never signalled
by the code under test."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flowbench.cli.progress import PROGRESS_LINE
from flowbench.results.tables import read_table
from flowbench.sweep.experiment import stored_results
from flowbench.trial import load_checkpoint
from tests.sweep.test_runner import child_runs, spec_file

pytestmark = pytest.mark.slow

PROGRESS = re.compile(rf"{PROGRESS_LINE.pattern}|^\S.*: +\d+%\|")  # the sweep's progress lines, train's tqdm bar
# evaluations and checkpoints every 10 steps (spec_file); a trial takes some 40 steps to hear of a
# stop on a loaded 2-core machine, and must not finish in the two runs stopped while it trains
STEPS = 200


def stop_when(cmd: list[str], moment, signum: int, log: Path, env: dict, timeout: float = 300) -> list[str]:
    """Run ``cmd``; once ``moment()`` is true, send ``signum`` as a person or a scheduler would
    (SIGINT to the process group, SIGTERM to the process); returns its stderr lines less progress."""
    with log.open("w") as err:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, env=env)
        try:
            deadline = time.time() + timeout
            while not moment():
                assert process.poll() is None, f"ended before the moment came:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, f"the moment did not come within {timeout} s"
                time.sleep(0.05)
            if signum == signal.SIGINT:
                os.killpg(process.pid, signum)
            else:
                os.kill(process.pid, signum)
            rc = process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text()
    assert rc == 128 + signum, text[-3000:]
    assert "Traceback" not in text and "*** SIG" not in text, text[-3000:]  # nor Ray's native crash dump
    return [line for line in text.splitlines() if line.strip() and not PROGRESS.match(line)]


def appeared(pattern):
    """A moment: a path matching ``pattern`` that was not there when this was called."""
    before = set(pattern())
    return lambda: bool(set(pattern()) - before)


def latency_timing(ray_tmp: Path):
    """A moment: the latency phase's timing process running under the Ray whose sessions live in
    ``ray_tmp`` (its environment names that folder; the uninterrupted run beside it has its own)."""
    wanted = f"RAY_TMPDIR={ray_tmp}".encode()

    def timing() -> bool:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if b"flowbench.trial.latency" in (proc / "cmdline").read_bytes():
                    if wanted in (proc / "environ").read_bytes().split(b"\0"):
                        return True
            except OSError:  # ended meanwhile, or not ours to read
                continue
        return False

    return timing


def rewritten(path: Path):
    """A moment: ``path`` written anew."""
    before = path.stat().st_mtime_ns if path.exists() else None
    return lambda: path.exists() and path.stat().st_mtime_ns != before


def test_a_sweep_stopped_at_six_moments_resumes_exactly(tmp_path):
    """One results folder stopped six times in a row, each run getting further: SIGINT and SIGTERM
    while Ray starts and while the trials train; SIGINT in the latency phase (the run that finishes
    the trials); SIGTERM while the tables are written (the run that trains nothing). Its trials
    equal those of an uninterrupted run of the same spec, which runs meanwhile beside the others."""
    spec = spec_file(tmp_path, "stops", steps=STEPS)
    # short: Ray's socket paths must fit 107 bytes; one each: the moment Ray starts is a session folder appearing
    ray_tmp, plain_tmp = (Path(tempfile.mkdtemp(prefix="fbray-", dir="/tmp")) for _ in range(2))
    results, baseline = tmp_path / "results", tmp_path / "baseline"
    out = results / "stops"

    def sweep(root: Path) -> list[str]:
        return [sys.executable, "-m", "flowbench.cli", "sweep", str(spec), "--results", str(root), "--num-cpus", "2"]

    env = os.environ | {"RAY_TMPDIR": str(ray_tmp)}
    plain = subprocess.Popen(
        sweep(baseline),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env | {"RAY_TMPDIR": str(plain_tmp)},
    )
    resume = f"; run `flowbench sweep {spec} --results {results} --num-cpus 2` to resume"
    again = re.escape(resume)
    ray_starting = lambda: appeared(lambda: (ray_tmp / "ray").glob("session_2*"))  # noqa: E731
    training = lambda: appeared(lambda: out.glob("tune/*/*/checkpoint_*"))  # noqa: E731
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            name = signal.Signals(signum).name
            said = stop_when(sweep(results), ray_starting(), signum, tmp_path / f"start-{name}.err", env)
            assert len(said) == 1 and re.fullmatch(
                rf"flowbench: interrupted by {name} while Ray was starting: 2 of 2 trials unfinished{again}", said[0]
            ), said
        assert not (out / "tune").exists()  # nothing ran

        steps_before: dict[str, int] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            name = signal.Signals(signum).name
            said = stop_when(sweep(results), training(), signum, tmp_path / f"training-{name}.err", env)
            assert len(said) == 1 and re.fullmatch(
                rf"flowbench: interrupted by {name} while trials ran: 2 of 2 trials unfinished, 2 running ones "
                rf"checkpointed at the step they had reached; the tables and report hold the finished ones and say "
                rf"the sweep is incomplete{again}",
                said[0],
            ), said
            # each trial paused on the checkpoint of the step it had reached, registered in Tune's saved
            # state: the next run resumes it from there
            (experiment,) = (out / "tune").iterdir()
            steps = {}
            for result in stored_results(str(out / "tune"), experiment.name):
                last = result.metrics
                assert last["interrupted"] and last["step"] >= steps_before.get(result.path, 0), last
                if result.checkpoint is None:  # stopped before its first step (its actor started late)
                    assert last["step"] == 0, last
                else:
                    assert load_checkpoint(Path(result.checkpoint.path))["progress"]["step"] == last["step"]
                steps[result.path] = last["step"]
            assert sum(steps.values()) > sum(steps_before.values())  # each run gets further
            steps_before = steps
            assert "**Incomplete**" in (out / "report.md").read_text()
            assert read_table(out / "trials.parquet", "trials").empty  # unfinished trials are in no table
            assert json.loads((out / "sweep.json").read_text())["unfinished"] == [
                "glow-digits-seed0",
                "nxn_shift-digits-seed0",
            ]

        # SIGINT once the trials have finished and the latency phase times them: the tables are written
        # without latency, and the next run times it without training
        said = stop_when(sweep(results), latency_timing(ray_tmp), signal.SIGINT, tmp_path / "latency.err", env)
        assert said == [
            "flowbench: interrupted by SIGINT before the latency phase had timed every trial: every trial is "
            f"recorded; the next run times what the latency table lacks, without training{resume}"
        ], said
        assert not (out / "latency.parquet").exists() and "No latency table" in (out / "report.md").read_text()
        finished = read_table(out / "trials.parquet", "trials").set_index("trial_id").finished_at

        # SIGTERM while the tables are written: the run trains nothing, times the latency, writes the tables
        moment = rewritten(out / "trials.parquet")
        said = stop_when(sweep(results), moment, signal.SIGTERM, tmp_path / "tables-SIGTERM.err", env)
        assert said == [
            "flowbench: interrupted by SIGTERM while the tables were written: every trial had finished, and "
            "the tables and report are complete"
        ]
        assert "Incomplete" not in (out / "report.md").read_text()  # written whole, after the signal
        assert read_table(out / "trials.parquet", "trials").set_index("trial_id").finished_at.equals(finished)
        latency = read_table(out / "latency.parquet", "latency")
        assert sorted(set(latency.trial_id)) == sorted(finished.index) and len(latency) == 2 * 2 * 2
        _, err = plain.communicate(timeout=600)
        assert plain.returncode == 0, err[-3000:]
    finally:
        if plain.poll() is None:
            plain.kill()
            plain.wait()
        for folder in (ray_tmp, plain_tmp):
            shutil.rmtree(folder, ignore_errors=True)

    stopped = read_table(out / "trials.parquet", "trials").set_index("trial_id").sort_index()
    reference = read_table(baseline / "stops" / "trials.parquet", "trials").set_index("trial_id").sort_index()
    assert (stopped.status == "ok").all() and (stopped.steps == STEPS).all()
    figures = ["val_bpd", "test_bpd", "train_bpd", "selected_step", "train_flops", "images_seen"]
    assert stopped[figures].equals(reference[figures])  # to the last digit
    curve = ["trial_id", "step", "val_bpd", "train_bpd", "lr"]
    assert read_table(out / "curves.parquet", "curves")[curve].equals(
        read_table(baseline / "stops" / "curves.parquet", "curves")[curve]
    )
    client, _, children = child_runs(f"sqlite:///{out / 'mlflow.db'}", "stops")
    assert sorted(c.info.run_name for c in children) == list(stopped.index)
    for child in children:  # every evaluation logged once; no stop logged as one
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_bpd")]
        assert steps == list(range(10, STEPS + 1, 10)), (child.info.run_name, steps)


TRAIN = [
    "train",
    "--model",
    "glow",
    "--dataset",
    "digits",
    "--budget-steps",
    "60",
    "--batch-size",
    "32",
    "--evaluations",
    "3",  # a checkpoint at steps 20, 40 and 60
    *("--hparam", "depth=2", "--hparam", "levels=2", "--hparam", "hidden_channels=8"),
]


def test_train_stopped_by_sigterm_and_sigint_checkpoints_its_step_and_resumes_exactly(tmp_path):
    """`flowbench train` stopped twice, by a scheduler then by Ctrl-C, each time as soon as a
    checkpoint appears: it checkpoints the step it is at (between two checkpoints, the loss of the
    evaluation interval so far included), says so in one line, and the same command resumes it to
    the record of a run never stopped, which runs meanwhile beside the others."""
    out, plain = tmp_path / "stopped", tmp_path / "plain"
    command = [sys.executable, "-m", "flowbench.cli", *TRAIN, "--out", str(out)]
    reference_run = subprocess.Popen([*command[:-1], str(plain)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        again = f"; run `flowbench {' '.join(TRAIN)} --out {out}` to resume"
        checkpoint = out / "checkpoint" / "checkpoint.pt"
        at = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            name = signal.Signals(signum).name
            said = stop_when(command, rewritten(checkpoint), signum, tmp_path / f"{name}.err", dict(os.environ))
            saved = load_checkpoint(checkpoint)["progress"]["step"]
            resuming = [f"resuming from {checkpoint}"] if at else []  # the second run says so first
            assert said == [
                *resuming,
                f"flowbench: interrupted by {name} at step {saved}, checkpointed in {checkpoint.parent}{again}",
            ]
            assert at < saved < 60 and not (out / "record.json").exists()
            at = saved
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        _, err = reference_run.communicate(timeout=300)
        assert reference_run.returncode == 0, err[-2000:]
    finally:
        if reference_run.poll() is None:
            reference_run.kill()
            reference_run.wait()

    stopped, reference = (json.loads((f / "record.json").read_text()) for f in (out, plain))
    for key in ("status", "steps", "val_bpd", "test_bpd", "train_bpd", "selected_step", "train_flops"):
        assert stopped[key] == reference[key], key
    assert stopped["config_hash"] == reference["config_hash"]
