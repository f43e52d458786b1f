"""Measurement: bits/dim on a split, training FLOPs and peak memory (latency: ``flowbench.trial.latency``)."""

from __future__ import annotations

import resource

import numpy as np
import torch

from flowbench.flows.models import FlowModel
from flowbench.trial.settings import Shard


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


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
