"""The layer protocol, stated once; every layer of ``flowbench.flows`` follows it.

A layer is a ``Flow`` (an ``nn.Module``):

- ``y, logdet = layer(x)``: the map and log|det ∂y/∂x| per sample, shape [batch], in nats.
- ``x = layer.inverse(y)``: the exact inverse, defined beside ``forward``.
- ``layer.parameter_masks()``: for an own parameter only partly free (entries the map never
  reads, e.g. fixed to zero by a mask), a 0/1 tensor of its shape marking the entries that can
  change the map. Parameters not named there count whole, so a layer must not hold a parameter
  its map never reads at all; buffers never count. ``effective_parameter_count`` sums this over
  a module tree: it is the count every report of flowbench gives.
- A training step's ``forward`` and backward read nothing back from the device (no ``.item()``,
  ``bool(tensor)``, ``.tolist()``, ``.cpu()``; state such as "initialised yet" is a Python
  attribute), so a step on a GPU never waits for it.

Layers compose (``FlowSequence``, ``FlowStep``, the multi-scale ``Level``) into layers; a whole
model (``flows.models.FlowModel``) is a preprocessing layer and one multi-scale layer. Modules a
layer uses inside (coupling networks, a split's conditional prior) are plain ``nn.Module``s: their
parameters count whole.
"""

from __future__ import annotations

from typing import cast

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
    # cudnn.conv is made when torch runs (a module-class attribute): not in the source mypy reads
    conv_settings = getattr(cudnn, "conv", None)
    owner: object
    exact: str | bool
    if hasattr(conv_settings, "fp32_precision"):
        # torch ≥ 2.9 sets it per operation; its legacy flag raises once conv and rnn differ
        owner, flag, exact = conv_settings, "fp32_precision", "ieee"
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

    def parameter_masks(self) -> dict[str, torch.Tensor]:
        """{name of an own parameter: 0/1 mask of its entries that can change the map}."""
        return {}


def effective_parameter_count(module: nn.Module) -> int:
    """Parameters that can change the map: masked-out entries and buffers do not count."""
    total = 0
    for sub in module.modules():
        masks = sub.parameter_masks() if isinstance(sub, Flow) else {}
        for name, param in sub.named_parameters(recurse=False):
            total += int(masks[name].count_nonzero()) if name in masks else param.numel()
    return total


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
            y = cast(Flow, layer).inverse(y)  # ModuleList yields Modules: these are the Flows given to __init__
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
