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

from flowbench.flows.base import Flow, FlowSequence, exact_conv2d, spatial_size
from flowbench.flows.conv1x1 import make_conv1x1


class MaskedAutoregressiveConv2d(Flow):
    """One autoregressive k×k convolution; ``flipped`` makes it depend on later pixels instead.

    The inverse solves for the pixels wavefront by wavefront: pixel (i, j) only depends on
    pixels (i', j') with (r+1)·i' + j' < (r+1)·i + j, so every pixel on the line
    (r+1)·i + j = t is solved at once (a triangular C×C system per pixel, batched over images
    and pixels): (r+1)(H−1)+W steps instead of H·W. The flipped layer runs the same in reverse.
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
        # flipping channels, rows and columns turns 'earlier' into 'later'
        self.register_buffer("mask", mask.flip(0, 1, 2, 3) if flipped else mask)
        # kernel taps on pixels solved before the centre (as ints: no device sync to index with)
        rows, cols = torch.nonzero(self.mask[0, 0], as_tuple=True)
        self.earlier_taps = (rows.tolist(), cols.tolist())
        self._wavefronts: dict = {}

    def kernel(self) -> torch.Tensor:
        """The masked kernel with exp(log_diag) on the centre diagonal."""
        r = self.kernel_size // 2
        centre = torch.zeros_like(self.weight)
        centre[:, :, r, r] = torch.diag(torch.exp(self.log_diag))
        return self.weight * self.mask + centre

    def forward(self, x):
        y = exact_conv2d(x, self.kernel(), padding=self.kernel_size // 2)
        logdet = spatial_size(x) * self.log_diag.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        r = self.kernel_size // 2
        batch, channels, height, width = y.shape
        w = self.kernel().to(y.dtype)
        rows, cols = self.earlier_taps
        # x_p = L⁻¹(y_p − Σ W_tap·x_tap) with L the triangular centre: one matrix over
        # [earlier taps, y_p], so each wavefront is a gather, a matmul and a scatter
        eye = torch.eye(channels, dtype=y.dtype, device=y.device)[:, :, None]
        taps = torch.cat([-w[:, :, rows, cols], eye], 2)
        n_taps = taps.shape[2]
        solve = torch.linalg.solve_triangular(w[:, :, r, r], taps.reshape(channels, -1), upper=self.flipped)
        solve = solve.view(channels, channels, n_taps).transpose(1, 2).reshape(channels, n_taps * channels)
        # pixel-major buffer [pixels, C, B]: a wavefront's taps gather into [P, taps·C, B] with no
        # copy, one batched matmul solves them, whole rows scatter back. The buffer holds y where
        # pixels are unsolved and x where solved; a pixel's own centre tap still holds its y
        buffer = F.pad(y, (r, r, r, r)).permute(2, 3, 1, 0).reshape(-1, channels, batch).contiguous()
        for taps_idx, centre_idx in self._wavefront_indices(height, width, y.device):
            patches = buffer.index_select(0, taps_idx).view(-1, n_taps * channels, batch)
            buffer.index_copy_(0, centre_idx, torch.matmul(solve, patches))
        x = buffer.view(height + 2 * r, width + 2 * r, channels, batch).permute(3, 2, 0, 1)
        return x[:, :, r : r + height, r : r + width].contiguous()

    def _wavefront_indices(self, height: int, width: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per wavefront, in solving order: flat indices into the padded image of each pixel's
        taps (pixels solved before it, then itself), and of the pixels themselves."""
        key = (height, width, device)
        if key not in self._wavefronts:
            r = self.kernel_size // 2
            padded_width = width + 2 * r
            rows, cols = (torch.tensor([*taps, r]) for taps in self.earlier_taps)
            i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            i, j = i.flatten(), j.flatten()
            t = (r + 1) * i + j if not self.flipped else (r + 1) * (height - 1 - i) + (width - 1 - j)
            fronts = []
            for step in range(int(t.max()) + 1):
                fi, fj = i[t == step], j[t == step]
                taps = (fi[:, None] + rows) * padded_width + (fj[:, None] + cols)  # [P, taps + 1]
                fronts.append((taps.flatten().to(device), ((fi + r) * padded_width + fj + r).to(device)))
            self._wavefronts[key] = fronts
        return self._wavefronts[key]


class EmergingConv2d(FlowSequence):
    """1×1 conv, then a k×k autoregressive conv and its flip: an invertible k×k convolution."""

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = False):
        super().__init__(
            make_conv1x1(channels, lu),
            MaskedAutoregressiveConv2d(channels, kernel_size, flipped=False),
            MaskedAutoregressiveConv2d(channels, kernel_size, flipped=True),
        )
