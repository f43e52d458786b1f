"""Glow's invertible 1×1 convolution, plain and LU-decomposed."""

from __future__ import annotations

import torch
from torch import nn

from flowbench.flows.base import Flow, exact_conv2d, spatial_size


def random_rotation(channels: int) -> torch.Tensor:
    """A random orthogonal matrix with det +1 (Glow's initialisation)."""
    q, _ = torch.linalg.qr(torch.randn(channels, channels))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return exact_conv2d(x, weight[:, :, None, None], bias)


class InvConv1x1(Flow):
    """y = W x at every pixel; log|det| = H·W·log|det W| (slogdet in float64 for stability)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(random_rotation(channels))

    def matrix(self) -> torch.Tensor:
        return self.weight

    def log_abs_det(self) -> torch.Tensor:
        return torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)

    def forward(self, x):
        logdet = spatial_size(x) * self.log_abs_det()
        return conv1x1(x, self.weight), logdet.expand(x.shape[0])

    def inverse(self, y):
        return conv1x1(y, torch.linalg.inv(self.weight.double()).to(y.dtype))


class InvConv1x1LU(Flow):
    """W = P·L·(U + diag(sign·exp(log_s))): log|det W| = Σ log_s costs nothing to compute."""

    # buffers (register_buffer in __init__)
    permutation: torch.Tensor
    sign_s: torch.Tensor
    lower_mask: torch.Tensor
    eye: torch.Tensor

    def __init__(self, channels: int):
        super().__init__()
        p, lower, upper = torch.linalg.lu(random_rotation(channels))
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diag.abs()))

    def parameter_masks(self) -> dict[str, torch.Tensor]:
        # only L's strict lower and U's strict upper triangle enter W (the diagonals are 1 and exp(log_s))
        return {"lower": self.lower_mask, "upper": self.lower_mask.T}

    def matrix(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def log_abs_det(self) -> torch.Tensor:
        return self.log_s.sum()

    def forward(self, x):
        logdet = spatial_size(x) * self.log_abs_det()
        return conv1x1(x, self.matrix()), logdet.expand(x.shape[0])

    def inverse(self, y):
        return conv1x1(y, torch.linalg.inv(self.matrix().double()).to(y.dtype))


def make_conv1x1(channels: int, lu: bool) -> InvConv1x1 | InvConv1x1LU:
    return InvConv1x1LU(channels) if lu else InvConv1x1(channels)
