"""Squeeze, split with a learned prior, and the multi-scale architecture (Dinh et al. 2017).

A ``Level`` is the flow at one scale: its steps, then either a split (half the channels are
factored out and standardised by a prior conditioned on the other half) or, at the top, a
learned prior. Levels nest, so a ``Level`` maps its input to ε of the *same shape*, standard
normal under the model, with every factored-out part put back where it left: the whole
multi-scale flow is one layer of the protocol in ``flows.base``.
"""

from __future__ import annotations

import torch
from torch import nn

from flowbench.flows.base import Flow, FlowSequence
from flowbench.flows.coupling import ZeroConv2d


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, 4C, H/2, W/2], each 2×2 block into channels (Glow's order)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"cannot squeeze an odd spatial size {h}×{w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


class Squeeze(Flow):
    def forward(self, x):
        return squeeze(x), x.new_zeros(x.shape[0])

    def inverse(self, y):
        return unsqueeze(y)


class SplitPrior(nn.Module):
    """p(z | h) = N(μ(h), exp(log σ(h))²) from a zero-initialised conv (Glow's split2d_prior);
    ``learned=False`` is RealNVP's standard normal. Maps z to ε = (z − μ)/σ. Conditional on h,
    so not a layer itself: a part of the ``Level`` that splits."""

    def __init__(self, cond_channels: int, z_channels: int, learned: bool = True):
        super().__init__()
        self.conv = ZeroConv2d(cond_channels, 2 * z_channels) if learned else None

    def _mean_log_std(self, h):
        assert self.conv is not None, "a standard normal prior has no mean or scale to compute"
        out = self.conv(h)
        return out[:, 0::2], out[:, 1::2]

    def forward(self, z, h):
        if self.conv is None:
            return z, z.new_zeros(z.shape[0])
        mean, log_std = self._mean_log_std(h)
        return (z - mean) * torch.exp(-log_std), -log_std.flatten(1).sum(1)

    def inverse(self, eps, h):
        if self.conv is None:
            return eps
        mean, log_std = self._mean_log_std(h)
        return eps * torch.exp(log_std) + mean


class TopPrior(Flow):
    """A learned per-channel normal for the last level (Glow's ``learntop``), or N(0, I)."""

    def __init__(self, channels: int, learned: bool = True):
        super().__init__()
        self.learned = learned
        if learned:
            self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, z):
        if not self.learned:
            return z, z.new_zeros(z.shape[0])
        logdet = -self.log_std.sum() * z.shape[2] * z.shape[3]
        return (z - self.mean) * torch.exp(-self.log_std), logdet.expand(z.shape[0])

    def inverse(self, eps):
        return eps * torch.exp(self.log_std) + self.mean if self.learned else eps


class Level(Flow):
    """Steps at one scale, then a split into a deeper ``inner`` level, or the top prior."""

    def __init__(self, steps: FlowSequence, prior: SplitPrior | TopPrior, inner: Level | None = None):
        super().__init__()
        self.steps, self.prior, self.inner = steps, prior, inner
        self.n_squeezes = sum(isinstance(layer, Squeeze) for layer in steps.layers)

    def forward(self, x):
        y, logdet = self.steps(x)
        if self.inner is None:
            eps, ld = self.prior(y)
        else:
            keep, z = y.chunk(2, dim=1)
            z_eps, ld = self.prior(z, keep)
            keep_eps, ld_inner = self.inner(keep)
            eps, ld = torch.cat([keep_eps, z_eps], dim=1), ld + ld_inner
        for _ in range(self.n_squeezes):
            eps = unsqueeze(eps)
        return eps, logdet + ld

    def inverse(self, eps):
        for _ in range(self.n_squeezes):
            eps = squeeze(eps)
        if self.inner is None:
            assert isinstance(self.prior, TopPrior), "the last level ends in the top prior"
            y = self.prior.inverse(eps)
        else:
            assert isinstance(self.prior, SplitPrior), "a level that splits has a split prior"
            keep_eps, z_eps = eps.chunk(2, dim=1)
            keep = self.inner.inverse(keep_eps)
            y = torch.cat([keep, self.prior.inverse(z_eps, keep)], dim=1)
        return self.steps.inverse(y)


def multiscale_flow(image_shape, levels: int, squeezes: int, make_steps, learned_prior: bool) -> Level:
    """``levels`` nested levels, the first ``squeezes`` of them starting with a squeeze;
    ``make_steps(level, channels)`` returns that level's FlowSequence. Every level but the last
    factors out half its channels (``SplitPrior``); the last ends in a ``TopPrior``."""
    channels, height, width = image_shape
    if levels < 1 or height % 2**squeezes or width % 2**squeezes:
        raise ValueError(f"{levels} levels need H and W divisible by {2**squeezes}, got {height}×{width}")

    def build(level: int, c: int) -> Level:
        steps = make_steps(level, c)
        c_out = c * 4 if any(isinstance(s, Squeeze) for s in steps.layers) else c
        if level == levels - 1:
            return Level(steps, TopPrior(c_out, learned_prior))
        half = c_out // 2
        return Level(steps, SplitPrior(half, c_out - half, learned_prior), build(level + 1, half))

    return build(0, channels)
