"""Whole image flows: a preprocessing flow, then a multi-scale ``Level`` tree.

``encode(x)`` returns ε with x's shape, standard normal under the model (the learned priors
are folded into the log-det), so ``log_prob(x) = log N(ε; 0, I) + logdet`` for every model.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from flowbench.flows.actnorm import ActNorm
from flowbench.flows.base import Flow, FlowSequence, FlowStep, effective_parameter_count
from flowbench.flows.conv1x1 import make_conv1x1
from flowbench.flows.coupling import AffineCoupling
from flowbench.flows.emerging import EmergingConv2d
from flowbench.flows.multiscale import Level, SplitPrior, Squeeze, TopPrior
from flowbench.flows.periodic import PeriodicConv2d
from flowbench.flows.preprocess import (
    CenterPreprocess,
    LogitPreprocess,
    bits_per_dim,
    dequantize,
    quantize,
)
from flowbench.flows.shift import InvertibleNxNConv


def standard_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    return -0.5 * (eps**2 + math.log(2 * math.pi)).flatten(1).sum(1)


class FlowModel(nn.Module):
    def __init__(self, image_shape, preprocess: Flow, flow: Level, n_bits: int = 8):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.preprocess, self.flow, self.n_bits = preprocess, flow, n_bits

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.encode(x)

    def decode(self, eps: torch.Tensor) -> torch.Tensor:
        return self.flow.decode(eps)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats per sample, x in model (preprocessed) space."""
        eps, logdet = self.encode(x)
        return standard_normal_log_prob(eps) + logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log_prob``: the call that DistributedDataParallel wraps in a data-parallel trial."""
        return self.log_prob(x)

    @torch.inference_mode()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None):
        """n samples in model space; ε ~ N(0, T²·I) (Glow's reduced-temperature sampling)."""
        device = next(self.parameters()).device
        eps = torch.randn((n, *self.image_shape), generator=generator, device=device)
        return self.decode(eps * temperature)

    def images(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space tensors → uint8 images [B, C, H, W]."""
        return quantize(self.preprocess.inverse(y).clamp(0, 1 - 1e-6), self.n_bits)

    def preprocess_pixels(self, pixels: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 pixels → (model-space x, log-det of the preprocessing), dequantised."""
        dtype = next(self.parameters()).dtype
        return self.preprocess(dequantize(pixels, self.n_bits, generator, dtype))

    def bits_per_dim(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Bits/dim per image of uint8 pixels, with the papers' dequantisation."""
        x, logdet = self.preprocess_pixels(pixels, generator)
        return self.bits_per_dim_of(self.log_prob(x), logdet)

    def bits_per_dim_of(self, log_prob: torch.Tensor, preprocess_logdet: torch.Tensor) -> torch.Tensor:
        """Bits/dim from ``log_prob`` of preprocessed images and the preprocessing's log-det."""
        return bits_per_dim(log_prob + preprocess_logdet, math.prod(self.image_shape), self.n_bits)

    def num_parameters(self) -> int:
        """Parameters that can change the map (see ``flows.base``): what every report counts."""
        return effective_parameter_count(self)

    def num_allocated_parameters(self) -> int:
        """Every entry of every parameter tensor, masked-out ones included (memory, not capacity)."""
        return sum(p.numel() for p in self.parameters())

    def set_coupling_precision(self, dtype: torch.dtype | None) -> None:
        """Mixed precision that keeps the density exact: the coupling networks (nearly all the
        convolution work) compute in ``dtype`` (e.g. torch.bfloat16); every invertible map,
        log-det and determinant stays in the model's own precision, so log_prob is the exact
        density of the map computed. Reconstructions hold to about ``dtype``'s precision only.
        None restores full precision. Each coupling's log-det is checked against its own dense
        Jacobian (tests/flows/test_mixed_precision.py)."""
        for module in self.modules():
            if isinstance(module, AffineCoupling):
                module.net_dtype = dtype

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory: recompute each flow step's inside during backward."""
        for module in self.modules():
            if isinstance(module, FlowStep):
                module.checkpointed = enabled


def _multiscale(image_shape, levels: int, squeezes: int, make_steps, learned_prior: bool) -> Level:
    """Nested levels; ``make_steps(level, channels)`` returns that level's FlowSequence."""
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


def _glow_like(image_shape, make_mixer, depth, levels, hidden_channels, additive, n_bits) -> FlowModel:
    """Glow's architecture; ``make_mixer(channels)`` is the invertible convolution of each step."""

    def steps(level, c):
        c = 4 * c
        flow_steps = [FlowStep(ActNorm(c), make_mixer(c), AffineCoupling(c, hidden_channels, additive=additive))
                      for _ in range(depth)]
        return FlowSequence(Squeeze(), *flow_steps)

    return FlowModel(image_shape, CenterPreprocess(), _multiscale(image_shape, levels, levels, steps, True), n_bits)


def build_glow(image_shape, depth=8, levels=3, hidden_channels=128, additive=False, lu=False, n_bits=8):
    """Glow (Kingma & Dhariwal 2018): ActNorm → invertible 1×1 conv → affine coupling."""
    mixer = partial(make_conv1x1, lu=lu)
    return _glow_like(image_shape, mixer, depth, levels, hidden_channels, additive, n_bits)


def build_nxn_shift(image_shape, depth=8, levels=3, hidden_channels=128, additive=False, lu=False, n_bits=8):
    """Truong et al. 2021: ActNorm → invertible n×n conv (shift function + 1×1) → affine coupling."""
    mixer = partial(InvertibleNxNConv, lu=lu)
    return _glow_like(image_shape, mixer, depth, levels, hidden_channels, additive, n_bits)


def build_emerging(
    image_shape, depth=8, levels=3, hidden_channels=128, additive=False, lu=False, kernel_size=3, n_bits=8
):
    """Hoogeboom et al. 2019: ActNorm → emerging k×k conv → affine coupling."""
    mixer = partial(EmergingConv2d, kernel_size=kernel_size, lu=lu)
    return _glow_like(image_shape, mixer, depth, levels, hidden_channels, additive, n_bits)


def build_periodic(image_shape, depth=8, levels=3, hidden_channels=128, additive=False, kernel_size=3, n_bits=8):
    """Hoogeboom et al. 2019: ActNorm → periodic (Fourier) conv → affine coupling."""
    mixer = partial(PeriodicConv2d, kernel_size=kernel_size)
    return _glow_like(image_shape, mixer, depth, levels, hidden_channels, additive, n_bits)


def build_realnvp(image_shape, levels=2, hidden_channels=64, n_blocks=8, alpha=0.05, n_bits=8):
    """RealNVP (Dinh et al. 2017): per scale 3 checkerboard couplings, squeeze, 3 channel
    couplings, then half the channels leave; the last scale has 4 checkerboard couplings.
    ActNorm after each coupling stands in for RealNVP's batch-norm bijection."""

    def coupling(c, mask, parity):
        return FlowStep(
            AffineCoupling(c, hidden_channels, mask=mask, parity=parity, scale="tanh", n_blocks=n_blocks),
            ActNorm(c),
        )

    def steps(level, c):
        if level == levels - 1:
            return FlowSequence(*(coupling(c, "checkerboard", i % 2) for i in range(4)))
        layers = [coupling(c, "checkerboard", i % 2) for i in range(3)]
        layers.append(Squeeze())
        layers += [coupling(4 * c, "channel", i % 2) for i in range(3)]
        return FlowSequence(*layers)

    flow = _multiscale(image_shape, levels, levels - 1, steps, learned_prior=False)
    return FlowModel(image_shape, LogitPreprocess(alpha), flow, n_bits)
