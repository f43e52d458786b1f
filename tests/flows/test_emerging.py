import pytest
import torch

from flowbench.flows import EmergingConv2d, MaskedAutoregressiveConv2d
from tests.flows.harness import brute_force_logdet, check_flow, randomize_parameters


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_autoregressive_conv_passes_harness(flipped, kernel_size):
    check_flow(lambda: MaskedAutoregressiveConv2d(3, kernel_size, flipped), shape=(3, 5, 6), scale=0.3)


def test_emerging_conv_passes_harness():
    check_flow(lambda: EmergingConv2d(4, 3), shape=(4, 4, 4), scale=0.3)
    check_flow(lambda: EmergingConv2d(2, 3, lu=True), shape=(2, 6, 5), scale=0.3)


def dense_matrix(layer, shape):
    """The layer is linear: its matrix is the Jacobian at any point."""
    x = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    return jac.reshape(x.numel(), x.numel())


@pytest.mark.parametrize("flipped", [False, True])
def test_inverse_equals_dense_solve(flipped):
    torch.manual_seed(1)
    layer = MaskedAutoregressiveConv2d(3, 3, flipped).double()
    randomize_parameters(layer, 0.5)
    shape = (3, 5, 4)
    y = torch.randn(2, *shape, dtype=torch.float64)
    dense = torch.linalg.solve(dense_matrix(layer, shape), y.flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)


def test_jacobian_is_triangular_in_raster_order():
    """The autoregressive property itself: the dense matrix in (row, col, channel) order is lower triangular."""
    torch.manual_seed(2)
    layer = MaskedAutoregressiveConv2d(2, 3).double()
    randomize_parameters(layer, 0.5)
    m = dense_matrix(layer, (2, 4, 4))
    perm = torch.arange(32).reshape(2, 4, 4).permute(1, 2, 0).flatten()  # (c,i,j) → (i,j,c) order
    m = m[perm][:, perm]
    torch.testing.assert_close(m, torch.tril(m))
    assert (torch.triu(m, 1) == 0).all() and (torch.tril(m, -1) != 0).any()


def test_inverse_solves_wavefronts_not_pixels():
    layer = MaskedAutoregressiveConv2d(2, 3)
    fronts = layer._wavefront_indices(32, 32, torch.device("cpu"))
    assert len(fronts) == 2 * 31 + 32  # (r+1)(H−1)+W, against 1024 pixels
    assert sum(len(centre) for _, centre in fronts) == 32 * 32


def test_logdet_from_centre_diagonals():
    torch.manual_seed(3)
    layer = MaskedAutoregressiveConv2d(2, 3).double()
    randomize_parameters(layer, 0.5)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[1], 9 * layer.log_diag.sum().expand(1))
    torch.testing.assert_close(layer(x)[1], brute_force_logdet(layer, x))
