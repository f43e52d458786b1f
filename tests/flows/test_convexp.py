import math

import pytest
import torch
import torch.nn.functional as F

from flowbench.flows.base import effective_parameter_count
from flowbench.flows.convexp import (
    ConvExpMixer,
    ConvolutionExponential,
    conv_exp,
    series_terms,
    spectral_norm_bound,
)
from tests.flows.harness import check_flow, randomize_parameters


def conv_matrix(kernel: torch.Tensor, shape) -> torch.Tensor:
    """The zero-padded convolution by ``kernel`` on inputs of ``shape`` as a dense matrix."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=kernel.dtype).reshape(n, *shape)
    return F.conv2d(basis, kernel, padding=kernel.shape[-1] // 2).reshape(n, n).T


def moved_layer(channels, size, scale, seed=0):
    torch.manual_seed(seed)
    layer = ConvolutionExponential(channels, size).double()
    randomize_parameters(layer, scale, seed)
    return layer


@pytest.mark.parametrize("scale", [0.01, 0.3], ids=["bound-inactive", "bound-active"])
def test_convolution_exponential_passes_harness(scale):
    check_flow(lambda: ConvolutionExponential(3, (4, 4)), shape=(3, 4, 4), scale=scale)
    check_flow(lambda: ConvolutionExponential(2, (3, 5)), shape=(2, 3, 5), scale=scale)
    check_flow(lambda: ConvolutionExponential(4, (2, 2)), shape=(4, 2, 2), scale=scale)
    # smaller than the kernel: the torus of the bound is 2×2 and taps meet on it
    check_flow(lambda: ConvolutionExponential(3, (1, 1)), shape=(3, 1, 1), scale=scale)


def test_mixer_passes_harness():
    check_flow(lambda: ConvExpMixer(4, (4, 4)), shape=(4, 4, 4), scale=0.3)
    check_flow(lambda: ConvExpMixer(2, (3, 5), kernel_size=5, coeff=0.5), shape=(2, 3, 5), scale=0.3)


@pytest.mark.parametrize("shape", [(2, 4, 5), (3, 1, 1), (3, 6, 6)])
def test_forward_is_the_matrix_exponential_of_the_normalised_convolution(shape):
    layer = moved_layer(shape[0], shape[1:], scale=1.0)
    matrix = conv_matrix(layer.kernel(*shape[1:]), shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    y, _ = layer(x)
    expected = (torch.linalg.matrix_exp(matrix) @ x.flatten(1).T).T.reshape(x.shape) + layer.bias
    torch.testing.assert_close(y, expected, atol=1e-13, rtol=0)


def test_inverse_equals_dense_solve_and_logdet_the_trace():
    layer = moved_layer(2, (4, 5), scale=1.0)
    shape = (2, 4, 5)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], torch.zeros(shape, dtype=torch.float64))
    matrix = jac.reshape(40, 40)
    y = torch.randn(3, *shape, dtype=torch.float64)
    dense = torch.linalg.solve(matrix, (y - layer.bias).flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-12, rtol=0)
    logdet = layer(y)[1]
    torch.testing.assert_close(logdet, torch.linalg.slogdet(matrix)[1].expand(3), atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet[0], torch.trace(conv_matrix(layer.kernel(4, 5), shape)), atol=1e-13, rtol=0)


@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 5), (4, 2, 2), (3, 1, 1), (2, 1, 6)])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_the_norm_bound_holds_in_the_map_wherever_the_parameters_move(shape, scale):
    layer = moved_layer(shape[0], shape[1:], scale, seed=int(10 * scale))
    raw_norm = torch.linalg.matrix_norm(conv_matrix(layer.raw_kernel.detach(), shape), ord=2)
    assert spectral_norm_bound(layer.raw_kernel, *shape[1:]) >= raw_norm * (1 - 1e-12)  # an upper bound
    norm = torch.linalg.matrix_norm(conv_matrix(layer.kernel(*shape[1:]), shape), ord=2)
    assert norm <= layer.coeff


def test_the_bound_is_tight_on_images_larger_than_the_kernel():
    torch.manual_seed(0)
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(conv_matrix(kernel, (3, 12, 12)), ord=2)
    bound = spectral_norm_bound(kernel, 12, 12)
    assert exact <= bound <= 1.03 * exact


def test_normalisation_is_a_constraint_scaling_the_bound_to_coeff():
    layer = moved_layer(3, (4, 4), scale=1.0)
    with torch.no_grad():
        raw_bound = spectral_norm_bound(layer.raw_kernel, 4, 4)
        bound = spectral_norm_bound(layer.kernel(4, 4), 4, 4)
    assert raw_bound > 2 * layer.coeff
    # K = K_raw / (σ/coeff + 1e-5): the bound, homogeneous in the kernel, lands on coeff (less the 1e-5)
    expected = raw_bound / (raw_bound / layer.coeff + 1e-5)
    torch.testing.assert_close(bound, expected, atol=1e-14, rtol=0)
    assert expected.item() == pytest.approx(layer.coeff, rel=1e-4)


def test_series_terms_make_the_remainder_fall_below_the_unit_roundoff():
    assert series_terms(0.95, torch.float64) == 17
    assert series_terms(0.95, torch.float32) == 10
    for coeff in (0.5, 0.95, 1.0, 2.0):
        for dtype in (torch.float64, torch.float32):
            terms, unit_roundoff = series_terms(coeff, dtype), torch.finfo(dtype).eps / 2

            def tail(n, s=coeff):
                return math.fsum(s**i / math.factorial(i) for i in range(n + 1, n + 60))

            assert tail(terms) <= unit_roundoff < tail(terms - 1) * 10  # enough, and not many more than needed


def test_fewer_terms_than_the_rule_would_break_exactness():
    # the rule is what makes the harness hold: the authors' 6 training terms do not, at the norm bound
    layer = moved_layer(3, (4, 4), scale=1.0)
    kernel = layer.kernel(4, 4)
    matrix = conv_matrix(kernel, (3, 4, 4))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    exact = (torch.linalg.matrix_exp(matrix) @ x.flatten(1).T).T.reshape(x.shape)
    assert (conv_exp(x, kernel, 6) - exact).abs().max() > 1e-6
    assert (conv_exp(x, kernel, series_terms(layer.coeff, torch.float64)) - exact).abs().max() < 1e-13


def test_float32_computes_the_float64_map():
    layer = moved_layer(4, (4, 4), scale=1.0)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    y64, logdet64 = layer(x)
    y32, logdet32 = layer.float()(x.float())
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet32.double(), logdet64, atol=1e-4, rtol=0)


def test_initialisation_follows_the_authors():
    torch.manual_seed(0)
    layer = ConvolutionExponential(16, (8, 8))
    assert layer.raw_kernel.std().item() == pytest.approx(1 / (16 * 9), rel=0.05)  # N(0, 1)/(C·k·k)
    assert torch.equal(layer.bias, torch.zeros(16, 8, 8))
    # at this scale the norm constraint is inactive: K = K_raw / (1 + 1e-5), as in spectral.py
    torch.testing.assert_close(layer.kernel(8, 8), layer.raw_kernel / (1 + 1e-5), atol=0, rtol=1e-7)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(layer(x)[1], 64 * torch.trace(layer.raw_kernel[:, :, 1, 1]).expand(2) / (1 + 1e-5))


def test_effective_parameter_count_is_what_changes_the_map():
    channels, size = 3, (4, 5)
    torch.manual_seed(0)
    mixer = ConvExpMixer(channels, size).double()
    randomize_parameters(mixer, 0.5)  # constraint active: the normalisation's gradient path is on
    assert effective_parameter_count(mixer) == channels**2 + 9 * channels**2 + channels * 4 * 5
    x = torch.randn(4, channels, *size, dtype=torch.float64)
    y, logdet = mixer(x)
    ((y * torch.randn_like(y)).sum() + logdet.sum()).backward()
    assert all(bool((p.grad != 0).all()) for p in mixer.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="odd"):
        ConvolutionExponential(2, (4, 4), kernel_size=4)
    with pytest.raises(ValueError, match="positive"):
        ConvolutionExponential(2, (4, 4), coeff=0.0)
