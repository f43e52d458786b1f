"""The invertible n×n convolution of Truong et al. (Future Internet 2021), Algorithm 1.

An invertible shift function S(x)_c = α_c·x_c + β_c followed by Glow's 1×1 convolution;
log|det| = H·W·Σ_c log|α_c| + H·W·log|det W|. In Glow's architecture S directly follows
ActNorm, itself per-channel affine: ``fold_shift_into_actnorm`` rewrites an n×n model as the
Glow model with the same density.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from flowbench.flows.actnorm import ActNorm
from flowbench.flows.base import Flow, FlowStep, spatial_size
from flowbench.flows.conv1x1 import InvConv1x1, InvConv1x1LU, conv1x1, make_conv1x1
from flowbench.flows.glow import TINY, channel_mixer, glow_architecture
from flowbench.flows.models import FlowModel
from flowbench.flows.registry import register_model


class InvertibleShift(Flow):
    """S(x)_{c,i,j} = α_c·x_{c,i,j} + β_c with α initialised to 1 and β to 0.

    |α| is kept at least ``min_abs_alpha`` (sign kept) so S stays invertible whatever
    the optimiser does to the raw parameter.
    """

    def __init__(self, channels: int, min_abs_alpha: float = 1e-3):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.min_abs_alpha = min_abs_alpha

    def effective_alpha(self) -> torch.Tensor:
        sign = torch.where(self.alpha < 0, -1.0, 1.0).to(self.alpha)
        return sign * self.alpha.abs().clamp(min=self.min_abs_alpha)

    def forward(self, x):
        alpha = self.effective_alpha()
        y = x * alpha.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        logdet = spatial_size(x) * alpha.abs().log().sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return (y - self.beta.view(1, -1, 1, 1)) / self.effective_alpha().view(1, -1, 1, 1)


class InvertibleNxNConv(Flow):
    """Shift then 1×1 conv, run as one fused 1×1 conv: W·(α⊙x + β) = (W·diag α)·x + W·β.

    Fusing is why this layer costs about what a plain 1×1 step costs (the paper's claim).
    """

    def __init__(self, channels: int, lu: bool = False):
        super().__init__()
        self.shift = InvertibleShift(channels)
        self.conv = make_conv1x1(channels, lu)

    def forward(self, x):
        alpha = self.shift.effective_alpha()
        w = self.conv.matrix()
        y = conv1x1(x, w * alpha[None, :], w @ self.shift.beta)
        logdet = spatial_size(x) * (alpha.abs().log().sum() + self.conv.log_abs_det())
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return self.shift.inverse(self.conv.inverse(y))


@register_model(
    "nxn_shift",
    paper="Truong et al., Robust Invertible n×n Convolution (Future Internet 2021)",
    year=2021,
    code="none released; Glow's architecture (https://github.com/openai/glow)",
    tiny=TINY,
)
def build_nxn_shift(
    image_shape,
    depth=8,
    levels=3,
    hidden_channels=128,
    additive=False,
    lu=False,
    n_bits=8,
    actnorm=True,
    learned_prior=True,
):
    """Truong et al. 2021: ActNorm → invertible n×n conv (shift function + 1×1) → affine coupling."""
    mixer = channel_mixer(partial(InvertibleNxNConv, lu=lu))
    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )


@torch.no_grad()
def fold_shift_into_actnorm(model: FlowModel) -> FlowModel:
    """The Glow model with the same density as an n×n model: each shift S folded into the ActNorm A before it.

    Both are per-channel affine maps, and S directly follows A (y = (x + b)·e^s), so per channel

        S(A(x)) = α·(x + b)·e^s + β = σ·(x + b')·e^(s'),
        s' = s + log|α|,  b' = b + β/(α·e^s),  σ = sign α:

    an ActNorm A' (b', s') followed by the sign flip σ, which the 1×1 convolution W after S
    absorbs as W' = W·diag σ (still a 1×1 convolution; |det W'| = |det W|, and with an LU
    parametrisation the sign moves into U's columns and the diagonal's sign). The log-dets
    agree term by term: H·W·Σ(s + log|α|) + H·W·log|det W|. So every n×n model is a Glow model
    of the same card (and every Glow model an n×n one, with α = 1, β = 0): the two families
    hold the same densities, and a difference in bits/dim between them comes from optimisation.

    Returns a new model whose flow steps are ActNorm → 1×1 conv → coupling, whose state dict
    loads into ``build_glow`` with the same hyperparameters; ``model`` is left unchanged.
    """
    glow = copy.deepcopy(model)
    for step in [m for m in glow.modules() if isinstance(m, FlowStep)]:
        layers = list(step.layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, InvertibleNxNConv):
                continue
            before = layers[i - 1] if i > 0 else None
            if not isinstance(before, ActNorm):
                raise ValueError("the shift folds into the ActNorm before it: this model has none (actnorm=False)")
            layers[i] = _fold_step(before, layer)
        step.layers = nn.ModuleList(layers)
    return glow


def _fold_step(actnorm: ActNorm, nxn: InvertibleNxNConv) -> InvConv1x1 | InvConv1x1LU:
    """Rewrite ``actnorm`` in place as S∘A up to the sign σ; return the 1×1 conv W·diag σ."""
    alpha = nxn.shift.effective_alpha()
    sign = torch.sign(alpha)  # never 0: |α| is kept at least min_abs_alpha
    scale = torch.exp(actnorm.log_scale).flatten()
    actnorm.bias.add_((nxn.shift.beta / (alpha * scale)).view_as(actnorm.bias))
    actnorm.log_scale.add_(alpha.abs().log().view_as(actnorm.log_scale))
    actnorm.mark_initialized()  # its values now carry S: a first training batch must not overwrite them
    conv = nxn.conv
    if isinstance(conv, InvConv1x1LU):
        conv.upper.mul_(sign[None, :])
        conv.sign_s.mul_(sign)
    else:
        conv.weight.mul_(sign[None, :])
    return conv
