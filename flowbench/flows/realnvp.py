"""RealNVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017): checkerboard and channel affine couplings
with residual networks (``flows.coupling``) in a multi-scale architecture, after the authors'
release (tensorflow/models, research/real_nvp/real_nvp_multiscale_dataset.py)."""

from __future__ import annotations

from flowbench.flows.actnorm import ActNorm
from flowbench.flows.base import FlowSequence, FlowStep
from flowbench.flows.coupling import AffineCoupling
from flowbench.flows.models import FlowModel
from flowbench.flows.multiscale import Squeeze, multiscale_flow
from flowbench.flows.preprocess import LogitPreprocess
from flowbench.flows.registry import register_model


@register_model(
    "realnvp",
    paper="Dinh et al., Density estimation using Real NVP (ICLR 2017)",
    year=2017,
    code="https://github.com/tensorflow/models/tree/archive/research/real_nvp",
    tiny={"levels": 2, "hidden_channels": 8, "n_blocks": 1},
)
def build_realnvp(image_shape, levels=2, hidden_channels=64, n_blocks=8, alpha=0.05, n_bits=8):
    """Per scale 3 checkerboard couplings, squeeze, 3 channel couplings, then half the channels
    leave; the last scale has 4 checkerboard couplings. ActNorm after each coupling stands in for
    RealNVP's batch-norm bijection; the prior is standard normal."""

    def coupling(c, mask, parity):
        return FlowStep(
            AffineCoupling(c, hidden_channels, mask=mask, parity=parity, scale="tanh", n_blocks=n_blocks),
            ActNorm(c),
        )

    def steps(level, c):
        if level == levels - 1:
            return FlowSequence(*(coupling(c, "checkerboard", i % 2) for i in range(4)))
        layers = [coupling(c, "checkerboard", i % 2) for i in range(3)]
        layers.append(Squeeze())
        layers += [coupling(4 * c, "channel", i % 2) for i in range(3)]
        return FlowSequence(*layers)

    flow = multiscale_flow(image_shape, levels, levels - 1, steps, learned_prior=False)
    return FlowModel(image_shape, LogitPreprocess(alpha), flow, n_bits)
