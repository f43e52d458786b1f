"""The committed reference runs come out again from this code.

For each sweep under results/, its quickest final trial is planned again from the shipped spec (the
configuration hash must be the record's; a search sweep's final trial with the searched values its
record holds) and trained to its first milestone in a fresh process, with the numerics the record
names (portable mode's environment; the record's thread count). Its validation and training bits/dim
there must equal the committed curve's to the last digit where the numbers are portable or the
machine is the record's kind; elsewhere within three of the reference's own standard deviations over
seeds at that milestone. The test says which comparison it made. Training on after the first
milestone is the same computation continued: the prefix tests what the whole trial would, at a
fraction of the cost; the record's selected step must be its curve's lowest validation bits/dim.
``pytest -m reproduce_whole`` runs the same trials to their end and compares their records (their
test bits/dim included), minutes a sweep.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from flowbench.numerics import PORTABLE_ENV, environment_for, math_libraries
from flowbench.results.tables import read_table
from flowbench.sweep.plan import plan_sweep, trial_config
from flowbench.trial import TrialConfig

ROOT = Path(__file__).parents[1]
REFERENCES = sorted(p.parent.name for p in (ROOT / "results").glob("*/trials.parquet"))
# what must be the same for the same bits when the numerics are native (the rerun takes the record's threads)
MACHINE_KEYS = ("cpu_capability", "math_libraries", "torch_version")

# the trial in a process of its own (numerics are fixed at a process's start): to its first milestone,
# or whole (argv[3] == "whole") for its record
RERUN = """
import json, sys, torch
from flowbench.trial import TrialConfig, run_trial

class Reached(Exception):
    pass

def first(metrics, _):
    print(json.dumps({k: metrics[k] for k in ("step", "val_bpd", "train_bpd", "train_flops")}))
    raise Reached

config = TrialConfig.model_validate_json(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
if sys.argv[3] == "whole":
    record = run_trial(config)
    print(json.dumps({k: getattr(record, k) for k in ("status", "selected_step", "val_bpd", "test_bpd", "train_bpd")}))
else:
    try:
        run_trial(config, first)
    except Reached:
        pass
"""
WHOLE = ("status", "selected_step", "val_bpd", "test_bpd", "train_bpd")


def reference_trial(sweep: str) -> tuple[pd.Series, pd.DataFrame, pd.DataFrame, TrialConfig]:
    """The committed record and curve of the sweep's quickest final trial, its peers' first
    milestones, and its config planned again from the shipped spec."""
    trials = read_table(ROOT / "results" / sweep / "trials.parquet", "trials")
    curves = read_table(ROOT / "results" / sweep / "curves.parquet", "curves")
    finals = trials[(trials.status == "ok") & (trials.phase == "final")]
    row = finals.sort_values(["train_seconds", "trial_id"]).iloc[0]
    spec_path = ROOT / "sweeps" / f"{sweep}.yaml"
    planned = plan_sweep(spec_path)
    spec, configs = planned.spec, planned.configs
    config = next(c for c in configs if c.trial_id == row.trial_id)
    if spec.search is not None:  # the final trial runs its group's best sample's values, as recorded
        recorded = json.loads(row.recipe) | json.loads(row.hparams) | row.to_dict()
        searched = {k: recorded[k] for k in spec.search.space}
        config = TrialConfig.model_validate(trial_config(config.model_dump(), searched))
    # its peers: the final trials of the same model and variant on the other seeds
    peers = finals[(finals.model == row.model) & (finals.variant == row.variant)].trial_id
    first = curves[curves.trial_id.isin(peers) & (curves.milestone == 1)]
    return row, curves[curves.trial_id == row.trial_id].sort_values("step"), first, config


def rerun(config: TrialConfig, row: pd.Series, out: Path, how: str) -> dict:
    """``config`` run again in a fresh process with the record's numerics and threads."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV} | environment_for(row.numerics)
    config = config.model_copy(update={"out_dir": str(out), "device": "cpu"})
    done = subprocess.run(
        [sys.executable, "-c", RERUN, config.model_dump_json(), str(row.threads), how],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def comparison(row: pd.Series) -> str | None:
    """How this machine's numbers compare with the record's: "exact: why", or None (another kind of
    machine, native numerics: a tolerance)."""
    here = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "math_libraries": math_libraries(),
        "torch_version": torch.__version__,
    }
    if row.numerics == "portable":
        return "exact: portable numerics"
    if all(row[k] == here[k] for k in MACHINE_KEYS):
        return f"exact: the record's kind of machine ({row.cpu})"
    return None


@pytest.mark.parametrize("sweep", REFERENCES)
def test_a_committed_reference_run_comes_out_again(sweep, tmp_path, record_property):
    row, curve, peers, config = reference_trial(sweep)
    assert config.config_hash() == row.config_hash, "main's code plans another configuration than the record's"
    # the record holds the checkpoint its curve selects: the step of the lowest validation bits/dim
    assert curve.loc[curve.val_bpd.idxmin()].step == row.selected_step, "the record's selected step is not its curve's"

    again = rerun(config, row, tmp_path / "trial", "first")
    recorded = curve[curve.milestone == 1].iloc[0]
    assert (again["step"], again["train_flops"]) == (recorded.step, recorded.train_flops)
    exact = comparison(row)
    if exact:
        assert (again["val_bpd"], again["train_bpd"]) == (recorded.val_bpd, recorded.train_bpd), exact
        said = exact
    else:
        # the reference's own spread: the same model and variant over seeds at this milestone
        tolerance = 3 * peers.val_bpd.std(ddof=1)
        said = (
            f"within 3 standard deviations over seeds ({tolerance:.4f} bits/dim): recorded with "
            f"{row.cpu_capability} kernels, {row.math_libraries}, {row.threads} threads, torch {row.torch_version}"
        )
        assert abs(again["val_bpd"] - recorded.val_bpd) <= tolerance, said
    record_property("comparison", said)
    print(f"{sweep}: {row.trial_id} at step {recorded.step}: {again['val_bpd']!r}, {recorded.val_bpd!r} recorded")
    print(f"  {said}")


@pytest.mark.reproduce_whole
@pytest.mark.parametrize("sweep", REFERENCES)
def test_a_committed_reference_trial_comes_out_again_whole(sweep, tmp_path):
    """The same trial to its end, its record's figures (minutes a sweep: ``pytest -m reproduce_whole``)."""
    row, _, _, config = reference_trial(sweep)
    again = rerun(config, row, tmp_path / "trial", "whole")
    exact = comparison(row)
    if exact:
        assert again == {k: row[k] for k in WHOLE}, exact
    else:
        trials = read_table(ROOT / "results" / sweep / "trials.parquet", "trials")
        peers = trials[(trials.model == row.model) & (trials.variant == row.variant) & (trials.phase == "final")]
        assert abs(again["test_bpd"] - row.test_bpd) <= 3 * peers.test_bpd.std(ddof=1)
