"""FInC Flow (Kallappa, Nagar & Varma, VISAPP 2023) and CInC Flow (Nagar, Dufraisse & Varma, TPM
workshop at UAI 2021): k×k convolutions zero-padded on two sides only, so that each output pixel
reads inputs up to and including itself in one corner's raster order: a triangular Jacobian.

FInC follows github.com/aditya-v-kallappa/FInCFlow at commit
298c731768fb4ebbd36b01ad9e0e5efe163c692c:

- ``fastflow/layers/conv.py``, ``PaddedConv2d(order)``: a k×k conv of the input padded by k−1 on
  two sides, a corner (TL: top and left, output (i, j) reads inputs (i−a, j−b), 0 ≤ a, b < k; TR,
  BL, BR mirror it by flipping the kernel). The tap that reads (i, j) itself is lower triangular
  across channels with its diagonal fixed at 1: ``get_mask`` takes the diagonal and what lies above
  it out of training (``reset_gradients``, applied before every step by ``train/experiment.py``),
  ``reset_parameters`` sets them to 1 and 0. So the Jacobian is triangular with a unit diagonal:
  log|det| = 0, as the release's ``logdet = 0.0``. No bias; weights N(0, 0.05²).
- ``fastflow/fastflow.py``, ``FastFlowUnit``: the channels split in four quarters, one padded conv
  each, cornered TL, TR, BL, BR, so that together they look in every direction.
- ``fastflow/fastflow_cifar_multi_gpu.py``, ``FastFlowStep``: FInC unit → ActNorm → 1×1 conv
  (``layers/conv1x1.py``: orthogonal init, not LU) → affine coupling. Here the shared backbone puts
  ActNorm first (ActNorm → FInC unit → 1×1 conv → coupling) and brings its own coupling and priors.
- ``FastFlowUnit.reverse_level2`` inverts all four quarters in one CUDA kernel
  (``utils/fastflow_cuda_inverse/cinc_cuda_kernel_level2.cu``): each quarter and its kernel are
  flipped to the TL orientation, then the pixels of one anti-diagonal are solved in parallel, one
  anti-diagonal after the other. ``solve_padded_conv`` does the same in PyTorch, batched over the
  pixels of an anti-diagonal and the images, in the input's precision (the release's CPU path
  solves in float64 and returns float32).

CInC follows github.com/Naagar/Normalizing_Flow_3x3_inv at commit
01fb00ed3b05545e1c86c61641b5d84f30d9c727, ``conv2d/conv2d.py``, ``invertible_conv2D``, and
``model.py``, ``revnet2d_step`` with ``--flow_permutation 7`` (the README's "3x3 convolution"): one
k×k conv padded top and left on all channels, the same layer as FInC's TL quarter, but with
emerging's parametrisation: a (2k−1)×(2k−1) weight masked by ``get_conv_square_ar_mask`` flipped,
of which ``forward_fast`` reads the k×k quadrant, a free upper-triangular centre (log|det| =
H·W·Σ_c log|w_cc|), a bias, N(0, 0.02²) + identity, and no 1×1 conv. That is
``MaskedAutoregressiveConv2d(C, 2k−1, flipped=True, bias=True)`` of ``flows/emerging.py``, reused
(``CInCConv2d``) with its forward, log-det and wavefront inverse.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from flowbench.flows.base import Flow, FlowSequence, exact_conv2d
from flowbench.flows.conv1x1 import make_conv1x1
from flowbench.flows.emerging import MaskedAutoregressiveConv2d
from flowbench.flows.glow import TINY, glow_architecture
from flowbench.flows.registry import register_model

CORNERS = ("TL", "TR", "BL", "BR")  # the quarters' order in FastFlowUnit
# per corner: PaddedConv2d's F.pad (left, right, top, bottom) in units of k − 1, and the image (and
# kernel) axes whose flip turns it into the TL conv (reverse_level2)
PADDING = {"TL": (1, 0, 1, 0), "TR": (0, 1, 1, 0), "BL": (1, 0, 0, 1), "BR": (0, 1, 0, 1)}
TO_TOP_LEFT = {"TL": (), "TR": (3,), "BL": (2,), "BR": (2, 3)}


@functools.lru_cache(maxsize=64)
def top_left_wavefronts(height: int, width: int, kernel_size: int, device: torch.device) -> tuple:
    """Per anti-diagonal i + j = t, t = 0, 1, …: flat indices into the image padded by k − 1 on top
    and left of each of its pixels' k×k taps (row-major, the pixel itself last), and of the pixels."""
    p = kernel_size - 1
    padded_width = width + p
    a, b = (t.flatten() for t in torch.meshgrid(torch.arange(kernel_size), torch.arange(kernel_size), indexing="ij"))
    i, j = (t.flatten() for t in torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
    fronts = []
    for step in range(height + width - 1):
        on = i + j == step
        fi, fj = i[on], j[on]
        taps = (fi[:, None] + a) * padded_width + (fj[:, None] + b)  # [P, k²]
        fronts.append((taps.flatten().to(device), ((fi + p) * padded_width + fj + p).to(device)))
    return tuple(fronts)


def solve_padded_conv(y: torch.Tensor, kernel: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """x with y = conv(x zero-padded by k − 1 on top and left, kernel): the inverse of a TL conv.

    ``kernel`` is [C, C, k, k]; its last tap, the one that reads the pixel itself, is triangular
    (lower; ``upper`` for an upper one). Every other tap reads a pixel on an earlier anti-diagonal,
    so the pixels of one anti-diagonal are solved together (a triangular C×C system each, batched
    over pixels and images): H + W − 1 sequential steps instead of H·W.
    """
    batch, channels, height, width = y.shape
    k, p = kernel.shape[-1], kernel.shape[-1] - 1
    # x_q = T⁻¹(y_q − Σ_taps K_tap·x_tap) with T the last tap: one matrix over [taps solved before q,
    # y_q], so that each anti-diagonal is a gather, a matmul and a scatter
    taps = -kernel.flatten(2)
    taps[:, :, -1] = torch.eye(channels, dtype=kernel.dtype, device=kernel.device)
    solve = torch.linalg.solve_triangular(kernel[:, :, p, p], taps.flatten(1), upper=upper)
    solve = solve.view(channels, channels, k * k).transpose(1, 2).reshape(channels, k * k * channels)
    # pixel-major buffer [pixels, C, B]: holds y where pixels are unsolved and x where solved (a
    # pixel's own tap still reads its y), zeros in the padding
    buffer = F.pad(y, (p, 0, p, 0)).permute(2, 3, 1, 0).reshape(-1, channels, batch).contiguous()
    for taps_idx, pixels_idx in top_left_wavefronts(height, width, k, y.device):
        patches = buffer.index_select(0, taps_idx).view(-1, k * k * channels, batch)
        buffer.index_copy_(0, pixels_idx, torch.matmul(solve, patches))
    x = buffer.view(height + p, width + p, channels, batch).permute(3, 2, 0, 1)
    return x[:, :, p:, p:].contiguous()


def corner_mask(channels: int, size: tuple[int, int], kernel_size: int, corner: str, strict: bool) -> torch.Tensor:
    """0/1 [C, C, k, k] of a ``corner`` conv on images of ``size``: the taps that reach a pixel (on
    an image smaller than the kernel, the far rows and columns read only padding), and at the tap
    that reads the pixel itself the channels ≤ c for output c (``strict``: < c); in the corner's
    orientation."""
    mask = torch.ones(channels, channels, kernel_size, kernel_size)
    mask[:, :, : max(kernel_size - size[0], 0)] = 0
    mask[:, :, :, : max(kernel_size - size[1], 0)] = 0
    mask[:, :, -1, -1] = torch.tril(torch.ones(channels, channels), -1 if strict else 0)
    return mask.flip(TO_TOP_LEFT[corner])


class FInCConv2d(Flow):
    """The FInC unit: four padded k×k convs, one per channel quarter, cornered TL, TR, BL, BR, each
    with a unit-diagonal, lower-triangular tap on the pixel itself: volume preserving.

    ``weight`` is [C, C/4, k, k], quarter g's kernel in its corner's orientation; the free entries
    are all but that tap's diagonal and upper triangle (fixed at 1 and 0, as the release's masked
    gradients keep them) and, on images of ``size`` smaller than the kernel, the taps that read only
    padding there.
    """

    mask: torch.Tensor  # buffers (register_buffer in __init__)
    identity: torch.Tensor

    def __init__(self, channels: int, size: tuple[int, int], kernel_size: int = 3):
        super().__init__()
        if channels % 4:
            raise ValueError(f"FInC splits the channels in four quarters: got {channels}")
        quarter = channels // 4
        self.kernel_size = kernel_size
        mask = torch.cat([corner_mask(quarter, size, kernel_size, c, strict=True) for c in CORNERS])
        identity = torch.cat([corner_mask(quarter, size, kernel_size, c, strict=False) for c in CORNERS]) - mask
        self.register_buffer("mask", mask)
        self.register_buffer("identity", identity)
        self.weight = nn.Parameter(0.05 * torch.randn(channels, quarter, kernel_size, kernel_size) * mask + identity)

    def parameter_masks(self) -> dict[str, torch.Tensor]:
        return {"weight": self.mask}

    def kernel(self) -> torch.Tensor:
        """[C, C/4, k, k]: the four quarters' kernels, the fixed entries in place."""
        return self.weight * self.mask + self.identity

    def forward(self, x):
        p = self.kernel_size - 1
        quarters = zip(x.chunk(4, 1), self.kernel().chunk(4), CORNERS, strict=True)
        y = torch.cat([exact_conv2d(F.pad(xq, [p * s for s in PADDING[c]]), w) for xq, w, c in quarters], 1)
        return y, x.new_zeros(x.shape[0])  # a unit diagonal: log|det| = 0

    def inverse(self, y):
        # reverse_level2: every quarter and its kernel flipped to TL, one block-diagonal solve for all four
        channels, quarter = y.shape[1], y.shape[1] // 4
        kernel = y.new_zeros(channels, channels, self.kernel_size, self.kernel_size)
        for g, (w, corner) in enumerate(zip(self.kernel().to(y.dtype).chunk(4), CORNERS, strict=True)):
            kernel[g * quarter : (g + 1) * quarter, g * quarter : (g + 1) * quarter] = w.flip(TO_TOP_LEFT[corner])
        flipped = torch.cat([yq.flip(TO_TOP_LEFT[c]) for yq, c in zip(y.chunk(4, 1), CORNERS, strict=True)], 1)
        x = solve_padded_conv(flipped, kernel)
        return torch.cat([xq.flip(TO_TOP_LEFT[c]) for xq, c in zip(x.chunk(4, 1), CORNERS, strict=True)], 1)


class CInCConv2d(MaskedAutoregressiveConv2d):
    """CInC's conv: emerging's flipped masked conv of size 2k − 1, whose forward reads the k×k
    quadrant above and left of each pixel (the release's ``forward_fast``); on images of ``size``
    smaller than k, the quadrant's far rows and columns, which read only padding, are masked out."""

    def __init__(self, channels: int, size: tuple[int, int], kernel_size: int = 3):
        super().__init__(channels, 2 * kernel_size - 1, flipped=True, bias=True)
        self.mask[:, :, : max(kernel_size - size[0], 0)] = 0
        self.mask[:, :, :, : max(kernel_size - size[1], 0)] = 0


@register_model(
    "finc",
    paper="Kallappa, Nagar & Varma, FInC Flow (VISAPP 2023)",
    year=2023,
    code="https://github.com/aditya-v-kallappa/FInCFlow",
    tiny=TINY,
)
def build_finc(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    kernel_size=3,
    lu=False,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Kallappa et al. 2023: ActNorm → FInC unit → 1×1 conv (``lu``: LU-parametrised) → affine coupling."""

    def mixer(channels, size):
        return FlowSequence(FInCConv2d(channels, size, kernel_size), make_conv1x1(channels, lu))

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )


@register_model(
    "cinc",
    paper="Nagar, Dufraisse & Varma, CInC Flow (TPM workshop, UAI 2021)",
    year=2021,
    code="https://github.com/Naagar/Normalizing_Flow_3x3_inv",
    tiny=TINY,
)
def build_cinc(
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
    """Nagar et al. 2021: ActNorm → k×k conv padded top and left (free diagonal, bias) → affine coupling."""

    def mixer(channels, size):
        return CInCConv2d(channels, size, kernel_size)

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
