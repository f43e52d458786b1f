"""The harness must catch the bugs it exists for."""

import pytest
import torch

from flowbench.flows import ActNorm, InvConv1x1
from tests.flows.harness import check_flow


class ActNormWithoutLogdet(ActNorm):
    def forward(self, x):
        y, logdet = super().forward(x)
        return y, torch.zeros_like(logdet)


class Conv1x1WithWrongInverse(InvConv1x1):
    def inverse(self, y):
        return torch.nn.functional.conv2d(y, self.weight.T[:, :, None, None])  # transpose, not inverse


def test_harness_passes_a_correct_layer():
    check_flow(lambda: ActNorm(2))


def test_harness_catches_a_missing_logdet_term():
    with pytest.raises(AssertionError):
        check_flow(lambda: ActNormWithoutLogdet(2))


def test_harness_catches_a_wrong_inverse_hidden_by_the_orthogonal_init():
    with pytest.raises(AssertionError):
        check_flow(lambda: Conv1x1WithWrongInverse(2))
