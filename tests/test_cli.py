"""The command line: train (and re-run to resume), sample, models, and one-line errors."""

import json

import numpy as np
from PIL import Image

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
        "--eval-every",
        "3",
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
    assert "glow       44.05M" in out and "nxn_shift" in out and "3.35" in out


def test_sweep_folders_expand_the_home_of_the_machine_the_driver_runs_on(tmp_path, monkeypatch):
    # `ray job submit -- flowbench sweep … --results '~/results'` passes ~ to the head, where it means the head's home
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["sweep", "smoke", "--results", "~/results", "--storage", "~/tune"])
    assert (args.results, args.storage) == (str(tmp_path / "results"), str(tmp_path / "tune"))
    assert build_parser().parse_args(["sweep", "smoke", "--storage", "s3://bucket/tune"]).storage == "s3://bucket/tune"
