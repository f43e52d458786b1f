"""ONE trial: build a flow, train it under a budget, evaluate, checkpoint, measure. No Ray here.

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
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pydantic
import torch

import flowbench
from flowbench.atomic import atomic_write
from flowbench.data import ImageData, load_dataset
from flowbench.data.loader import Prefetcher
from flowbench.errors import FlowbenchError
from flowbench.flows.models import FlowModel
from flowbench.numerics import Numerics, check_in_effect, environment
from flowbench.record import TrialRecord
from flowbench.specfile import FieldError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"  # the latest state: what a resumed trial continues from
SELECTED_FILE = "selected.pt"  # the weights with the best validation bits/dim: what the trial reports
# bump when a change makes earlier trials' results incomparable (part of every trial's identity)
IDENTITY_VERSION = 2
BudgetKind = Literal["steps", "epochs", "seconds", "images", "flops"]
Reporter = Callable[[dict, "Path | None"], None]
StopAsked = Callable[[], bool]
CouplingPrecision = Literal["float32", "bfloat16"]
Optimizer = Literal["adam", "adamax"]


class TrainSettings(pydantic.BaseModel):
    """How a trial trains: the part of its config that a sweep spec's ``train:`` sets for all.
    A model card's recipe (``models/<name>.yaml``) supplies these per data set; what a spec or
    the CLI sets explicitly overrides the card."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    optimizer: Optimizer = "adam"
    batch_size: int = pydantic.Field(64, gt=0)
    lr: float = pydantic.Field(1e-3, gt=0)
    warmup_steps: int = pydantic.Field(0, ge=0)
    grad_clip: float | None = pydantic.Field(50.0, gt=0)  # max gradient norm; None: no clipping
    memory_saving: bool = False  # gradient checkpointing per flow step: less memory, more compute
    coupling_precision: CouplingPrecision = "float32"  # the coupling networks' compute
    # torch.compile the training step's forward and backward; how a trial runs, not what it is
    # (like its device): not part of its identity, so a checkpoint resumes compiled or eager
    compile: bool = False
    # evaluations along the budget, the k-th once k/N of it is spent (in the budget's own unit: at
    # equal training FLOPs for every model under a FLOPs budget); a checkpoint is written at each
    evaluations: int = pydantic.Field(10, gt=0)
    eval_images: int | None = pydantic.Field(None, gt=0)  # validation images per evaluation (None: all)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_step_intervals(cls, data):
        # the settings of flowbench before evaluations were placed along the budget
        old = [k for k in ("eval_every", "checkpoint_every") if isinstance(data, dict) and k in data]
        if old:
            raise FieldError(
                (old[0],),
                "evaluations are placed along the budget now: give evaluations: N (the k-th at k/N of the "
                "budget, a checkpoint at each) instead of eval_every and checkpoint_every",
            )
        return data


class TrialConfig(TrainSettings):
    """Everything that defines a trial; all but the fields in ``NOT_IDENTITY`` feed ``config_hash``."""

    NOT_IDENTITY: ClassVar[frozenset] = frozenset(
        {"recipe_source", "data_root", "device", "compile", "out_dir", "sweep", "trial_id"}
    )

    model: str
    dataset: str
    hparams: dict = {}
    variant: str = ""  # an ablation's setting (spec grid:), e.g. "actnorm=false"
    seed: int = pydantic.Field(0, ge=0)
    budget_kind: BudgetKind = "steps"
    budget: float = pydantic.Field(500, gt=0)
    latency_batch_size: int = pydantic.Field(16, gt=0)
    latency_repeats: int = pydantic.Field(20, gt=0)
    numerics: Numerics = "native"  # "portable": the same bits on every x86-64 CPU with AVX2 (flowbench.numerics)
    data_fingerprint: str = ""  # the data set's split sizes (and source checksum), set by whoever plans the trial
    recipe_source: str = ""  # where the training settings come from (card recipe, spec, CLI): provenance only
    # where and on what it runs: not part of the trial's identity
    data_root: str | None = None
    device: str = "auto"
    out_dir: str = "runs/trial"
    sweep: str = ""
    trial_id: str = ""

    def config_hash(self) -> str:
        identity = self.model_dump(exclude=set(self.NOT_IDENTITY)) | {"identity_version": IDENTITY_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]

    def record(self, hparams: dict | None = None, **measured) -> TrialRecord:
        """A record of this trial: its identity and budget from the config (``hparams`` as built,
        when known), ``measured`` for the rest."""
        hparams = self.hparams if hparams is None else hparams
        recipe = self.recipe() | ({"n_bits": hparams["n_bits"]} if "n_bits" in hparams else {})
        return TrialRecord(
            sweep=self.sweep,
            trial_id=self.trial_id,
            model=self.model,
            dataset=self.dataset,
            seed=self.seed,
            config_hash=self.config_hash(),
            variant=self.variant,
            hparams=json.dumps(hparams, sort_keys=True),
            recipe=json.dumps(recipe, sort_keys=True),
            budget_kind=self.budget_kind,
            budget=self.budget,
            batch_size=self.batch_size,
            lr=self.lr,
            evaluations=self.evaluations,
            **measured,
        )

    def recipe(self) -> dict:
        """The training settings actually used and where they come from (with the model's n_bits,
        the record's ``recipe`` column)."""
        return self.model_dump(include={"optimizer", "lr", "warmup_steps", "batch_size", "grad_clip"}) | {
            "source": self.recipe_source
        }


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
        torch.distributed.all_reduce(
            t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        )
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


# --------------------------------------------------------------------------- the step
def prepare_training(model: FlowModel, device: torch.device, lr: float, optimizer: Optimizer = "adam"):
    """Move the model for training and make its optimiser (the card's: Adam or Adamax).

    channels_last lets oneDNN/cuDNN convolve without layout conversions (~7% a step on CPU);
    Adam updates all parameters in one fused kernel, Adamax in multi-tensor (foreach) kernels.
    """
    # Module.to takes memory_format at runtime (documented); torch's overloads of it leave it out
    model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    if optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=lr, foreach=True)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def train_step(
    model: FlowModel,
    optimizer,
    pixels: torch.Tensor,
    noise,
    grad_clip: float | None,
    shard: Shard = Shard(),
    net: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimisation step on a global batch of uint8 pixels. Returns this process's share of
    the batch's mean bits/dim as a device tensor: nothing here reads a device value, so the host
    never waits for the device (a non-finite loss is found by ``LossMeter`` at the next
    evaluation). ``net`` runs the forward: the model, its DDP wrapper in a data-parallel trial, or
    either compiled."""
    x, logdet = model.preprocess_pixels(pixels.contiguous(memory_format=torch.channels_last), noise)
    bpd = model.bits_per_dim_of((model if net is None else net)(shard.take(x)), shard.take(logdet))
    share = bpd.sum() / len(pixels)
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over processes: scaled so that makes the global batch's mean
    (share * shard.world).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return share.detach()


class LossMeter:
    """Training loss and divergence, accumulated on the device and read only at evaluations."""

    NEVER = float(2**62)  # "no non-finite step yet", as a float the all-reduce can take the min of

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # finite steps
        self.first_bad = torch.full((), self.NEVER, dtype=torch.float64, device=device)
        self.last_finite = torch.full((), math.nan, dtype=torch.float64, device=device)

    def add(self, share: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(share)
        share = share.to(torch.float64)
        self.sum += torch.where(finite, share, 0.0)
        self.count += finite
        self.first_bad = torch.where(finite, self.first_bad, torch.clamp(self.first_bad, max=step))
        self.last_finite = torch.where(finite, share, self.last_finite)

    def read(self, shard: Shard) -> tuple[float, int | None, float]:
        """(mean training bits/dim since the last read, first non-finite step or None, last finite
        loss), the same on every process; resets the mean."""
        total, count, last = torch.stack([self.sum, self.count / shard.world, self.last_finite]).tolist()
        total, count, last = shard.reduce([total, count, last])
        first_bad = -shard.reduce([-float(self.first_bad)], "max")[0]
        mean = total / count if count else math.nan
        self.sum.zero_()
        self.count.zero_()
        return mean, None if first_bad >= self.NEVER else int(first_bad), last

    def state_dict(self) -> list[float]:
        """What a checkpoint between two evaluations needs to resume the interval's mean exactly."""
        return torch.stack([self.sum, self.count, self.first_bad, self.last_finite]).tolist()

    def load_state_dict(self, values: list[float]) -> None:
        for tensor, value in zip((self.sum, self.count, self.first_bad, self.last_finite), values, strict=True):
            tensor.fill_(value)


def measure_training_flops(model: FlowModel, pixels: torch.Tensor, seed: int, shard: Shard = Shard()) -> float:
    """FLOPs of one training forward + backward per image, counted by PyTorch's FlopCounterMode on a
    batch of the trial's own shape (gradient checkpointing's recomputation included)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, logdet = model.preprocess_pixels(pixels, torch.Generator(pixels.device).manual_seed(seed))
    x, logdet = shard.take(x), shard.take(logdet)
    with FlopCounterMode(display=False) as counter:
        model.bits_per_dim_of(model(x), logdet).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


# --------------------------------------------------------------------------- budget and data order
@dataclasses.dataclass
class Progress:
    """What a trial has spent; saved in its checkpoint. ``epoch``/``position`` place it in the
    seeded data order, so a resumed trial sees exactly the batches it would have seen."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    epoch: int = 0
    position: int = 0
    flops_per_image: float = math.nan
    compile_seconds: float = 0.0  # torch.compile's, every (re)start of the trial together; not in train_seconds

    @property
    def train_flops(self) -> float:
        return self.images_seen * self.flops_per_image

    def epochs(self, n_train: int) -> float:
        return self.epoch + self.position / n_train

    def spent(self, kind: str, n_train: int) -> float:
        return {
            "steps": self.step,
            "epochs": self.epochs(n_train),
            "images": self.images_seen,
            "seconds": self.train_seconds,
            "flops": self.train_flops,
        }[kind]


class Milestones:
    """The evaluations along a budget: the k-th at the first step that has spent k/N of it (N
    ``evaluations``, the last at the budget itself), in the budget's own unit. ``reached`` is how
    many are behind; a resumed trial starts from what it had ``spent``."""

    def __init__(self, budget: float, evaluations: int, spent: float = 0.0):
        self.budget = budget
        self.targets = [budget * k / evaluations for k in range(1, evaluations)] + [budget]
        self.reached = sum(t <= spent for t in self.targets)

    def due(self, spent: float) -> bool:
        """Whether the step that brought the trial to ``spent`` is evaluated (one step may pass
        several milestones: one evaluation, at the last of them)."""
        if spent < self.budget and spent < self.targets[self.reached]:
            return False
        self.reached = sum(t <= spent for t in self.targets)
        return True


def batch_plan(config: TrialConfig, n_train: int, start: Progress) -> Iterator[tuple[np.ndarray, int, int]]:
    """The remaining steps' batches, in order: (indices, epoch, position after the batch).

    Epoch e is the permutation from (seed, e). The budget decides the sizes: an images budget
    cuts the last batch so exactly ``budget`` images are seen, an epochs budget ends each epoch
    with what remains of it. Steps, FLOPs (per image constant at a fixed shape) and images are
    known ahead, so the plan stops at the budget; a seconds budget is the consumer's to stop."""
    epoch, position, images, step = start.epoch, start.position, start.images_seen, start.step
    order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
    per_image = start.flops_per_image
    while True:
        spent = {
            "steps": step,
            "epochs": epoch + position / n_train,
            "images": images,
            "seconds": 0.0,
            "flops": images * per_image,
        }[config.budget_kind]
        left = config.budget - spent
        if left <= 0:
            return
        size = config.batch_size
        if config.budget_kind == "images":
            size = min(size, int(left))
        if config.budget_kind == "epochs":
            size = min(size, n_train - position, math.ceil(left * n_train))
        indices = order[position : position + size]
        position += len(indices)
        images += len(indices)
        step += 1
        if position >= n_train:
            epoch, position = epoch + 1, 0
            order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
        yield indices, epoch, position


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: FlowModel, split, device, batch_size: int = 256, max_images: int | None = None, shard: Shard = Shard()
) -> float:
    """Mean bits/dim of ``split`` (its first ``max_images``); dequantisation noise fixed so
    evaluations are comparable. Accumulated on the device, read once."""
    was_training = model.training
    model.eval()
    n = len(split) if max_images is None else min(len(split), max_images)
    gen = torch.Generator(device).manual_seed(0)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, batch_size):
        pixels = split.batch(np.arange(start, min(n, start + batch_size))).to(device)
        x, logdet = model.preprocess_pixels(pixels, gen)
        total += model.bits_per_dim_of(model.log_prob(shard.take(x)), shard.take(logdet)).sum()
    model.train(was_training)
    return shard.reduce([total.item()])[0] / n


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


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_write(path) as tmp:  # a crash never leaves a half-written checkpoint
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A trial's checkpoint (its latest state) or selected weights; a folder means its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FlowbenchError(f"{path}: no checkpoint there; give a trial's checkpoint.pt or its folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, …: torch raises many types
        raise FlowbenchError(
            f"{path}: corrupted or not a flowbench checkpoint ({type(err).__name__}); delete it to start the trial over"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise FlowbenchError(f"{path}: not a flowbench checkpoint (no model/config); delete it to start over")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> FlowModel:
    """The model a checkpoint holds, with every preprocessing choice (n_bits, …) it was trained with."""
    config = state["config"]
    model = flowbench.build_model(config["model"], state["image_shape"], **state.get("hparams", config["hparams"]))
    model.load_state_dict(state["model"])
    return model.to(device)


# --------------------------------------------------------------------------- the trial
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


def missing_compiler(device: torch.device) -> str | None:
    """What torch.compile lacks here to build its kernels, or None: Inductor compiles C++ for the
    CPU (the compilers of ``torch._inductor.config.cpp.cxx``: $CXX, else g++) and Triton a C
    launcher for CUDA ($CC, else gcc, clang or cc). Asked before anything runs, so a machine
    without one fails in one line, not minutes later inside the first step."""
    if device.type == "cuda":
        names: list[str] = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang", "cc"]
        kind = "a C compiler for Triton"
    else:
        import torch._inductor.config as inductor

        cxx = inductor.cpp.cxx
        names = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
        kind = "a C++ compiler for Inductor"
    if any(shutil.which(name) for name in names):
        return None
    return f"{kind} ({' or '.join(names)}, none found)"


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
    splits, latency, and what was spent."""
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
        if status == "ok" and state.shard.rank == 0:
            latency = measure_latency(
                selected, state.data.test, state.device, config.latency_batch_size, config.latency_repeats
            )
            for key, value in latency.items():
                setattr(record, key, value)
    n_validation = len(state.data.validation)
    record.eval_images = min(config.eval_images or n_validation, n_validation)
    record.peak_memory_mb, record.memory_kind = peak_memory_mb(state.device)
    record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record.curve = state.curve
    return record
