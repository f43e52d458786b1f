"""Emerging convolutions (Hoogeboom, van den Berg & Welling, ICML 2019).

A k×k convolution whose kernel is masked so that output (c, i, j) depends only on inputs
earlier in (row, column, channel) order and on input (c, i, j) itself: the Jacobian is
triangular, its log-det is H·W·Σ_c log|w[c, c, centre]|. Two of them, the second the flip
of the first, give a full k×k receptive field; a 1×1 conv in front mixes channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowbench.flows.base import Flow, FlowSequence, spatial_size
from flowbench.flows.conv1x1 import make_conv1x1


def _flip(x: torch.Tensor) -> torch.Tensor:
    """Reverse channel, row and column order: turns the 'earlier' mask into 'later'."""
    return x.flip(1, 2, 3)


class MaskedAutoregressiveConv2d(Flow):
    """One autoregressive k×k convolution; ``flipped`` makes it depend on later pixels instead.

    The inverse solves for the pixels wavefront by wavefront: pixel (i, j) only depends on
    pixels (i', j') with (r+1)·i' + j' < (r+1)·i + j, so every pixel on the line
    (r+1)·i + j = t is solved at once (one triangular C×C solve per pixel, batched over
    images and pixels). That is (r+1)(H−1)+W steps instead of H·W.
    """

    def __init__(self, channels: int, kernel_size: int = 3, flipped: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        k, r = kernel_size, kernel_size // 2
        self.kernel_size, self.flipped = k, flipped
        self.weight = nn.Parameter(torch.zeros(channels, channels, k, k))
        self.log_diag = nn.Parameter(torch.zeros(channels))
        mask = torch.zeros(channels, channels, k, k)
        mask[:, :, :r, :] = 1  # rows above
        mask[:, :, r, :r] = 1  # same row, to the left
        mask[:, :, r, r] = torch.tril(torch.ones(channels, channels), -1)  # earlier channels
        self.register_buffer("mask", mask)
        self._wavefronts: dict = {}

    def kernel(self) -> torch.Tensor:
        r = self.kernel_size // 2
        w = self.weight * self.mask
        centre = torch.zeros_like(w)
        centre[:, :, r, r] = torch.diag(torch.exp(self.log_diag))
        return w + centre

    def forward(self, x):
        w = self.kernel()
        if self.flipped:
            w = w.flip(0, 1, 2, 3)  # equal to _flip(conv(_flip(x), w)) for odd k, zero padding
        y = F.conv2d(x, w, padding=self.kernel_size // 2)
        logdet = spatial_size(x) * self.log_diag.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        if self.flipped:
            return _flip(self._solve(_flip(y)))
        return self._solve(y)

    def _wavefront_indices(self, height: int, width: int, device) -> list:
        key = (height, width, device)
        if key not in self._wavefronts:
            r = self.kernel_size // 2
            i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            t = ((r + 1) * i + j).flatten()
            i, j = i.flatten(), j.flatten()
            fronts = [(i[t == s].to(device), j[t == s].to(device)) for s in range(int(t.max()) + 1)]
            self._wavefronts[key] = fronts
        return self._wavefronts[key]

    def _solve(self, y: torch.Tensor) -> torch.Tensor:
        r = self.kernel_size // 2
        batch, channels, height, width = y.shape
        w = self.kernel().to(y.dtype)
        rows, cols = torch.nonzero(self.mask[0, 0], as_tuple=True)  # taps on earlier pixels
        w_earlier = w[:, :, rows, cols]  # [C_out, C_in, taps]
        w_centre = w[:, :, r, r]  # lower triangular, exp(log_diag) on the diagonal
        x_pad = y.new_zeros(batch, channels, height + 2 * r, width + 2 * r)
        for i, j in self._wavefront_indices(height, width, y.device):
            patches = x_pad[:, :, i[:, None] + rows, j[:, None] + cols]  # [B, C, P, taps]
            rhs = y[:, :, i, j] - torch.einsum("bcpn,ocn->bop", patches, w_earlier)
            x_pad[:, :, i + r, j + r] = torch.linalg.solve_triangular(w_centre, rhs, upper=False)
        return x_pad[:, :, r : r + height, r : r + width]


class EmergingConv2d(FlowSequence):
    """1×1 conv, then a k×k autoregressive conv and its flip: an invertible k×k convolution."""

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = False):
        super().__init__(
            make_conv1x1(channels, lu),
            MaskedAutoregressiveConv2d(channels, kernel_size, flipped=False),
            MaskedAutoregressiveConv2d(channels, kernel_size, flipped=True),
        )
