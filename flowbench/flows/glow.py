"""Glow (Kingma & Dhariwal, NeurIPS 2018) and the architecture its variants share.

A flow step is ActNorm → invertible channel mixer → affine coupling (openai/glow, model.py,
``revnet2d_step``); each level squeezes, runs ``depth`` steps and factors out half its channels
under a learned conditional prior (``split2d``); the top level ends in a learned per-channel
prior (``prior`` with ``learntop``). The variants differ only in the mixer: Glow's 1×1
convolution here, the n×n shift convolution (``flows.shift``), emerging and periodic
convolutions (``flows.emerging``, ``flows.periodic``).
"""

from __future__ import annotations

from functools import partial

from flowbench.flows.actnorm import ActNorm
from flowbench.flows.base import FlowSequence, FlowStep
from flowbench.flows.conv1x1 import make_conv1x1
from flowbench.flows.coupling import AffineCoupling
from flowbench.flows.models import FlowModel
from flowbench.flows.multiscale import Squeeze, multiscale_flow
from flowbench.flows.preprocess import CenterPreprocess
from flowbench.flows.registry import register_model

TINY = {"depth": 2, "levels": 2, "hidden_channels": 8}


def glow_architecture(
    image_shape,
    make_mixer,
    depth: int,
    levels: int,
    hidden_channels: int,
    additive: bool,
    n_bits: int,
    actnorm: bool = True,
    learned_prior: bool = True,
) -> FlowModel:
    """Glow's multi-scale flow with ``make_mixer(channels, (height, width))`` as each step's invertible
    mixer (the size is the level's, after its squeeze: a spatial mixer's parameters depend on it).

    ``actnorm=False`` drops the steps' ActNorm layers (the coupling networks keep theirs: they
    are part of the network, not of the flow); ``learned_prior=False`` makes every factored-out
    part and the top standard normal (the n×n paper's prior) instead of Glow's learned priors.
    """

    def steps(level, c):
        c, size = 4 * c, (image_shape[1] >> (level + 1), image_shape[2] >> (level + 1))
        flow_steps = [
            FlowStep(
                *([ActNorm(c)] if actnorm else []),
                make_mixer(c, size),
                AffineCoupling(c, hidden_channels, additive=additive),
            )
            for _ in range(depth)
        ]
        return FlowSequence(Squeeze(), *flow_steps)

    flow = multiscale_flow(image_shape, levels, levels, steps, learned_prior)
    return FlowModel(image_shape, CenterPreprocess(), flow, n_bits)


def channel_mixer(make_mixer):
    """A mixer that depends on the channel count only, as ``glow_architecture`` calls it."""
    return lambda channels, size: make_mixer(channels)


@register_model(
    "glow", paper="Kingma & Dhariwal, Glow (NeurIPS 2018)", year=2018, code="https://github.com/openai/glow", tiny=TINY
)
def build_glow(
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
    """Glow: ActNorm → invertible 1×1 conv (``lu``: LU-parametrised) → affine coupling."""
    mixer = channel_mixer(partial(make_conv1x1, lu=lu))
    return glow_architecture(
        image_shape, mixer, depth, levels, hidden_channels, additive, n_bits, actnorm, learned_prior
    )
