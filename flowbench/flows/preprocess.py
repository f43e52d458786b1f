"""From uint8 pixels to the space a flow models, with the original papers' dequantisation.

Pixels are reduced to ``n_bits`` (Glow uses 5 bits on CelebA-HQ), uniformly dequantised and
scaled to [0, 1): x = (⌊p / 2^(8−n_bits)⌋ + u) / 2^n_bits. A preprocessing flow then maps x to
model space — Glow centres it (x − ½), RealNVP takes logit(α + (1−2α)·x) — and its log-det
enters the density, so bits/dim are comparable across both.
"""

from __future__ import annotations

import math

import torch

from flowbench.flows.base import Flow


def dequantize(
    pixels: torch.Tensor, n_bits: int = 8, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
):
    """uint8 [B, C, H, W] → ``dtype`` in [0, 1) with uniform noise in each bin."""
    bins = 2**n_bits
    x = torch.div(pixels.to(torch.int64), 2 ** (8 - n_bits), rounding_mode="floor").to(dtype)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)
    return (x + noise) / bins


def quantize(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """float in [0, 1) → uint8 on the full 0–255 scale (the inverse of ``dequantize`` up to noise)."""
    bins = 2**n_bits
    levels = torch.floor(x * bins).clamp(0, bins - 1)
    return (levels * 2 ** (8 - n_bits)).to(torch.uint8)


def bits_per_dim(log_prob_x: torch.Tensor, num_dims: int, n_bits: int) -> torch.Tensor:
    """Bits/dim of discrete pixels from the density of x ∈ [0,1)^D: −(log p(x) − D·log 2^n_bits)/(D·log 2)."""
    return -(log_prob_x - num_dims * n_bits * math.log(2)) / (num_dims * math.log(2))


class CenterPreprocess(Flow):
    """Glow's y = x − ½ (log-det 0)."""

    def forward(self, x):
        return x - 0.5, x.new_zeros(x.shape[0])

    def inverse(self, y):
        return y + 0.5


class LogitPreprocess(Flow):
    """RealNVP's y = logit(α + (1 − 2α)·x), which keeps the logit away from 0 and 1."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return y, logdet

    def inverse(self, y):
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
