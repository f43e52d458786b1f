"""A flow defined outside the package, as a contributor would write one: its layer, its builder
and its registration in one module, its card (``toy.yaml``) beside it. Loaded as a plugin:
``FLOWBENCH_PLUGINS=tests/flows/toy_flow.py``."""

import torch
from torch import nn

from flowbench.flows import Flow, FlowSequence, InvConv1x1, Squeeze, register_model
from flowbench.flows.base import FlowStep, spatial_size
from flowbench.flows.models import FlowModel
from flowbench.flows.multiscale import multiscale_flow
from flowbench.flows.preprocess import CenterPreprocess


class ChannelAffine(Flow):
    """y = x·exp(log_scale_c) + shift_c: an elementwise flow, log|det| = H·W·Σ_c log_scale_c."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        y = x * torch.exp(self.log_scale) + self.shift
        return y, (spatial_size(x) * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, y):
        return (y - self.shift) * torch.exp(-self.log_scale)


@register_model(
    "toy",
    paper="none: a test of flowbench's plugin registry",
    code="tests/flows/toy_flow.py",
    tiny={"depth": 1, "levels": 2},
)
def build_toy(image_shape, depth=2, levels=2, n_bits=8):
    """Per level: squeeze, then ``depth`` steps of channel affine → 1×1 conv; learned priors."""

    def steps(level, c):
        return FlowSequence(Squeeze(), *(FlowStep(ChannelAffine(4 * c), InvConv1x1(4 * c)) for _ in range(depth)))

    return FlowModel(image_shape, CenterPreprocess(), multiscale_flow(image_shape, levels, levels, steps, True), n_bits)
