"""The training step: the optimiser and its schedule, one step on a batch, the loss read at evaluations."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable

import torch

from flowbench.flows.models import FlowModel
from flowbench.trial.settings import Optimizer, Shard


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


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
