"""Periodic convolutions (Hoogeboom et al. 2019, §3.3): circular k×k convolutions inverted in
the Fourier domain, where the convolution is a C×C matrix per frequency."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flowbench.flows.base import Flow, exact_conv2d
from flowbench.flows.glow import channel_mixer, glow_architecture
from flowbench.flows.registry import register_model


class PeriodicConv2d(Flow):
    """y = w ⋆ x with circular padding; log|det J| = Σ_{u,v} log|det K̂(u, v)|."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        weight = torch.zeros(channels, channels, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = torch.eye(channels)
        self.weight = nn.Parameter(weight)

    def frequency_matrices(self, height: int, width: int) -> torch.Tensor:
        """K̂ as [H, W, C_out, C_in] complex128: the kernel as a circular convolution, FFT'd."""
        k, r = self.kernel_size, self.kernel_size // 2
        # cross-correlation tap (a, b) reads x[i + a − r]: convolution tap ((r − a) mod H, …);
        # on inputs smaller than the kernel several taps wrap onto one position and add up
        rows = ((r - torch.arange(k)) % height)[:, None].expand(k, k)
        cols = ((r - torch.arange(k)) % width)[None, :].expand(k, k)
        g = self.weight.new_zeros(height, width, *self.weight.shape[:2], dtype=torch.float64)
        g = g.index_put((rows, cols), self.weight.double().permute(2, 3, 0, 1), accumulate=True)
        return torch.fft.fft2(g, dim=(0, 1))

    def forward(self, x):
        r = self.kernel_size // 2
        y = exact_conv2d(F.pad(x, (r, r, r, r), mode="circular"), self.weight)
        logdet = torch.linalg.slogdet(self.frequency_matrices(*x.shape[2:]))[1].sum()
        return y, logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, y):
        k_hat = self.frequency_matrices(*y.shape[2:])
        y_hat = torch.fft.fft2(y.double()).permute(0, 2, 3, 1).unsqueeze(-1)  # [B, H, W, C, 1]
        x_hat = torch.linalg.solve(k_hat, y_hat).squeeze(-1).permute(0, 3, 1, 2)
        return torch.fft.ifft2(x_hat).real.to(y.dtype)


@register_model(
    "periodic",
    paper="Hoogeboom et al., Emerging Convolutions (ICML 2019), periodic",
    year=2019,
    code="https://github.com/ehoogeboom/emerging",
    tiny={"depth": 1, "levels": 2, "hidden_channels": 8},
)
def build_periodic(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    kernel_size=3,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Hoogeboom et al. 2019: ActNorm → periodic (Fourier) conv → affine coupling."""
    mixer = channel_mixer(partial(PeriodicConv2d, kernel_size=kernel_size))
    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
