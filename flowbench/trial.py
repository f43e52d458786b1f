"""ONE trial: build a flow, train it under a budget, evaluate, checkpoint, measure. No Ray here.

``run_trial(config, reporter) -> TrialRecord`` runs as is from ``flowbench train`` and is
wrapped by Ray Tune in a sweep. ``reporter(metrics, checkpoint_dir)`` is called at every
evaluation; ``checkpoint_dir`` is set when a checkpoint was just written there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pydantic
import torch

import flowbench
from flowbench.atomic import atomic_write
from flowbench.data import load_dataset
from flowbench.errors import FlowbenchError
from flowbench.flows.models import FlowModel
from flowbench.record import TrialRecord
from flowbench.specfile import FieldError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BudgetKind = Literal["steps", "epochs", "seconds", "images"]
Reporter = Callable[[dict, "Path | None"], None]


CouplingPrecision = Literal["float32", "bfloat16"]


class TrainSettings(pydantic.BaseModel):
    """How a trial trains: the part of its config that a sweep spec's ``train:`` sets for all."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = pydantic.Field(64, gt=0)
    lr: float = pydantic.Field(1e-3, gt=0)
    warmup_steps: int = pydantic.Field(0, ge=0)
    grad_clip: float | None = pydantic.Field(50.0, gt=0)  # max gradient norm; None: no clipping
    memory_saving: bool = False  # gradient checkpointing per flow step: less memory, more compute
    coupling_precision: CouplingPrecision = "float32"  # the coupling networks' compute
    eval_every: int = pydantic.Field(100, gt=0)
    eval_images: int | None = pydantic.Field(None, gt=0)  # test images per intermediate evaluation
    checkpoint_every: int = pydantic.Field(500, gt=0)

    @pydantic.model_validator(mode="after")
    def _checkpoints_at_evaluations(self):
        # a checkpoint is written at an evaluation: with neither interval dividing the other the
        # checkpoints would come at their least common multiple, far rarer than asked
        if self.checkpoint_every % self.eval_every and self.eval_every % self.checkpoint_every:
            raise FieldError(("checkpoint_every",), f"checkpoints are written at evaluations: give a multiple "
                             f"or a divisor of eval_every ({self.eval_every}), got {self.checkpoint_every}")
        return self


class TrialConfig(TrainSettings):
    """Everything that defines a trial; identity fields feed ``config_hash``."""

    model: str
    dataset: str
    hparams: dict = {}
    seed: int = pydantic.Field(0, ge=0)
    budget_kind: BudgetKind = "steps"
    budget: float = pydantic.Field(500, gt=0)
    latency_batch_size: int = pydantic.Field(16, gt=0)
    latency_repeats: int = pydantic.Field(20, gt=0)
    # where and on what it runs: not part of the trial's identity
    data_root: str | None = None
    device: str = "auto"
    out_dir: str = "runs/trial"
    sweep: str = ""
    trial_id: str = ""

    def config_hash(self) -> str:
        identity = self.model_dump(exclude={"data_root", "device", "out_dir", "sweep", "trial_id"})
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlowbenchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowbenchError(f"device {name!r} asked for, but this machine has no CUDA GPU: use --device cpu")
    return device


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel trial: rank ``rank`` of ``world`` processes.

    Every process draws the same global batch and the same dequantisation noise, then keeps
    every ``world``-th image from ``rank`` on: together they compute what one process would.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rank :: self.world] if self.world > 1 else x

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world == 1:
            return values
        on_gpu = torch.distributed.get_backend() == "nccl"  # nccl reduces only CUDA tensors
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX)
        return t.tolist()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


@torch.no_grad()
def evaluate(model: FlowModel, split, device, batch_size: int = 256, max_images: int | None = None,
             shard: Shard = Shard()) -> float:
    """Mean test bits/dim; dequantisation noise fixed so evaluations are comparable."""
    was_training = model.training
    model.eval()
    n = len(split) if max_images is None else min(len(split), max_images)
    gen = torch.Generator(device).manual_seed(0)
    total = 0.0
    for start in range(0, n, batch_size):
        pixels = split.batch(np.arange(start, min(n, start + batch_size))).to(device)
        x, logdet = model.preprocess_pixels(pixels, gen)
        total += model.bits_per_dim_of(model.log_prob(shard.take(x)), shard.take(logdet)).sum().item()
    model.train(was_training)
    return shard.reduce([total])[0] / n


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and interquartile range in ms of ``repeats`` calls after ``warmup``, synchronised."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return float(median), float(q3 - q1)


@torch.no_grad()
def measure_latency(model: FlowModel, split, device, batch_size: int, repeats: int) -> dict:
    model.eval()
    pixels = split.batch(np.arange(min(batch_size, len(split)))).to(device)
    x, _ = model.preprocess_pixels(pixels, torch.Generator(device).manual_seed(0))
    density = time_call(lambda: model.log_prob(x), device, repeats)
    sample = time_call(lambda: model.sample(len(x)), device, repeats)
    return {
        "latency_batch_size": len(x),
        "density_latency_ms": density[0],
        "density_latency_iqr_ms": density[1],
        "sample_latency_ms": sample[0],
        "sample_latency_iqr_ms": sample[1],
    }


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def prepare_training(model: FlowModel, device: torch.device, lr: float) -> torch.optim.Optimizer:
    """Move the model for training and make its optimiser (Adam, the papers' choice).

    channels_last lets oneDNN/cuDNN convolve without layout conversions (~7% a step on CPU);
    the fused Adam updates all parameters in one kernel.
    """
    model.to(device, memory_format=torch.channels_last)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def train_step(model: FlowModel, optimizer, pixels: torch.Tensor, noise, grad_clip: float | None,
               shard: Shard = Shard(), net: torch.nn.Module | None = None) -> float | None:
    """One optimisation step on a global batch of uint8 pixels; returns its mean bits/dim, or
    None if that is not finite. In a data-parallel trial ``net`` is the DDP-wrapped model."""
    x, logdet = model.preprocess_pixels(pixels.contiguous(memory_format=torch.channels_last), noise)
    bpd = model.bits_per_dim_of((net or model)(shard.take(x)), shard.take(logdet))
    value = shard.reduce([bpd.sum().item()])[0] / len(pixels)
    if not math.isfinite(value):  # the same verdict on every process, so none waits on the others
        return None
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over processes: scaled so that makes the global batch's mean
    (bpd.sum() * shard.world / len(pixels)).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_write(path) as tmp:  # a crash never leaves a half-written checkpoint
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FlowbenchError(f"{path}: no checkpoint there; give a trial's checkpoint.pt or its folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, …: torch raises many types
        raise FlowbenchError(f"{path}: corrupted or not a flowbench checkpoint ({type(err).__name__}); "
                             "delete it to start the trial over") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise FlowbenchError(f"{path}: not a flowbench checkpoint (no model/config); delete it to start over")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> FlowModel:
    config = state["config"]
    model = flowbench.build_model(config["model"], state["image_shape"], **config["hparams"])
    model.load_state_dict(state["model"])
    return model.to(device)


class _Batches:
    """Seeded data order: epoch e is the permutation from (seed, e), so it is reproducible from
    (epoch, position) alone and a resumed trial sees exactly the batches it would have seen."""

    def __init__(self, n: int, seed: int, epoch: int = 0, position: int = 0):
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position
        self._order = self._permutation()

    def _permutation(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self, size: int) -> np.ndarray:
        idx = self._order[self.position : self.position + size]
        self.position += len(idx)
        if self.position >= self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        return idx

    @property
    def epochs(self) -> float:
        return self.epoch + self.position / self.n


def run_trial(config: TrialConfig | dict, reporter: Reporter | None = None, resume_from=None) -> TrialRecord:
    """Train ``config`` to its budget and measure it. Resumes from ``resume_from`` when given.

    Data-set and model errors raise FlowbenchError before training; a loss that becomes
    NaN/inf ends the trial with status ``diverged`` rather than an exception.
    """
    config = TrialConfig.model_validate(config) if isinstance(config, dict) else config
    wall_start = time.perf_counter()
    shard = Shard.current()
    device = resolve_device(config.device)
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "checkpoint" / CHECKPOINT_FILE
    data = load_dataset(config.dataset, config.data_root)
    hparams = dict(config.hparams)
    hparams.setdefault("n_bits", data.n_bits)

    torch.manual_seed(config.seed)
    model = flowbench.build_model(config.model, data.image_shape, **hparams)
    model.set_gradient_checkpointing(config.memory_saving)
    model.set_coupling_precision(torch.bfloat16 if config.coupling_precision == "bfloat16" else None)
    optimizer = prepare_training(model, device, config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(config.warmup_steps))
    noise = torch.Generator(device).manual_seed(config.seed + 1)
    progress = {"step": 0, "images_seen": 0, "train_seconds": 0.0, "epoch": 0, "position": 0}
    curve: list[dict] = []

    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        if state["config_hash"] != config.config_hash():
            raise FlowbenchError(f"{resume_from}: checkpoint is of another trial configuration; "
                                 "use a fresh --out folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        noise.set_state(state["noise_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        progress, curve = state["progress"], state["curve"]
        log.info("resumed %s at step %d", config.trial_id or config.model, progress["step"])

    record = TrialRecord(
        sweep=config.sweep, trial_id=config.trial_id, model=config.model, dataset=config.dataset,
        seed=config.seed, config_hash=config.config_hash(), hparams=json.dumps(hparams, sort_keys=True),
        budget_kind=config.budget_kind, budget=config.budget, batch_size=config.batch_size, lr=config.lr,
        num_params=model.num_parameters(), num_params_allocated=model.num_allocated_parameters(), device=str(device), git_commit=git_commit(), workers=shard.world,
    )
    batches = _Batches(len(data.train), config.seed, progress["epoch"], progress["position"])
    train_bpd_sum, train_count, last_train_bpd = 0.0, 0, math.nan

    def budget_left() -> float:
        spent = {"steps": progress["step"], "epochs": batches.epochs, "images": progress["images_seen"],
                 "seconds": progress["train_seconds"]}[config.budget_kind]
        return config.budget - spent

    def next_batch_size() -> int:
        size = config.batch_size
        if config.budget_kind == "images":  # the last batch is cut so exactly `budget` images are seen
            size = min(size, int(budget_left()))
        if config.budget_kind == "epochs":  # an epoch's last batch is what remains of it
            size = min(size, batches.n - batches.position, math.ceil(budget_left() * batches.n))
        return size

    def checkpoint_state() -> dict:
        progress.update(epoch=batches.epoch, position=batches.position)
        return {
            "config": config.model_dump(), "config_hash": config.config_hash(), "image_shape": data.image_shape,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "noise_rng": noise.get_state(), "torch_rng": torch.get_rng_state(), "progress": dict(progress),
            "curve": list(curve),
        }

    model.train()
    if resume_from is None:
        # ActNorm's data-dependent initialisation on the first global batch, with noise of its
        # own: every process of a data-parallel trial starts from the same parameters
        first = data.train.batch(_Batches(len(data.train), config.seed).next(config.batch_size)).to(device)
        with torch.no_grad():
            model.log_prob(model.preprocess_pixels(first, torch.Generator(device).manual_seed(config.seed + 2))[0])
    net = torch.nn.parallel.DistributedDataParallel(model) if shard.world > 1 else model
    status, reason = "ok", ""
    while budget_left() > 0:
        step_start = time.perf_counter()
        pixels = data.train.batch(batches.next(next_batch_size()))
        loss = train_step(model, optimizer, pixels.to(device, non_blocking=True), noise, config.grad_clip, shard, net)
        if loss is None:
            status, reason = "diverged", f"training loss became nan or inf at step {progress['step'] + 1}"
            break
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        progress["step"] += 1
        progress["images_seen"] += len(pixels)
        progress["train_seconds"] += time.perf_counter() - step_start
        if config.budget_kind == "seconds":  # all processes stop at the same step
            progress["train_seconds"] = shard.reduce([progress["train_seconds"]], "max")[0]
        last_train_bpd = loss
        train_bpd_sum, train_count = train_bpd_sum + last_train_bpd, train_count + 1

        done = budget_left() <= 0
        if progress["step"] % config.eval_every == 0 or done:
            # intermediate evaluations may use a subset; the final figure is on the whole test split
            test_bpd = evaluate(model, data.test, device, max_images=None if done else config.eval_images, shard=shard)
            point = {
                "step": progress["step"], "images_seen": progress["images_seen"], "epochs": batches.epochs,
                "train_seconds": progress["train_seconds"], "train_bpd": train_bpd_sum / train_count,
                "test_bpd": test_bpd, "lr": scheduler.get_last_lr()[0],
            }
            train_bpd_sum, train_count = 0.0, 0
            curve.append(point)
            if not math.isfinite(test_bpd):
                status, reason = "diverged", f"test bits/dim became {test_bpd} at step {progress['step']}"
                break
            saved = None
            if (progress["step"] % config.checkpoint_every == 0 or done) and shard.rank == 0:
                save_checkpoint(checkpoint_path, checkpoint_state())
                saved = checkpoint_path.parent
            if reporter is not None:
                reporter(dict(point, final=done), saved)

    if status == "ok" and shard.rank == 0 and not checkpoint_path.is_file():
        # resumed from a checkpoint already at the budget: nothing trained, but the trial's final
        # checkpoint belongs in its out_dir all the same
        save_checkpoint(checkpoint_path, checkpoint_state())
    good = [p for p in curve if math.isfinite(p["test_bpd"])]
    record.steps, record.images_seen = progress["step"], progress["images_seen"]
    record.epochs, record.train_seconds = batches.epochs, progress["train_seconds"]
    record.status, record.reason = status, reason
    record.train_bpd = last_train_bpd  # the last finite training loss, also for a diverged trial
    if good:
        record.test_bpd = good[-1]["test_bpd"]
    if record.train_seconds > 0:
        record.throughput_images_per_s = record.images_seen / record.train_seconds
    record.peak_memory_mb, record.memory_kind = peak_memory_mb(device)
    if status == "ok" and shard.rank == 0:
        latency = measure_latency(model, data.test, device, config.latency_batch_size, config.latency_repeats)
        for key, value in latency.items():
            setattr(record, key, value)
    record.wall_seconds = time.perf_counter() - wall_start
    record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record.curve = curve
    return record
