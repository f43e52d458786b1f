"""What a sweep will cost, before it runs: per trial and in total, its FLOPs and its time.

Every figure comes from the trial's own configuration, without its data (shapes, not images:
``check_data`` falls back on a data set's published shape and sizes where its files are not here):

- FLOPs per image: PyTorch's FlopCounterMode on one training step (forward and backward) of the
  trial's model at its batch (per data-parallel worker) on the meta device: the model is built as the
  trial builds it, then moved to ``meta``, so no arithmetic runs and the count is the one the trial
  records (``flowbench.trial.measure_training_flops``); its forward alone is an evaluation's;
- steps and images: the trial's own batch plan walked to its budget (``batch_plan``,
  ``Milestones``), so the FLOPs budget's last step, an epoch's short last batch and the evaluations
  one step passes together count as in the trial; a seconds budget has no FLOPs before it runs;
- evaluation FLOPs: each evaluation's validation images and, at the end, the whole validation and
  test splits on the selected weights, times the forward FLOPs per image (latency runs not counted);
- time on an accelerator: the FLOPs over its datasheet's dense peak at the trial's precision
  (TF32 for float32 couplings, whose convolutions cuDNN runs in TF32; bfloat16 for bfloat16 ones)
  times a fraction of it (``DEFAULT_MFU`` unless given: an assumption, not a measurement);
- time on this machine (``measure=True``): a few real training steps and an evaluation batch of
  each distinct model, timed here on random images of the data set's shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from flowbench.data import DatasetInfo
from flowbench.sweep.plan import check_data, expand, one_thread
from flowbench.sweep.spec import SweepSpec, load_sweep_spec
from flowbench.trial import (
    Milestones,
    Progress,
    TrialConfig,
    batch_plan,
    prepare_training,
    resolve_device,
    train_step,
)

MEASURE_STEPS = 3  # timed training steps per model with measure=True, after one untimed
DEFAULT_MFU = 0.3  # the fraction of the dense peak assumed when none is given


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    tf32: float  # dense TFLOP/s (float32 matmuls and convolutions on TF32 tensor cores)
    bf16: float  # dense TFLOP/s
    source: str


# Datasheet peaks without sparsity. NVIDIA's H100 and H200 pages give them with 2:4 sparsity
# (TF32 989, BF16 1,979 TFLOPS, footnoted "with sparsity"): halved here. The A100 datasheet lists
# dense and sparse side by side (TF32 156 | 312, BF16 312 | 624).
ACCELERATORS = (
    Accelerator("H100 SXM", 494.5, 989.5, "https://www.nvidia.com/en-us/data-center/h100/"),
    Accelerator("H200 SXM", 494.5, 989.5, "https://www.nvidia.com/en-us/data-center/h200/"),
    Accelerator(
        "A100 80GB SXM",
        156.0,
        312.0,
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
)


@dataclasses.dataclass
class TrialCost:
    config: TrialConfig
    flops_per_image: float  # training, forward and backward, at the trial's batch (per worker)
    forward_flops_per_image: float  # evaluation
    steps: float  # NaN for a seconds budget (unless measured here)
    images: float
    evaluations: int  # along the budget (one step may pass several milestones: fewer)
    eval_images: int  # validation images each
    validation: int  # images of the whole validation split (the selected weights' final evaluation)
    test: int
    seconds_here: float = math.nan  # measured on this machine: training and evaluation
    step_seconds_here: float = math.nan

    @property
    def train_flops(self) -> float:
        return self.images * self.flops_per_image

    @property
    def eval_flops(self) -> float:
        images = self.evaluations * self.eval_images + self.validation + self.test
        return images * self.forward_flops_per_image

    @property
    def flops(self) -> float:
        return self.train_flops + self.eval_flops

    def seconds_on(self, accelerator: Accelerator, mfu: float) -> float:
        """On one ``accelerator`` at ``mfu`` of its peak (data-parallel workers share the work: the
        same GPU-seconds)."""
        peak = accelerator.bf16 if self.config.coupling_precision == "bfloat16" else accelerator.tf32
        return self.flops / (peak * 1e12 * mfu)


@dataclasses.dataclass
class SweepCost:
    spec: SweepSpec
    trials: list[TrialCost]
    absent: dict[str, str]  # data sets planned from their published shape: why their files were not used
    infos: dict[str, DatasetInfo]

    def total(self, field: str) -> float:
        return float(sum(getattr(t, field) for t in self.trials))

    def gpu_hours(self, accelerator: Accelerator, mfu: float) -> float:
        return sum(t.seconds_on(accelerator, mfu) for t in self.trials) / 3600


def _build(config: TrialConfig, info: DatasetInfo):
    import flowbench
    from flowbench.flows.actnorm import ActNorm

    hparams = {"n_bits": info.n_bits} | config.hparams
    with one_thread():
        model = flowbench.build_model(config.model, info.image_shape, **hparams)
    model.set_gradient_checkpointing(config.memory_saving)
    model.set_coupling_precision(torch.bfloat16 if config.coupling_precision == "bfloat16" else None)
    for layer in model.modules():  # as after the trial's data-dependent initialisation
        if isinstance(layer, ActNorm):
            layer.mark_initialized()
    return model


def count_flops(config: TrialConfig, info: DatasetInfo, workers: int = 1) -> tuple[float, float]:
    """(training FLOPs per image, forward FLOPs per image) of ``config``'s model, counted by
    FlopCounterMode on the meta device in a training step on the batch one data-parallel worker of
    ``workers`` holds: the forward and backward together are what the trial measures, the forward
    alone what an evaluation costs (at the training batch: the few batch-independent FLOPs, such as
    building a 1×1 convolution's weight from its LU factors, are spread over it instead of 256)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _build(config, info).to("meta").train()
    batch = math.ceil(config.batch_size / workers)
    x, logdet = model.preprocess_pixels(torch.zeros(batch, *info.image_shape, dtype=torch.uint8, device="meta"))
    with FlopCounterMode(display=False) as forward:
        bpd = model.bits_per_dim_of(model(x), logdet).mean()
    with FlopCounterMode(display=False) as backward:
        bpd.backward()
    return (forward.get_total_flops() + backward.get_total_flops()) / batch, forward.get_total_flops() / batch


def walk_budget(config: TrialConfig, n_train: int, flops_per_image: float) -> tuple[int, int, int]:
    """(steps, images, evaluations) of the trial to its budget, walked as the trial walks it (not a
    seconds budget: that one ends when the clock says)."""
    progress = Progress(flops_per_image=flops_per_image)
    along = Milestones(config.budget, config.evaluations)
    evaluations = 0
    for indices, epoch, position in batch_plan(config, n_train, dataclasses.replace(progress)):
        progress.step += 1
        progress.images_seen += len(indices)
        progress.epoch, progress.position = epoch, position
        evaluations += along.due(progress.spent(config.budget_kind, n_train))
    return progress.step, progress.images_seen, evaluations


def measure_here(config: TrialConfig, info: DatasetInfo, steps: int = MEASURE_STEPS) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated image) of ``config``'s model on this
    machine, timed on random images of the data set's shape: ``steps`` steps after one."""
    device = resolve_device(config.device)
    model = _build(config, info)
    optimizer = prepare_training(model, device, config.lr, config.optimizer)
    gen = torch.Generator(device).manual_seed(0)
    pixels = torch.randint(0, 2**info.n_bits, (config.batch_size, *info.image_shape), dtype=torch.uint8)
    pixels = pixels.to(device)

    def timed(run) -> float:
        run()  # once untimed: allocations, kernel choices
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps

    step = timed(lambda: train_step(model, optimizer, pixels, gen, config.grad_clip).item())
    model.eval()
    with torch.no_grad():
        forward = timed(lambda: model.bits_per_dim(pixels, gen).sum().item())
    return step, forward / len(pixels)


def plan_cost(spec_path: str | Path, measure: bool = False) -> SweepCost:
    """The sweep's trials and what each will cost; data sets need not be present."""
    spec = load_sweep_spec(spec_path)
    absent: dict[str, str] = {}
    infos = check_data(spec, spec_path, absent)
    return cost_of(spec, expand(spec, infos), infos, absent, MEASURE_STEPS if measure else 0)


def cost_of(
    spec: SweepSpec,
    configs: list[TrialConfig],
    infos: dict[str, DatasetInfo],
    absent: dict[str, str] | None = None,
    measure_steps: int = 0,
) -> SweepCost:
    """What each of ``configs`` will cost; with ``measure_steps``, timed here by that many steps of
    each distinct model (seeds share a model's counts and timing)."""
    counted: dict[str, tuple] = {}
    trials = []
    for config in configs:
        info = infos[config.dataset]
        key = json.dumps(config.model_dump(exclude={"seed", "trial_id", *config.NOT_IDENTITY}), sort_keys=True)
        if key not in counted:
            flops = count_flops(config, info, spec.resources.workers)
            walked = walk_budget(config, info.sizes["train"], flops[0]) if config.budget_kind != "seconds" else None
            timed = measure_here(config, info, measure_steps) if measure_steps else (math.nan, math.nan)
            counted[key] = (flops, walked, timed)
        (per_image, forward), walked, (step_s, image_s) = counted[key]
        validation = info.sizes["validation"]
        eval_images = min(config.eval_images or validation, validation)
        if walked is None:  # a seconds budget: its steps are what the clock allows
            steps = config.budget / step_s
            walked = (steps, steps * config.batch_size, config.evaluations)
        steps, images, evaluations = walked
        cost = TrialCost(
            config, per_image, forward, steps, images, evaluations, eval_images, validation, info.sizes["test"]
        )
        if measure_steps:
            evaluated = evaluations * eval_images + validation + info.sizes["test"]
            cost.step_seconds_here = step_s
            cost.seconds_here = steps * step_s + evaluated * image_s
        trials.append(cost)
    return SweepCost(spec, trials, absent or {}, infos)
