"""Woodbury transformations (Lu & Huang, NeurIPS 2020), as in the authors' code.

Reproduces github.com/yolu1055/WoodburyTransformations at commit
24c4000f31254f7183ccb700e4f740d25aa3e757, file ``WoodburyTrans.py`` (``ChannelTrans``,
``SpatialTrans``, ``WTrans``, ``MEWTrans``) as ``models.py`` uses it (``WoodburyGlowStep``:
ActNorm → ``WTrans`` or ``MEWTrans`` → affine coupling), with ``train_main.py``'s ranks
(``--d_c``, ``--d_s1``, ``--d_s2``: 16 at every level):

- Channel transformation: y = (I_C + U_c·V_c)·x at every pixel, U_c C×d_c, V_c d_c×C.
- Spatial transformation: y = x·(I_N + U_s·V_s) for each channel's row of N = H·W pixels.
- Woodbury (``WTrans``): channel, then spatial. ME-Woodbury (``MEWTrans``): the spatial one split
  into a width transformation (every row of W pixels, per channel and image row) then a height
  one (every column of H pixels), so its parameters grow with H + W instead of H·W.
- Log-det by Sylvester's identity, det(I_n + U·V) = det(I_d + V·U), once per vector the map
  acts on: H·W times for the channel map, C for the spatial one, C·H for width, C·W for height.
- Inverse by the Woodbury identity: (I_n + U·V)⁻¹ = I_n − U·(I_d + V·U)⁻¹·V.
- Initialisation: every entry of every U and V from N(0, 0.01²), so each map starts near I.

Where this differs: the d×d determinant and solve run in float64 (the original: ``torch.slogdet``
and ``torch.inverse`` in the input's precision), the inverse solves instead of inverting, and the
identity the original holds as a frozen ``nn.Parameter`` is built when needed (it never changes
the map, so it is not counted). The original takes its ranks per level (``--d_c [16,16,16]``);
here one rank per transformation serves every level, which holds the release's setting (16
everywhere) but not the per-level lists its ``models.py`` comments try for larger images. Products
run as 1×1 convolutions through ``exact_conv2d``, so a GPU computes exactly the map the log-det
describes (no TF32). Nothing keeps I + U·V away from singular, as in the original: the likelihood's
log-det term does.
"""

from __future__ import annotations

import torch
from torch import nn

from flowbench.flows.base import Flow, FlowSequence, spatial_size
from flowbench.flows.conv1x1 import conv1x1
from flowbench.flows.glow import TINY, glow_architecture
from flowbench.flows.registry import register_model

INIT_STD = 0.01  # WoodburyTrans.py: torch.normal(0, 0.01) for every U and V


def inner_matrix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """I_d + right·left in float64: the d×d matrix both identities reduce I_n + left·right to."""
    rank = right.shape[0]
    return torch.eye(rank, dtype=torch.float64, device=right.device) + right.double() @ left.double()


def low_rank_update(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(I_n + left·right)·x over the channel axis of x [M, n, h, w]; left n×d, right d×n."""
    return x + conv1x1(conv1x1(x, right), left)


def low_rank_solve(y: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x with (I_n + left·right)·x = y: x = y − left·(I_d + right·left)⁻¹·right·y (Woodbury)."""
    # solve_ex: no error check, so sampling on a GPU does not wait for one
    solved_right = torch.linalg.solve_ex(inner_matrix(left, right), right.double())[0]
    return y - conv1x1(conv1x1(y, solved_right.to(y.dtype)), left.to(y.dtype))


def low_rank_logdet(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """log|det(I_n + left·right)| = log|det(I_d + right·left)| (Sylvester), float64."""
    return torch.linalg.slogdet(inner_matrix(left, right))[1]


class ChannelWoodbury(Flow):
    """y = (I_C + U·V)·x at every pixel (``ChannelTrans``); log|det| = H·W·log|det(I_d + V·U)|."""

    def __init__(self, channels: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.U = nn.Parameter(INIT_STD * torch.randn(channels, rank))
        self.V = nn.Parameter(INIT_STD * torch.randn(rank, channels))

    def forward(self, x):
        logdet = spatial_size(x) * low_rank_logdet(self.U, self.V)
        return low_rank_update(x, self.U, self.V), logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, y):
        return low_rank_solve(y, self.U, self.V)


class SpatialWoodbury(Flow):
    """y = x·(I_n + U·V) for every row vector of n pixels of each channel (``SpatialTrans``).

    ``along`` says which pixels form a vector: "hw" all H·W of a channel (Woodbury's spatial
    transformation), "w" each image row of W (ME-Woodbury's width transformation), "h" each image
    column of H (its height transformation). U and V are n×d and d×n, so the layer is built for
    one spatial size. Row vectors times I + U·V are columns times I + Vᵀ·Uᵀ: the products run as
    1×1 convolutions with the n pixels as channels.
    """

    def __init__(self, size: int, rank: int, along: str = "hw"):
        super().__init__()
        if along not in ("hw", "w", "h"):
            raise ValueError(f'along must be "hw", "w" or "h", got {along!r}')
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.size, self.along = size, along
        self.U = nn.Parameter(INIT_STD * torch.randn(size, rank))
        self.V = nn.Parameter(INIT_STD * torch.randn(rank, size))

    def vectors(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] as [vectors, n, 1, 1]: one n-pixel vector per conv batch entry."""
        b, c, h, w = x.shape
        n = {"hw": h * w, "w": w, "h": h}[self.along]
        if n != self.size:
            raise ValueError(f"SpatialWoodbury(along={self.along!r}) was built for {self.size} pixels, got {n}")
        if self.along == "h":
            x = x.transpose(2, 3)
        return x.reshape(-1, n, 1, 1)

    def image(self, vectors: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The inverse of ``vectors``."""
        b, c, h, w = shape
        if self.along == "h":
            return vectors.reshape(b, c, w, h).transpose(2, 3).contiguous()
        return vectors.reshape(shape)

    def vectors_per_sample(self, x: torch.Tensor) -> int:
        _, c, h, w = x.shape
        return {"hw": c, "w": c * h, "h": c * w}[self.along]

    def forward(self, x):
        y = self.image(low_rank_update(self.vectors(x), self.V.T, self.U.T), x.shape)
        logdet = self.vectors_per_sample(x) * low_rank_logdet(self.V.T, self.U.T)
        return y, logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, y):
        return self.image(low_rank_solve(self.vectors(y), self.V.T, self.U.T), y.shape)


class Woodbury(FlowSequence):
    """Channel then spatial Woodbury transformation (``WTrans``)."""

    def __init__(self, channels: int, size: tuple[int, int], channel_rank: int = 16, spatial_rank: int = 16):
        height, width = size
        super().__init__(
            ChannelWoodbury(channels, channel_rank),
            SpatialWoodbury(height * width, spatial_rank, along="hw"),
        )


class MEWoodbury(FlowSequence):
    """Memory-efficient Woodbury (``MEWTrans``): channel, then width, then height transformation."""

    def __init__(
        self, channels: int, size: tuple[int, int], channel_rank: int = 16, height_rank: int = 16, width_rank: int = 16
    ):
        height, width = size
        super().__init__(
            ChannelWoodbury(channels, channel_rank),
            SpatialWoodbury(width, width_rank, along="w"),
            SpatialWoodbury(height, height_rank, along="h"),
        )


CODE = "https://github.com/yolu1055/WoodburyTransformations"
PAPER = "Lu & Huang, Woodbury Transformations for Deep Generative Flows (NeurIPS 2020)"


@register_model("woodbury", paper=PAPER, year=2020, code=CODE, tiny={**TINY, "channel_rank": 4, "spatial_rank": 4})
def build_woodbury(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    channel_rank=16,
    spatial_rank=16,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Lu & Huang 2020: ActNorm → Woodbury transformation (channel, spatial) → affine coupling."""

    def mixer(channels, size):
        return Woodbury(channels, size, channel_rank, spatial_rank)

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )


@register_model(
    "me_woodbury",
    paper=f"{PAPER}, memory-efficient",
    year=2020,
    code=CODE,
    tiny={**TINY, "channel_rank": 4, "height_rank": 2, "width_rank": 2},
)
def build_me_woodbury(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    channel_rank=16,
    height_rank=16,
    width_rank=16,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Lu & Huang 2020: ActNorm → ME-Woodbury transformation (channel, width, height) → affine coupling."""

    def mixer(channels, size):
        return MEWoodbury(channels, size, channel_rank, height_rank, width_rank)

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
