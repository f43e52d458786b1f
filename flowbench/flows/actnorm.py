"""ActNorm (Kingma & Dhariwal 2018): a per-channel affine map with data-dependent initialisation."""

from __future__ import annotations

import torch
from torch import nn

from flowbench.flows.base import Flow, spatial_size


class ActNorm(Flow):
    """y = (x + bias) · exp(log_scale), per channel.

    On the first training batch, bias and scale are set so each output channel has zero mean
    and unit variance (openai/glow, tfops.py, ``actnorm`` with ``init``). Whether that happened
    is a Python flag, ``is_initialized``, which ``forward`` reads: reading a tensor there would
    wait for the GPU at every step. The flag is mirrored in the ``initialized`` buffer, which
    travels with the state dict (the key of older checkpoints too): loading a state dict sets
    the flag from it, so a loaded model is never re-initialised from whatever batch it sees first.
    """

    initialized: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = scale
        self.register_buffer("initialized", torch.tensor(False))
        self.is_initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.to(self.bias.dtype)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(torch.log(self.scale / (std + 1e-6)))
        self.mark_initialized()

    def mark_initialized(self) -> None:
        """From now on the parameters are the layer's own: no data-dependent initialisation."""
        self.initialized.fill_(True)
        self.is_initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_initialized = bool(self.initialized)  # once per load, not per step

    def forward(self, x):
        if self.training and not self.is_initialized:
            self.initialize(x)
        # in x's dtype: inside a bfloat16 coupling network, float32 parameters would promote every
        # activation after it to float32 (twice the memory, and the next conv casts it back)
        y = (x + self.bias.to(x.dtype)) * torch.exp(self.log_scale).to(x.dtype)
        logdet = spatial_size(x) * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return y * torch.exp(-self.log_scale) - self.bias
