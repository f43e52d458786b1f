"""The invertible n×n convolution of Truong et al. (Future Internet 2021), Algorithm 1.

An invertible shift function S(x)_c = α_c·x_c + β_c followed by Glow's 1×1 convolution;
log|det| = H·W·Σ_c log|α_c| + H·W·log|det W|.
"""

from __future__ import annotations

import torch
from torch import nn

from flowbench.flows.base import Flow, spatial_size
from flowbench.flows.conv1x1 import conv1x1, make_conv1x1


class InvertibleShift(Flow):
    """S(x)_{c,i,j} = α_c·x_{c,i,j} + β_c with α initialised to 1 and β to 0.

    |α| is kept at least ``min_abs_alpha`` (sign kept) so S stays invertible whatever
    the optimiser does to the raw parameter.
    """

    def __init__(self, channels: int, min_abs_alpha: float = 1e-3):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.min_abs_alpha = min_abs_alpha

    def effective_alpha(self) -> torch.Tensor:
        sign = torch.where(self.alpha < 0, -1.0, 1.0).to(self.alpha)
        return sign * self.alpha.abs().clamp(min=self.min_abs_alpha)

    def forward(self, x):
        alpha = self.effective_alpha()
        y = x * alpha.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        logdet = spatial_size(x) * alpha.abs().log().sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return (y - self.beta.view(1, -1, 1, 1)) / self.effective_alpha().view(1, -1, 1, 1)


class InvertibleNxNConv(Flow):
    """Shift then 1×1 conv, run as one fused 1×1 conv: W·(α⊙x + β) = (W·diag α)·x + W·β.

    Fusing is why this layer costs about what a plain 1×1 step costs (the paper's claim).
    """

    def __init__(self, channels: int, lu: bool = False):
        super().__init__()
        self.shift = InvertibleShift(channels)
        self.conv = make_conv1x1(channels, lu)

    def forward(self, x):
        alpha = self.shift.effective_alpha()
        w = self.conv.matrix()
        y = conv1x1(x, w * alpha[None, :], w @ self.shift.beta)
        logdet = spatial_size(x) * (alpha.abs().log().sum() + self.conv.log_abs_det())
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return self.shift.inverse(self.conv.inverse(y))
