import pytest
import torch

import flowbench
from flowbench.errors import FlowbenchError
from flowbench.flows.base import FlowSequence, effective_parameter_count
from flowbench.flows.butterfly import ButterflyFactor, ButterflyLayer
from flowbench.flows.conv1x1 import InvConv1x1
from tests.flows.harness import check_flow, randomize_parameters


def dense_jacobian(layer, shape):
    x = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    return jac.reshape(x.numel(), x.numel())


@pytest.mark.parametrize("level", [0, 1, 2, 4])
def test_factor_passes_harness(level):
    check_flow(lambda: ButterflyFactor(32, level), shape=(2, 4, 4), scale=0.3)


@pytest.mark.parametrize(("shape", "levels"), [((2, 4, 4), 5), ((3, 4, 4), 4), ((12, 2, 2), 2), ((6, 2, 1), 1)])
def test_layer_passes_harness(shape, levels):
    dim = shape[0] * shape[1] * shape[2]
    check_flow(lambda: ButterflyLayer(dim, levels), shape=shape, scale=0.3)


def test_inverse_equals_dense_solve_and_logdet_the_dense_slogdet():
    torch.manual_seed(0)
    shape = (3, 4, 2)
    layer = ButterflyLayer(24, 3).double()
    randomize_parameters(layer, 0.5)
    matrix = dense_jacobian(layer, shape)
    y = torch.randn(4, *shape, dtype=torch.float64)
    dense = torch.linalg.solve(matrix, y.flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(y)[1], torch.linalg.slogdet(matrix)[1].expand(4))


def release_butterfly_block(x, w1, level):
    """butterfly_block.forward of alexzhou907/butterflyflow (use_act and use_bias false), verbatim math:
    w1 in the release's layout [2^level, 2 (in), D / 2^(level+1), 2 (out)]."""
    batch = x.shape[0]
    x = x.reshape(batch, 2**level, 2, -1)
    x = (x[..., None] * w1[None, ...]).sum(dim=2).permute(0, 1, 3, 2)
    log_det = torch.log(torch.abs(w1[:, 0, :, 0] * w1[:, 1, :, 1] - w1[:, 1, :, 0] * w1[:, 0, :, 1])).sum()
    return x.reshape(batch, -1), log_det


@pytest.mark.parametrize("level", [0, 1, 3])
def test_factor_computes_the_release_butterfly_block(level):
    factor = ButterflyFactor(48, level).double()
    randomize_parameters(factor, 0.7, seed=level)
    x = torch.randn(3, 12, 2, 2, dtype=torch.float64)
    y, logdet = factor(x)
    # our weight[k, p, out, in] is the release's w1[k, in, p, out]
    y_release, logdet_release = release_butterfly_block(x, factor.weight.permute(0, 3, 1, 2), level)
    torch.testing.assert_close(y.reshape(3, -1), y_release)
    torch.testing.assert_close(logdet, logdet_release.expand(3))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_jacobian_is_a_butterfly_factor_and_every_stored_entry_is_one_of_it(level):
    """Entry (r, s) of the Jacobian can be non-zero only for r = s, or r and s in one block of D / 2^level
    entries at distance D / 2^(level+1): 2·D entries, exactly the stored (counted) parameters."""
    dim = 32
    factor = ButterflyFactor(dim, level).double()
    randomize_parameters(factor, 0.5)
    block, stride = dim >> level, dim >> (level + 1)
    r, s = torch.arange(dim)[:, None], torch.arange(dim)[None, :]
    distance = (r - s).abs()
    pattern = (r // block == s // block) & ((distance == 0) | (distance == stride))
    jac = dense_jacobian(factor, (2, 4, 4))
    assert torch.equal(jac != 0, pattern)
    assert effective_parameter_count(factor) == factor.weight.numel() == int(pattern.sum()) == 2 * dim


def test_factor_zero_swaps_the_channel_halves_at_each_pixel():
    # level 0 pairs entry p with p + D/2: in NCHW order channel c with channel c + C/2, same pixel
    factor = ButterflyFactor(6 * 3 * 2, 0)
    with torch.no_grad():
        factor.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # every pair swapped
    x = torch.randn(2, 6, 3, 2)
    y, logdet = factor(x)
    torch.testing.assert_close(y, x.roll(3, dims=1))
    torch.testing.assert_close(logdet, torch.zeros(2))  # |det| of a swap is 1


def test_factors_apply_coarsest_stride_first():
    layer = ButterflyLayer(8, 2)
    assert [f.blocks for f in layer.layers] == [1, 2]
    x = torch.randn(1, 8)
    with torch.no_grad():
        layer.layers[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))  # first half += second half
        layer.layers[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swap at stride 2 in each half
    first = x[:, :4] + x[:, 4:]
    expected = torch.cat([first[:, 2:], first[:, :2], x[:, 6:], x[:, 4:6]], dim=1)
    torch.testing.assert_close(layer(x)[0], expected)


def test_layer_is_the_identity_at_initialisation():
    layer = ButterflyLayer(48, 4)
    x = torch.randn(3, 3, 4, 4)
    y, logdet = layer(x)
    assert torch.equal(y, x)
    assert torch.equal(logdet, torch.zeros(3))


def test_size_must_hold_the_factors_of_two():
    with pytest.raises(ValueError, match="divisible by 16"):
        ButterflyLayer(24, 4)
    with pytest.raises(FlowbenchError, match="butterfly_levels must be ≥ 0"):
        flowbench.build_model("butterfly", (3, 8, 8), depth=1, levels=2, hidden_channels=8, butterfly_levels=-1)


def mixers(model):
    return [m for m in model.modules() if isinstance(m, FlowSequence) and isinstance(m.layers[-1], ButterflyLayer)]


def test_each_split_drops_one_level_and_the_mixer_starts_with_a_1x1_conv():
    model = flowbench.build_model("butterfly", (3, 32, 32), depth=2, levels=3, hidden_channels=8, butterfly_levels=3)
    steps = mixers(model)
    assert [len(m.layers[1].layers) for m in steps] == [3, 3, 2, 2, 1, 1]
    assert all(isinstance(m.layers[0], InvConv1x1) for m in steps)
    dims = [m.layers[1].layers[0].dim for m in steps]
    assert dims == [3072, 3072, 1536, 1536, 768, 768]  # C·H·W of each level: 12×16×16, 24×8×8, 48×4×4


def test_the_butterfly_adds_two_entries_per_dimension_and_factor_to_glow():
    hparams = {"depth": 2, "levels": 3, "hidden_channels": 8}
    glow = flowbench.build_model("glow", (3, 32, 32), **hparams).num_parameters()
    one = flowbench.build_model("butterfly", (3, 32, 32), **hparams).num_parameters()
    three = flowbench.build_model("butterfly", (3, 32, 32), **hparams, butterfly_levels=3).num_parameters()
    alone = flowbench.build_model("butterfly", (3, 32, 32), **hparams, conv1x1=False).num_parameters()
    assert one - glow == 2 * 2 * 3072  # release CIFAR-10 config: one factor, first level only
    assert three - glow == 2 * 2 * (3 * 3072 + 2 * 1536 + 1 * 768)
    assert one - alone == 2 * (12**2 + 24**2 + 48**2)  # the 1×1 convs
