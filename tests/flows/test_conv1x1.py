import pytest
import torch

from flowbench.flows import InvConv1x1, InvConv1x1LU
from tests.flows.harness import check_flow


@pytest.mark.parametrize("cls", [InvConv1x1, InvConv1x1LU])
def test_conv1x1_passes_harness(cls):
    check_flow(lambda: cls(4), shape=(4, 3, 3))


def test_plain_weight_starts_as_a_rotation():
    w = InvConv1x1(6).weight.detach().double()
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.det(w) > 0


def test_lu_matrix_equals_its_initial_rotation_and_logdet_is_sum_log_s():
    layer = InvConv1x1LU(5)
    w = layer.matrix().detach().double()
    torch.testing.assert_close(w @ w.T, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.log_abs_det(), torch.linalg.slogdet(layer.matrix())[1], atol=1e-5, rtol=0)
