"""The layer contract: ``y, logdet = layer(x)`` and ``x = layer.inverse(y)``; logdet is [batch] nats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def exact_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0):
    """``F.conv2d`` in ``x``'s own precision. cuDNN runs float32 convolutions in TF32 by default
    (~1e-3 relative error); an invertible layer must compute the map its log-det and inverse
    describe, so TF32 is off for it (the coupling networks keep the user's setting)."""
    if not x.is_cuda:
        return F.conv2d(x, weight, bias, padding=padding)
    cudnn = torch.backends.cudnn
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        # torch ≥ 2.9 sets it per operation; its legacy flag raises once conv and rnn differ
        owner, flag, exact = cudnn.conv, "fp32_precision", "ieee"
    else:
        owner, flag, exact = cudnn, "allow_tf32", False
    previous = getattr(owner, flag)
    setattr(owner, flag, exact)
    try:
        return F.conv2d(x, weight, bias, padding=padding)
    finally:
        setattr(owner, flag, previous)


class Flow(nn.Module):
    """An invertible map with a tractable log|det J|. Subclasses define ``forward`` and ``inverse``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class FlowSequence(Flow):
    """Layers applied in order; log-dets add up, the inverse runs them backwards."""

    def __init__(self, *layers: Flow):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class FlowStep(FlowSequence):
    """One step of flow (e.g. ActNorm → invertible conv → coupling): the unit of gradient
    checkpointing. With ``checkpointed`` set, training keeps only the step's input and recomputes
    its inside during backward, so activation memory stops growing with the coupling width."""

    checkpointed = False

    def forward(self, x):
        if self.checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def spatial_size(x: torch.Tensor) -> int:
    """H·W: a per-channel map applied at every pixel contributes H·W times its log-det."""
    return x.shape[2] * x.shape[3]
