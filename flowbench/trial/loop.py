"""The trial loop: ``run_trial`` sets a trial up, steps, evaluates and selects, checkpoints and records.

``run_trial(config, reporter) -> TrialRecord`` runs as is from ``flowbench train`` and is
wrapped by Ray Tune in a sweep. ``reporter(metrics, checkpoint_dir)`` is called at every
evaluation; ``checkpoint_dir`` is set when a checkpoint was just written there.

The loop reads top to bottom like Glow-PyTorch's ``train.py``: ``setup_trial`` (data, model,
optimiser, resume), then per step ``train_step`` (no host sync: the loss stays on the device),
and at each milestone (k/N of the budget, in its own unit) ``evaluate_and_select`` (the one place
device values are read: loss, divergence, validation bits/dim, the best checkpoint so far) and
``write_checkpoint``; at the end ``finish_record`` evaluates the selected checkpoint once on the test split.

The science: selection (search, ASHA, the reported checkpoint) uses validation bits/dim, carved
from the training data; test bits/dim is computed once, on the selected weights. Training FLOPs
per image are measured with PyTorch's FLOP counter at the trial's shape, whatever the budget.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import flowbench
from flowbench.data import ImageData, load_dataset
from flowbench.data.loader import Prefetcher
from flowbench.errors import FlowbenchError
from flowbench.flows.models import FlowModel
from flowbench.numerics import check_in_effect, environment
from flowbench.record import TrialRecord
from flowbench.trial.budget import Milestones, Progress, batch_plan
from flowbench.trial.checkpoints import CHECKPOINT_FILE, SELECTED_FILE, load_checkpoint, save_checkpoint
from flowbench.trial.measure import evaluate, measure_training_flops, peak_memory_mb
from flowbench.trial.settings import Shard, TrialConfig, git_commit, resolve_device
from flowbench.trial.step import LossMeter, missing_compiler, prepare_training, train_step, warmup_schedule

log = logging.getLogger(__name__)

Reporter = Callable[[dict, "Path | None"], None]
StopAsked = Callable[[], bool]


@dataclasses.dataclass
class TrialState:
    """Everything a running trial holds; ``checkpoint()`` is what resumes it."""

    config: TrialConfig
    hparams: dict  # as built: the config's with the data's n_bits filled in
    data: ImageData
    model: FlowModel
    net: torch.nn.Module  # the model, or its DDP wrapper in a data-parallel trial
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    noise: torch.Generator
    device: torch.device
    shard: Shard
    progress: Progress
    curve: list[dict]
    best: dict  # {"step", "val_bpd"} of the selected weights so far ({} before the first evaluation)
    meter: LossMeter
    best_weights: dict | None = None  # on the CPU, so every process can evaluate them at the end
    compiled: Callable[[torch.Tensor], torch.Tensor] | None = None  # ``net`` compiled for the batch size

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.out_dir) / "checkpoint"

    def checkpoint(self) -> dict:
        return {
            "config": self.config.model_dump(),
            "config_hash": self.config.config_hash(),
            "hparams": self.hparams,
            "image_shape": self.data.image_shape,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "noise_rng": self.noise.get_state(),
            "torch_rng": torch.get_rng_state(),
            "progress": dataclasses.asdict(self.progress),
            "curve": list(self.curve),
            "best": dict(self.best),
            "loss_meter": self.meter.state_dict(),
        }

    def selected(self) -> dict:
        """The selected weights as a loadable checkpoint (``model_from_checkpoint`` takes it)."""
        return {
            "config": self.config.model_dump(),
            "config_hash": self.config.config_hash(),
            "hparams": self.hparams,
            "image_shape": self.data.image_shape,
            "model": self.best_weights,
            "best": dict(self.best),
        }


def setup_trial(config: TrialConfig, resume_from=None) -> TrialState:
    """Data, model, optimiser and schedule; resumed from ``resume_from``, else ActNorm initialised
    on the first global batch and the training FLOPs per image measured."""
    shard = Shard.current()
    device = resolve_device(config.device)
    check_in_effect(config.numerics)
    if config.numerics == "portable":
        torch.set_num_threads(1)  # reductions split by threads: one thread on every machine
    if config.compile and (missing := missing_compiler(device)):
        raise FlowbenchError(f"compile: torch.compile needs {missing}; install it or train without compile")
    data = load_dataset(config.dataset, config.data_root)
    # the hyperparameters as built (the data's bit depth unless the card says): every checkpoint
    # stores them, so sampling, evaluation and resume rebuild exactly this model (5-bit stays 5-bit)
    hparams = {"n_bits": data.n_bits} | config.hparams
    torch.manual_seed(config.seed)
    model = flowbench.build_model(config.model, data.image_shape, **hparams)
    model.set_gradient_checkpointing(config.memory_saving)
    model.set_coupling_precision(torch.bfloat16 if config.coupling_precision == "bfloat16" else None)
    optimizer = prepare_training(model, device, config.lr, config.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(config.warmup_steps))
    noise = torch.Generator(device).manual_seed(config.seed + 1)
    meter = LossMeter(device)
    state = TrialState(
        config, hparams, data, model, model, optimizer, scheduler, noise, device, shard, Progress(), [], {}, meter
    )

    if resume_from is not None:
        saved = load_checkpoint(resume_from, map_location=device)
        if saved["config_hash"] != config.config_hash():
            raise FlowbenchError(
                f"{resume_from}: checkpoint is of another trial configuration; use a fresh --out folder"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        noise.set_state(saved["noise_rng"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        state.progress, state.curve, state.best = Progress(**saved["progress"]), saved["curve"], saved["best"]
        if "loss_meter" in saved:  # a checkpoint between evaluations (older ones were all at one)
            state.meter.load_state_dict(saved["loss_meter"])
        folder = Path(resume_from) if Path(resume_from).is_dir() else Path(resume_from).parent
        if state.best and (folder / SELECTED_FILE).is_file():
            state.best_weights = load_checkpoint(folder / SELECTED_FILE)["model"]
        log.info("resumed %s at step %d", config.trial_id or config.model, state.progress.step)
    # the first global batch: ActNorm's data-dependent initialisation and the compile's warm-up
    first_indices = np.random.default_rng([config.seed, 0]).permutation(len(data.train))[: config.batch_size]
    first = data.train.batch(first_indices).to(device)
    if resume_from is None:
        # ActNorm's initialisation with noise of its own: every process of a data-parallel trial
        # starts from the same parameters
        model.train()
        with torch.no_grad():
            model.log_prob(model.preprocess_pixels(first, torch.Generator(device).manual_seed(config.seed + 2))[0])
        state.progress.flops_per_image = measure_training_flops(model, first, config.seed + 3, shard)
    model.train()
    if shard.world > 1:
        state.net = torch.nn.parallel.DistributedDataParallel(model)
    if config.compile:
        compile_training_step(state, first)
    return state


def compile_training_step(state: TrialState, first: torch.Tensor) -> None:
    """``state.compiled``: the training forward (the DDP wrapper in a data-parallel trial, so
    dynamo's DDP optimiser splits the graph at its gradient buckets) compiled by torch.compile
    for the trial's batch shape, and compiled now, by one forward and backward of the first batch
    whose gradients are dropped: the compile time goes to ``compile_seconds``, not to the steps.
    Only the training step is compiled: evaluation, latency and sampling stay eager (their compile
    time does not pay back; README, Performance)."""
    model, shard, device = state.model, state.shard, state.device
    # a fresh dynamo cache for each trial: a sweep's actor runs trial after trial, and past dynamo's
    # recompile limit a model would silently run eager (Inductor's on-disk caches stay)
    torch._dynamo.reset()
    state.compiled = compiled = torch.compile(state.net, dynamic=False)
    start = time.perf_counter()
    x, logdet = model.preprocess_pixels(first, torch.Generator(device).manual_seed(state.config.seed + 4))
    try:
        share = model.bits_per_dim_of(compiled(shard.take(x)), shard.take(logdet)).sum() / len(first)
        (share * shard.world).backward()
    except torch._dynamo.exc.BackendCompilerFailed as err:
        cause = str(err.__cause__ or err).strip().splitlines()
        raise FlowbenchError(
            f"compile: torch.compile failed on {state.config.model} ({cause[0] if cause else type(err).__name__}); "
            "train without compile"
        ) from None
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.progress.compile_seconds += time.perf_counter() - start


def evaluate_and_select(state: TrialState, meter: LossMeter, done: bool) -> dict:
    """The evaluation interval's one host sync: training loss and divergence, validation bits/dim,
    and the best weights so far. Returns the curve point; ``point["diverged"]`` names the step."""
    config, progress = state.config, state.progress
    if state.device.type == "cuda":  # the clock catches up with the work queued on the device
        waited = time.perf_counter()
        torch.cuda.synchronize(state.device)
        progress.train_seconds += time.perf_counter() - waited
    train_bpd, first_bad, last_finite = meter.read(state.shard)
    point = {
        "step": progress.step,
        "images_seen": progress.images_seen,
        "epochs": progress.epochs(len(state.data.train)),
        "train_seconds": progress.train_seconds,
        "train_flops": progress.train_flops,
        "train_bpd": train_bpd,
        "lr": state.scheduler.get_last_lr()[0],
    }
    if first_bad is not None:
        return point | {"diverged": first_bad, "last_finite_loss": last_finite}
    val_bpd = evaluate(
        state.model, state.data.validation, state.device, max_images=config.eval_images, shard=state.shard
    )
    point["val_bpd"] = val_bpd
    if not math.isfinite(val_bpd):
        return point | {"diverged": progress.step, "last_finite_loss": last_finite}
    if not state.best or val_bpd < state.best["val_bpd"]:
        state.best = {"step": progress.step, "val_bpd": val_bpd}
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()}
    return point


def write_checkpoint(state: TrialState) -> Path:
    """The latest state and the selected weights beside it (rank 0 only writes)."""
    save_checkpoint(state.checkpoint_dir / CHECKPOINT_FILE, state.checkpoint())
    if state.best_weights is not None:
        save_checkpoint(state.checkpoint_dir / SELECTED_FILE, state.selected())
    return state.checkpoint_dir


class TrialInterrupted(Exception):
    """The trial stopped on request before its budget. ``checkpoint_dir`` holds its state at
    ``step``, which resumes it exactly; None when nothing was trained since the checkpoint it
    resumed from (or, fresh, before the first step)."""

    def __init__(self, step: int, checkpoint_dir: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint_dir = step, checkpoint_dir


def run_trial(
    config: TrialConfig | dict,
    reporter: Reporter | None = None,
    resume_from=None,
    on_step: Callable[[float], None] | None = None,
    stop: StopAsked | None = None,
) -> TrialRecord:
    """Train ``config`` to its budget, select on validation, test once, measure. ``reporter`` gets
    each evaluation; ``on_step`` the budget spent after every step (counted on the host: no device read).

    Data-set and model errors raise FlowbenchError before training; a loss that becomes
    NaN/inf (at any step, the first included) ends the trial with status ``diverged``.
    ``stop()`` is asked before every step: once true, the trial checkpoints where it is and
    raises ``TrialInterrupted`` (one process only: a data-parallel trial passes none).
    """
    config = TrialConfig.model_validate(config) if isinstance(config, dict) else config
    wall_start = time.perf_counter()
    state = setup_trial(config, resume_from)
    config, progress, shard, meter = state.config, state.progress, state.shard, state.meter
    n_train = len(state.data.train)
    status, reason, last_finite_loss = "ok", "", math.nan
    along = Milestones(config.budget, config.evaluations, progress.spent(config.budget_kind, n_train))
    saved_step = progress.step if resume_from is not None else 0  # the step the latest checkpoint holds

    # the batches are gathered (and copied to the GPU) ahead on a thread; the same plan, walked here,
    # says where each batch leaves the data order (what a checkpoint stores)
    ahead = (indices for indices, _, _ in batch_plan(config, n_train, dataclasses.replace(progress)))
    with Prefetcher(state.data.train, ahead, state.device) as batches:
        walked = batch_plan(config, n_train, dataclasses.replace(progress))
        for pixels, (indices, epoch, position) in zip(batches, walked, strict=True):
            if stop is not None and stop():
                raise TrialInterrupted(progress.step, write_checkpoint(state) if progress.step > saved_step else None)
            step_start = time.perf_counter()
            # the compiled step is for the trial's batch shape; a shorter last batch runs eager, not a recompile
            net = state.compiled if state.compiled is not None and len(pixels) == config.batch_size else state.net
            loss = train_step(state.model, state.optimizer, pixels, state.noise, config.grad_clip, shard, net)
            state.scheduler.step()
            progress.step += 1
            progress.images_seen += len(indices)
            progress.epoch, progress.position = epoch, position
            meter.add(loss, progress.step)
            progress.train_seconds += time.perf_counter() - step_start
            if config.budget_kind == "seconds":  # every process stops at the same step
                progress.train_seconds = shard.reduce([progress.train_seconds], "max")[0]
            spent = progress.spent(config.budget_kind, n_train)
            done = spent >= config.budget
            if on_step is not None:
                on_step(spent)
            if not along.due(spent):
                continue
            point = evaluate_and_select(state, meter, done) | {
                "milestone": along.reached,
                "budget_fraction": spent / config.budget,
            }
            if "diverged" in point:
                status = "diverged"
                reason = (
                    f"training loss became nan or inf at step {point['diverged']} "
                    f"(last finite loss {point['last_finite_loss']:.4f} bits/dim)"
                )
                progress.step, last_finite_loss = point["diverged"], point["last_finite_loss"]
                state.curve.append(
                    {k: v for k, v in point.items() if k not in ("diverged", "last_finite_loss")}
                    | {"val_bpd": math.nan}
                )
                break
            state.curve.append(point)
            saved = None
            if shard.rank == 0:
                saved, saved_step = write_checkpoint(state), progress.step
            if reporter is not None:
                reporter(dict(point, final=done), saved)
            if done:
                break

    if status == "ok" and shard.rank == 0 and not (state.checkpoint_dir / CHECKPOINT_FILE).is_file():
        # resumed from a checkpoint already at the budget: nothing trained, but the trial's final
        # checkpoint belongs in its out_dir all the same
        write_checkpoint(state)
    record = finish_record(state, status, reason)
    if status == "diverged":
        record.train_bpd = last_finite_loss
    record.wall_seconds = time.perf_counter() - wall_start
    return record


def finish_record(state: TrialState, status: str, reason: str) -> TrialRecord:
    """The trial's row: the selected weights evaluated once on the whole validation and test
    splits, and what was spent (latency is the sweep's phase, timed alone: ``flowbench.sweep.latency``)."""
    config, progress = state.config, state.progress
    record = config.record(
        state.hparams,
        steps=progress.step,
        epochs=progress.epochs(len(state.data.train)),
        images_seen=progress.images_seen,
        train_seconds=progress.train_seconds,
        compile_seconds=progress.compile_seconds,
        flops_per_image=progress.flops_per_image,
        train_flops=progress.train_flops,
        num_params=state.model.num_parameters(),
        num_params_allocated=state.model.num_allocated_parameters(),
        workers=state.shard.world,
        status=status,
        reason=reason,
        device=str(state.device),
        git_commit=git_commit(),
        **environment(state.device, config.numerics),
    )
    finite = [p["train_bpd"] for p in state.curve if math.isfinite(p["train_bpd"])]
    record.train_bpd = finite[-1] if finite else math.nan  # the last evaluation interval's mean
    if progress.train_seconds > 0:
        record.throughput_images_per_s = progress.images_seen / progress.train_seconds
    if state.best_weights is not None:
        selected = copy.deepcopy(state.model)
        selected.load_state_dict(state.best_weights)
        record.selected_step = state.best["step"]
        record.val_bpd = evaluate(selected, state.data.validation, state.device, shard=state.shard)
        record.test_bpd = evaluate(selected, state.data.test, state.device, shard=state.shard)
    n_validation = len(state.data.validation)
    record.eval_images = min(config.eval_images or n_validation, n_validation)
    record.peak_memory_mb, record.memory_kind = peak_memory_mb(state.device)
    record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record.curve = state.curve
    return record
