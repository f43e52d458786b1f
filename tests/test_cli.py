"""The command line: train (and re-run to resume), sample, models, and one-line errors."""

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import flowbench
from flowbench.cli import build_parser, main
from flowbench.results.tables import read_table

TINY = ["--hparam", "depth=2", "--hparam", "levels=2", "--hparam", "hidden_channels=8"]


def test_train_writes_its_outputs_and_a_rerun_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "glow",
        "--dataset",
        "digits",
        "--budget-steps",
        "6",
        "--evaluations",
        "2",
        "--batch-size",
        "16",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["steps"] == 6 and record["status"] == "ok" and json.loads(record["hparams"])["depth"] == 2
    assert read_table(out / "record.parquet", "trials").test_bpd.iloc[0] == record["test_bpd"]
    assert read_table(out / "curve.parquet", "curves").step.tolist() == [3, 6]
    assert "test bits/dim" in capsys.readouterr().out
    assert main(argv) == 0  # the same command again: resumes from the finished checkpoint
    assert "resuming from" in capsys.readouterr().err
    assert json.loads((out / "record.json").read_text())["test_bpd"] == record["test_bpd"]

    grid = tmp_path / "grid.png"
    assert main(["sample", str(out / "checkpoint"), "--n", "9", "--scale", "1", "--out", str(grid)]) == 0
    picture = np.asarray(Image.open(grid))
    assert picture.shape == (3 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)


def test_a_run_folder_of_another_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--model", "glow", "--dataset", "digits", "--budget-steps", "3", "--out", out, *TINY]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--lr", "0.01"]) == 2
    assert "holds a trial of another configuration" in capsys.readouterr().err


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        (["train", "--model", "glwo"], "unknown model 'glwo': did you mean 'glow'"),
        (["train", "--model", "glow", "--budget-steps", "5", "--budget-seconds", "3"], "give one budget"),
        (["train", "--model", "glow", "--dataset", "cifar10", "--data-root", str(tmp_path)], "data set not found"),
        (["sample", str(tmp_path / "nothing.pt")], "no checkpoint there"),
        (["report"], "give a results folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("flowbench: error: ") and message in err and len(err.splitlines()) == 1, err


def test_models_lists_the_registry_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert rows["glow"][0] == "44.05M" and "3.35" in rows["glow"]
    assert set(rows) >= set(flowbench.list_models())  # every registered model has its row


def test_the_progress_bar_moves_every_step_and_never_shows_a_rate_above_the_steps_own(tmp_path, monkeypatch):
    """tqdm's own state at every update: the bar counts each step (it used to move only at the
    evaluations, jumping 0 -> 50 and showing ~250,000 steps/s), and the rate it shows, (n - initial) /
    elapsed, is at most the rate of the training steps it counts, timed here around each step."""
    import time

    import tqdm

    import flowbench.trial.loop

    step_seconds: list[float] = []
    real_step = flowbench.trial.loop.train_step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        loss = real_step(*args, **kwargs)
        step_seconds.append(time.perf_counter() - start)
        return loss

    frames = []

    class Watched(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs | {"disable": False})  # drawn as on a terminal

        def update(self, n=1):
            shown = super().update(n)
            frame = self.format_dict
            frames.append((frame["n"], frame["n"] - frame["initial"], frame["elapsed"], len(step_seconds)))
            return shown

    monkeypatch.setattr(flowbench.trial.loop, "train_step", timed_step)
    monkeypatch.setattr(tqdm, "tqdm", Watched)
    argv = ["train", "--model", "glow", "--dataset", "digits", "--budget-steps", "30", "--evaluations", "2"]
    assert main([*argv, "--batch-size", "16", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert [n for n, *_ in frames] == list(range(2, 31))  # created at step 1, then every step
    for _, counted, elapsed, steps in frames:
        own = sum(step_seconds[1:steps])  # the steps inside the bar's average (after its first)
        assert counted / elapsed <= counted / own


def test_sweep_folders_expand_the_home_of_the_machine_the_driver_runs_on(tmp_path, monkeypatch):
    # `ray job submit -- flowbench sweep … --results '~/results'` passes ~ to the head, where it means the head's home
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["sweep", "smoke", "--results", "~/results", "--storage", "~/tune"])
    assert (args.results, args.storage) == (str(tmp_path / "results"), str(tmp_path / "tune"))
    assert build_parser().parse_args(["sweep", "smoke", "--storage", "s3://bucket/tune"]).storage == "s3://bucket/tune"


def test_output_its_reader_stops_reading_ends_quietly(tmp_path):
    # `flowbench … | head`: the reader is gone before the plan is printed (`true` reads nothing)
    command = f"{shlex.quote(sys.executable)} -m flowbench.cli sweep sweeps/ablations.yaml --dry-run | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")


def test_version_names_the_release_the_commit_and_torchs_build(capsys):
    import torch

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    out = capsys.readouterr().out.strip()
    assert exit_info.value.code == 0 and out.startswith("flowbench 0.1.0 (commit ")
    assert f"torch {torch.__version__}" in out and ("CPU only" in out or "CUDA" in out)


def test_a_sweep_in_a_log_says_where_it_stands_once_a_trial_ends(tmp_path, capsys):
    """Not on a terminal (a log, SLURM's output): no bar frames, one line per finished trial with the
    trials done, the budget spent and the time left; a trial ended early takes its unspent budget off."""
    from flowbench.cli.progress import SweepProgress, planned_trials
    from flowbench.sweep.plan import plan_sweep

    spec = tmp_path / "logged.yaml"
    spec.write_text(
        "name: logged\nmodels: [glow]\ndatasets: [digits]\nseeds: [0, 1, 2]\nbudget: {steps: 10}\n"
        "overrides:\n  glow: {depth: 2, levels: 2, hidden_channels: 8}\n"
    )
    planned = plan_sweep(spec)
    progress = SweepProgress(planned, planned_trials(planned), recorded=1)  # one trial recorded before
    assert progress.bar.disable  # pytest's stderr is no terminal
    progress.result("glow-digits-seed1", {"step": 5, "val_bpd": 3.5})
    progress.end("glow-digits-seed1", {"step": 10, "val_bpd": 3.2, "status": "ok"}, failed=False)
    progress.end("glow-digits-seed2", {"step": 4, "status": "diverged"}, failed=False)
    progress.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[2/3 trials, 67% of the budget, ") and "glow-digits-seed1 ok" in lines[0]
    assert "best val 3.200 (glow-digits-seed1)" in lines[0]
    # the diverged trial spent 4 of its 10 steps: the total is 24, all of it spent
    assert lines[1].startswith("[3/3 trials, 100% of the budget, ") and "glow-digits-seed2 diverged" in lines[1]
    assert (progress.bar.n, progress.bar.total) == (24, 24)


def test_the_sweeps_tune_callback_pickles_without_its_display(tmp_path):
    """Tune pickles its callbacks into tuner.pkl; the display's stream (pytest's capture, a terminal)
    does not pickle, so the callback must carry only a key, and find the display again by it."""
    from ray import cloudpickle

    from flowbench.cli.progress import SweepProgress, planned_trials
    from flowbench.sweep.plan import plan_sweep

    spec = tmp_path / "pickled.yaml"
    spec.write_text("name: pickled\nmodels: [glow]\ndatasets: [digits]\nseeds: [0]\nbudget: {steps: 10}\n")
    planned = plan_sweep(spec)
    progress = SweepProgress(planned, planned_trials(planned), recorded=0)
    try:
        copy = cloudpickle.loads(cloudpickle.dumps(progress.callback))
        copy.on_trial_complete(0, [], _FinishedTrial())
        assert progress.done == 1 and progress.finished == {"glow-digits-seed0"}
    finally:
        progress.close()


class _FinishedTrial:
    config = {"trial_id": "glow-digits-seed0"}
    last_result = {"step": 10, "val_bpd": 3.0, "status": "ok"}
