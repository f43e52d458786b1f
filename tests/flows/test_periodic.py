import torch

from flowbench.flows import PeriodicConv2d
from tests.flows.harness import check_flow, randomize_parameters


def test_periodic_conv_passes_harness():
    check_flow(lambda: PeriodicConv2d(3, 3), shape=(3, 4, 4), scale=0.2)
    check_flow(lambda: PeriodicConv2d(2, 3), shape=(2, 3, 5), scale=0.2)


def test_inverse_equals_dense_solve():
    torch.manual_seed(0)
    layer = PeriodicConv2d(2, 3).double()
    randomize_parameters(layer, 0.3)
    shape = (2, 4, 5)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], torch.zeros(shape, dtype=torch.float64))
    matrix = jac.reshape(40, 40)
    y = torch.randn(3, *shape, dtype=torch.float64)
    dense = torch.linalg.solve(matrix, y.flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(y)[1][0], torch.linalg.slogdet(matrix)[1])


def test_convolution_wraps_around():
    layer = PeriodicConv2d(1, 3).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 1, 2] = 1.0  # y[i, j] = x[i, j + 1 mod W]
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)
    torch.testing.assert_close(layer(x)[0], x.roll(-1, dims=3))


def test_kernel_larger_than_the_input_wraps_and_stays_exact():
    check_flow(lambda: PeriodicConv2d(2, 3), shape=(2, 2, 2), scale=0.2)
    check_flow(lambda: PeriodicConv2d(2, 5), shape=(2, 3, 3), scale=0.1)
