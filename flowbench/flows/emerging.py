"""Emerging convolutions (Hoogeboom, van den Berg & Welling, ICML 2019), as in the authors' code.

Reproduces github.com/ehoogeboom/emerging, file ``conv2d/conv2d.py`` (r = k // 2 below):

- First k×k conv: the mask of ``get_conv_square_ar_mask(k, k, C, C)`` zeroes the rows and the
  columns before the centre, keeping the (r+1)×(r+1) quadrant of taps: output pixel (i, j) sees
  inputs (i+a, j+b), 0 ≤ a, b ≤ r. On the centre tap it keeps ``get_linear_ar_mask(C, C)``
  (``zerodiagonal=False``): output channel c sees input channels ≤ c, strictly lower ones
  through free weights and itself through the diagonal weight w[c, c, centre], the per-channel
  scale: log|det| = H·W·Σ_c log|w[c, c, centre]|.
- Second k×k conv: ``invertible_conv2D_emerging`` masks it with ``mask[::-1, ::-1, ::-1, ::-1]``,
  the first mask flipped in rows, columns and both channel axes (offsets −r..0, upper-triangular
  centre). The composition reaches offsets −r..r in both directions: exactly the k×k square.
- One bias of C entries after the second conv, and weights from ``get_conv_weight_np``
  (N(0, 0.02²), plus the identity on the centre tap), as in ``invertible_conv2D_emerging``.
- The forward runs only the quadrant, padded on one side (``forward_fast``); ``model.py``'s
  ``revnet2d_step`` (``flow_permutation == 3``) puts the invertible 1×1 conv in front.

The original inverts each conv pixel by pixel in Cython (``conv2d/inverses/inverse_op_cython.pyx``,
``inverse_conv``); here whole wavefronts are solved at once (``MaskedAutoregressiveConv2d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowbench.flows.base import Flow, FlowSequence, exact_conv2d, spatial_size
from flowbench.flows.conv1x1 import make_conv1x1
from flowbench.flows.glow import TINY, glow_architecture
from flowbench.flows.registry import register_model


def square_ar_mask(channels: int, kernel_size: int, flipped: bool) -> torch.Tensor:
    """0/1 mask [C_out, C_in, k, k] of ``get_conv_square_ar_mask`` (``zerodiagonal=False``) in
    torch's layout; ``flipped`` is the ``mask[::-1, ::-1, ::-1, ::-1]`` of the second conv."""
    r = kernel_size // 2
    mask = torch.ones(channels, channels, kernel_size, kernel_size)
    mask[:, :, :r, :] = 0
    mask[:, :, :, :r] = 0
    mask[:, :, r, r] = torch.tril(torch.ones(channels, channels))  # output c sees inputs ≤ c
    return mask.flip(0, 1, 2, 3) if flipped else mask


class MaskedAutoregressiveConv2d(Flow):
    """One masked k×k conv of an emerging convolution: output pixel (i, j) depends on input
    pixels (i+a, j+b), 0 ≤ a, b ≤ r, or with ``flipped`` on (i−a, j−b); ``bias`` adds the
    per-channel bias (the original puts it on the second conv only).

    The inverse solves for the pixels wavefront by wavefront: every pixel another depends on has
    a larger (flipped: smaller) i + j, so all pixels of one anti-diagonal i + j = t are solved at
    once (a triangular C×C system per pixel, batched over images and pixels), t from H+W−2 down
    to 0 (flipped: up): H+W−1 steps instead of H·W.
    """

    mask: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, channels: int, kernel_size: int = 3, flipped: bool = False, bias: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        k, r = kernel_size, kernel_size // 2
        self.kernel_size, self.flipped = k, flipped
        weight = 0.02 * torch.randn(channels, channels, k, k)
        weight[:, :, r, r] += torch.eye(channels)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.register_buffer("mask", square_ar_mask(channels, k, flipped))
        # the quadrant's taps other than the centre, as kernel indices; ints, computed once, so
        # the inverse indexes with no device sync
        spatial = self.mask.amax((0, 1))
        spatial[r, r] = 0
        rows, cols = torch.nonzero(spatial, as_tuple=True)
        self.off_centre_taps = (rows.tolist(), cols.tolist())
        self._wavefronts: dict = {}

    def parameter_masks(self) -> dict[str, torch.Tensor]:
        return {"weight": self.mask}

    def kernel(self) -> torch.Tensor:
        """The masked k×k kernel."""
        return self.weight * self.mask

    def log_abs_diagonal(self) -> torch.Tensor:
        """log|w[c, c, centre]| per channel: the diagonal of the triangular Jacobian."""
        r = self.kernel_size // 2
        return torch.diagonal(self.weight[:, :, r, r]).abs().log()

    def forward(self, x):
        # the original's forward_fast: only the (r+1)×(r+1) quadrant, zero-padded on its side
        r = self.kernel_size // 2
        if self.flipped:
            quadrant, padding = self.kernel()[:, :, : r + 1, : r + 1], (r, 0, r, 0)
        else:
            quadrant, padding = self.kernel()[:, :, r:, r:], (0, r, 0, r)
        y = exact_conv2d(F.pad(x, padding), quadrant, self.bias)
        logdet = spatial_size(x) * self.log_abs_diagonal().sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        r = self.kernel_size // 2
        batch, channels, height, width = y.shape
        w = self.kernel().to(y.dtype)
        if self.bias is not None:
            y = y - self.bias.to(y.dtype)[:, None, None]
        rows, cols = self.off_centre_taps
        # x_p = L⁻¹(y_p − Σ W_tap·x_tap) with L the triangular centre: one matrix over
        # [off-centre taps (solved before p), y_p], so each wavefront is a gather, a matmul and a scatter
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
            rows, cols = (torch.tensor([*taps, r]) for taps in self.off_centre_taps)
            i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            i, j = i.flatten(), j.flatten()
            # a pixel's taps lie on larger anti-diagonals i + j (flipped: smaller): solve those first
            t = i + j if self.flipped else (height - 1 - i) + (width - 1 - j)
            fronts = []
            for step in range(height + width - 1):
                fi, fj = i[t == step], j[t == step]
                taps = (fi[:, None] + rows) * padded_width + (fj[:, None] + cols)  # [P, taps + 1]
                fronts.append((taps.flatten().to(device), ((fi + r) * padded_width + fj + r).to(device)))
            self._wavefronts[key] = fronts
        return self._wavefronts[key]


class EmergingConv2d(FlowSequence):
    """1×1 conv, then a quadrant-masked k×k conv and its flip, then a bias: an invertible
    convolution whose receptive field is exactly the k×k square (``invertible_1x1_conv`` followed
    by ``invertible_conv2D_emerging`` in the original's ``revnet2d_step``)."""

    def __init__(self, channels: int, kernel_size: int = 3, lu: bool = False):
        super().__init__(
            make_conv1x1(channels, lu),
            MaskedAutoregressiveConv2d(channels, kernel_size, flipped=False),
            MaskedAutoregressiveConv2d(channels, kernel_size, flipped=True, bias=True),
        )


@register_model(
    "emerging",
    paper="Hoogeboom et al., Emerging Convolutions (ICML 2019)",
    year=2019,
    code="https://github.com/ehoogeboom/emerging",
    tiny=TINY,
)
def build_emerging(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    lu=False,
    kernel_size=3,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Hoogeboom et al. 2019: ActNorm → emerging k×k conv → affine coupling."""

    def mixer(channels, size):
        return EmergingConv2d(channels, kernel_size=kernel_size, lu=lu)

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
