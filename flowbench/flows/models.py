"""Whole image flows: a preprocessing flow, then a multi-scale ``Level`` tree. The architectures
that build them register themselves in their own modules (see ``flows.registry``).

``encode(x)`` returns ε with x's shape, standard normal under the model (the learned priors
are folded into the log-det), so ``log_prob(x) = log N(ε; 0, I) + logdet`` for every model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flowbench.flows.base import Flow, FlowStep, effective_parameter_count
from flowbench.flows.coupling import AffineCoupling
from flowbench.flows.multiscale import Level
from flowbench.flows.preprocess import bits_per_dim, dequantize, quantize


def standard_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    return -0.5 * (eps**2 + math.log(2 * math.pi)).flatten(1).sum(1)


class FlowModel(nn.Module):
    def __init__(self, image_shape, preprocess: Flow, flow: Level, n_bits: int = 8):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.preprocess, self.flow, self.n_bits = preprocess, flow, n_bits

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow(x)

    def decode(self, eps: torch.Tensor) -> torch.Tensor:
        return self.flow.inverse(eps)

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
