"""Butterfly layers (Meng, Zhou, Choi, Dao & Ermon, ButterflyFlow, ICML 2022), as in the authors' code.

Follows github.com/alexzhou907/butterflyflow at commit da798ab03a07539a1da1ff61d7e571613ade4148:
``flows/butter_layer.py`` (``butterfly_block``, ``general_butterfly_block_simple``, ``identity_init``),
``flows/butterfly_glow.py`` (``ButterGlowStep``, ``Butter_Glow``), ``main_image.py`` and
``configs/cifar10-butterfly.json``:

- The layer acts on each sample flattened to one vector of D = C·H·W entries (NCHW order,
  ``permute_channel`` false). Butterfly factor i cuts the vector into 2^i blocks of D / 2^i entries
  and mixes entry p of a block's first half with entry p of its second half (stride D / 2^(i+1))
  through a free 2×2 matrix, one per pair: 2·D free entries, stored alone (no masked dense matrix).
- A layer of L levels is factors 0, 1, …, L−1, applied coarsest stride first (``reverse_perm``
  true in every released config); weights start at the identity (``perm_init_type`` "iden", no bias,
  ``use_act`` false: the factors are linear).
- log|det| of a factor is Σ over its 2×2 blocks of log|ad − bc|, whatever the input; the inverse
  applies each block's closed-form 2×2 inverse, factors in reverse order.
- A flow step is ActNorm → invertible 1×1 conv (``use_conv1by1``) → butterfly layer → coupling, so the
  mixer here is the 1×1 conv followed by the butterfly layer (``conv1x1=False`` keeps the butterfly
  layer alone). Each split of the multi-scale flow drops one level (``Butter_Glow`` pops one entry
  of ``weight_init_types`` per level): the vector halves there, and with it its factors of two.

Deviations: the 2×2 blocks are stored as [blocks, pairs, out, in] matrices rather than the
authors' [blocks, in, pairs, out] layout (the same entries); the authors' split priors, themselves
flow steps with a butterfly layer, are the shared backbone's conditional priors here.
"""

from __future__ import annotations

import torch
from torch import nn

from flowbench.flows.base import Flow, FlowSequence
from flowbench.flows.conv1x1 import InvConv1x1
from flowbench.flows.glow import glow_architecture
from flowbench.flows.registry import register_model


class ButterflyFactor(Flow):
    """One butterfly factor on D = numel per sample: 2^level blocks, in each y = M_p (x_p, x_{p+s})
    for every p of the block's first half, s = D / 2^(level+1); log|det| = Σ_p log|det M_p|."""

    def __init__(self, dim: int, level: int):
        super().__init__()
        if dim % 2 ** (level + 1):
            raise ValueError(f"butterfly level {level} needs a size divisible by {2 ** (level + 1)}, got {dim}")
        self.dim, self.blocks = dim, 2**level
        # weight[k, p] is the 2×2 matrix (out, in) of pair p in block k; identity_init of the release
        weight = torch.zeros(self.blocks, dim // (2 * self.blocks), 2, 2)
        weight[..., 0, 0] = weight[..., 1, 1] = 1.0
        self.weight = nn.Parameter(weight)

    def pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves of every block: [batch, blocks, D / 2^(level+1)] each."""
        if x[0].numel() != self.dim:
            raise ValueError(f"butterfly factor of size {self.dim} got samples of shape {tuple(x.shape[1:])}")
        halves = x.reshape(x.shape[0], self.blocks, 2, -1)
        return halves[:, :, 0], halves[:, :, 1]

    @staticmethod
    def mix(a, b, c, d, x0, x1, shape) -> torch.Tensor:
        """[[a, b], [c, d]] applied elementwise (no matmul: exact in float32 on any device)."""
        return torch.stack((a * x0 + b * x1, c * x0 + d * x1), dim=2).reshape(shape)

    def forward(self, x):
        w = self.weight
        a, b, c, d = w[..., 0, 0], w[..., 0, 1], w[..., 1, 0], w[..., 1, 1]
        logdet = torch.log(torch.abs(a * d - b * c)).sum()
        return self.mix(a, b, c, d, *self.pairs(x), x.shape), logdet.expand(x.shape[0])

    def inverse(self, y):
        w = self.weight
        a, b, c, d = w[..., 0, 0], w[..., 0, 1], w[..., 1, 0], w[..., 1, 1]
        det = a * d - b * c
        return self.mix(d / det, -b / det, -c / det, a / det, *self.pairs(y), y.shape)


class ButterflyLayer(FlowSequence):
    """The product of butterfly factors 0 … levels−1 over the whole C·H·W vector, factor 0 first
    (``general_butterfly_block_simple`` with ``reverse_perm``); no factor at all is the identity."""

    def __init__(self, dim: int, levels: int):
        super().__init__(*(ButterflyFactor(dim, level) for level in range(levels)))


@register_model(
    "butterfly",
    paper="Meng, Zhou, Choi, Dao & Ermon, ButterflyFlow (ICML 2022)",
    year=2022,
    code="https://github.com/alexzhou907/butterflyflow",
    tiny={"depth": 2, "levels": 2, "hidden_channels": 8, "butterfly_levels": 2},
)
def build_butterfly(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    butterfly_levels=1,
    conv1x1=True,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Meng et al. 2022: ActNorm → 1×1 conv → butterfly layer → affine coupling. ``butterfly_levels``
    (the release's ``perm_layers``; 1 in its CIFAR-10 config) counts factors at the first level, one
    fewer at each level after it."""
    if butterfly_levels < 0:
        raise ValueError(f"butterfly_levels must be ≥ 0, got {butterfly_levels}")
    first_height = image_shape[1] // 2

    def mixer(channels, size):
        scale = (first_height // size[0]).bit_length() - 1  # levels of the multi-scale flow before this one
        butterfly = ButterflyLayer(channels * size[0] * size[1], max(butterfly_levels - scale, 0))
        return FlowSequence(InvConv1x1(channels), butterfly) if conv1x1 else butterfly

    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
