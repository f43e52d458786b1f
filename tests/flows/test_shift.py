import pytest
import torch

import flowbench
from flowbench.cards import load_card
from flowbench.flows import InvConv1x1, InvertibleNxNConv, InvertibleShift, fold_shift_into_actnorm
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


@pytest.mark.parametrize("lu", [False, True], ids=["plain", "lu"])
def test_a_trained_nxn_model_folds_into_the_glow_model_of_its_card(lu):
    """S∘ActNorm is an ActNorm (and a sign the 1×1 conv takes): the same bits/dim from a Glow model."""
    torch.manual_seed(0)
    hparams = load_card("nxn_shift").hparams_for("digits") | {"lu": lu}
    assert hparams == load_card("glow").hparams_for("digits") | {"lu": lu}  # the same card
    nxn = flowbench.build_model("nxn_shift", (1, 8, 8), **hparams).double().train()
    pixels = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    optimizer = torch.optim.Adam(nxn.parameters(), lr=1e-2)
    for _ in range(5):  # off its initial values: α ≠ 1, β ≠ 0, ActNorm data-initialised then trained
        optimizer.zero_grad()
        nxn.bits_per_dim(pixels).mean().backward()
        optimizer.step()
    shifts = [m for m in nxn.modules() if isinstance(m, InvertibleShift)]
    with torch.no_grad():  # negative α too (a valid n×n model that training from α = 1 rarely reaches)
        for shift in shifts:
            shift.alpha[::2].neg_()
    alphas = torch.cat([s.alpha for s in shifts])
    assert (alphas < 0).any() and not torch.allclose(alphas.abs(), torch.ones_like(alphas), atol=1e-3)
    assert not torch.allclose(torch.cat([s.beta for s in shifts]), torch.zeros(len(alphas), dtype=torch.float64))

    glow = flowbench.build_model("glow", (1, 8, 8), **hparams).double()
    glow.load_state_dict(fold_shift_into_actnorm(nxn).state_dict())  # strict: the Glow card's very layers
    nxn.eval(), glow.eval()
    with torch.no_grad():
        bpd_nxn = nxn.bits_per_dim(pixels, torch.Generator().manual_seed(3))
        bpd_glow = glow.bits_per_dim(pixels, torch.Generator().manual_seed(3))
    torch.testing.assert_close(bpd_glow, bpd_nxn, rtol=1e-6, atol=0)
    assert sum(isinstance(m, InvertibleNxNConv) for m in nxn.modules()) == len(shifts)  # nxn left as it was


def test_folding_needs_the_actnorm_before_the_shift():
    nxn = flowbench.build_model("nxn_shift", (1, 8, 8), depth=1, levels=1, hidden_channels=4, actnorm=False)
    with pytest.raises(ValueError, match="folds into the ActNorm before it"):
        fold_shift_into_actnorm(nxn)
