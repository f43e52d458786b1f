import torch

from flowbench.flows import InvConv1x1, InvertibleNxNConv, InvertibleShift
from tests.flows.harness import check_flow


def test_shift_passes_harness():
    check_flow(lambda: InvertibleShift(3), shape=(3, 4, 4))


def test_nxn_conv_passes_harness():
    check_flow(lambda: InvertibleNxNConv(4), shape=(4, 3, 3))
    check_flow(lambda: InvertibleNxNConv(4, lu=True), shape=(4, 3, 3))


def test_shift_starts_as_identity():
    layer = InvertibleShift(3)
    x = torch.randn(2, 3, 4, 4)
    y, logdet = layer(x)
    torch.testing.assert_close(y, x)
    assert torch.all(logdet == 0)


def test_alpha_kept_away_from_zero_stays_invertible():
    layer = InvertibleShift(2)
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([0.0, -1e-8]))
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    layer = layer.double()
    y, logdet = layer(x)
    assert torch.isfinite(logdet).all()
    torch.testing.assert_close(layer.inverse(y), x)
    torch.testing.assert_close(layer.effective_alpha(), torch.tensor([1e-3, -1e-3], dtype=torch.float64))


def test_fused_layer_equals_shift_then_conv1x1_algorithm_1():
    torch.manual_seed(0)
    fused = InvertibleNxNConv(4).double()
    with torch.no_grad():
        fused.shift.alpha.copy_(torch.tensor([0.5, -2.0, 1.5, 3.0]))
        fused.shift.beta.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    s, ld_s = fused.shift(x)
    y_ref, ld_w = fused.conv(s)
    y, logdet = fused(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(logdet, ld_s + ld_w)
    # Algorithm 1: H·W·Σ log|α| + H·W·log|det W|
    expected = 25 * (torch.tensor([0.5, 2.0, 1.5, 3.0]).log().sum() + torch.linalg.slogdet(fused.conv.weight)[1])
    torch.testing.assert_close(logdet, expected.double().expand(2))
    assert isinstance(fused.conv, InvConv1x1)
