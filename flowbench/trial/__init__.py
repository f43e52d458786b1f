"""ONE trial: build a flow, train it under a budget, evaluate, checkpoint, measure. No Ray here.

``run_trial(config, reporter) -> TrialRecord`` runs as is from ``flowbench train`` and is wrapped
by Ray Tune in a sweep. The modules, one concern each:

- ``settings``: what a trial is (``TrialConfig``: model, data, budget, recipe) and its identity hash;
  the device and the data-parallel shard it runs on.
- ``step``: the optimiser, its warm-up, one training step, the loss meter read at evaluations.
- ``budget``: how far a trial has come (``Progress``), when it evaluates (``Milestones``), which images
  each step sees (``batch_plan``).
- ``measure``: bits/dim on a split, training FLOPs, peak memory.
- ``latency``: inference latency, models side by side in interleaved rounds, in a native process.
- ``checkpoints``: saved whole or not at all, loaded safely, the model a checkpoint holds.
- ``loop``: ``run_trial`` itself: set up, step, evaluate and select, checkpoint, the final record.
"""

from flowbench.trial.budget import Milestones, Progress, batch_plan
from flowbench.trial.checkpoints import (
    CHECKPOINT_FILE,
    SELECTED_FILE,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flowbench.trial.loop import TrialInterrupted, TrialState, run_trial, setup_trial
from flowbench.trial.measure import evaluate, measure_training_flops
from flowbench.trial.settings import Shard, TrainSettings, TrialConfig, git_commit, resolve_device
from flowbench.trial.step import LossMeter, prepare_training, train_step, warmup_schedule

__all__ = [
    "CHECKPOINT_FILE",
    "SELECTED_FILE",
    "LossMeter",
    "Milestones",
    "Progress",
    "Shard",
    "TrainSettings",
    "TrialConfig",
    "TrialInterrupted",
    "TrialState",
    "batch_plan",
    "evaluate",
    "git_commit",
    "load_checkpoint",
    "measure_training_flops",
    "model_from_checkpoint",
    "prepare_training",
    "resolve_device",
    "run_trial",
    "save_checkpoint",
    "setup_trial",
    "train_step",
    "warmup_schedule",
]
