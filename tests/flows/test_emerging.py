import pytest
import torch

from flowbench.flows import EmergingConv2d, MaskedAutoregressiveConv2d
from flowbench.flows.base import FlowSequence, effective_parameter_count
from tests.flows.harness import brute_force_logdet, check_flow, randomize_parameters


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_autoregressive_conv_passes_harness(kernel_size, flipped, bias):
    check_flow(lambda: MaskedAutoregressiveConv2d(3, kernel_size, flipped, bias), shape=(3, 5, 6), scale=0.3)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_emerging_conv_passes_harness(kernel_size):
    check_flow(lambda: EmergingConv2d(4, kernel_size), shape=(4, 4, 5), scale=0.3)
    check_flow(lambda: EmergingConv2d(2, kernel_size, lu=True), shape=(2, 6, 5), scale=0.3)


def dense_matrix(layer, shape):
    """d layer(x) / dx, [C·H·W out, C·H·W in]; the layers here are affine, so any x will do."""
    x = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x, vectorize=True)
    return jac.reshape(x.numel(), x.numel())


def pixel_blocks(layer, channels, height, width):
    """The Jacobian as [out row, out col, in row, in col, C_out, C_in] blocks."""
    m = dense_matrix(layer, (channels, height, width)).view(channels, height, width, channels, height, width)
    return m.permute(1, 2, 4, 5, 0, 3)


def random_layer(make, seed, scale=0.5):
    torch.manual_seed(seed)
    layer = make().double()
    randomize_parameters(layer, scale, seed)
    return layer


def assert_support(blocks, offsets):
    """Block (out q, in p) is nonzero exactly when q − p is one of ``offsets`` (inside the image)."""
    height, width = blocks.shape[:2]
    nonzero = blocks.abs().amax((-2, -1)) > 0
    for pi in range(height):
        for pj in range(width):
            want = torch.zeros(height, width, dtype=torch.bool)
            for di, dj in offsets:
                if 0 <= pi + di < height and 0 <= pj + dj < width:
                    want[pi + di, pj + dj] = True
            assert torch.equal(nonzero[:, :, pi, pj], want), f"input pixel ({pi}, {pj})"


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_the_two_masked_convs_reach_exactly_the_k_by_k_square(kernel_size):
    """The receptive field of Hoogeboom et al.: one perturbed input pixel moves outputs in the
    k×k square around it, at every offset, and nowhere else (a half-plane mask reaches 3×5)."""
    r = kernel_size // 2
    emerging = random_layer(lambda: EmergingConv2d(2, kernel_size), seed=kernel_size)
    pair = FlowSequence(*emerging.layers[1:])
    size = 2 * kernel_size - 1  # interior pixels see the whole square, border pixels its clipped part
    square = [(di, dj) for di in range(-r, r + 1) for dj in range(-r, r + 1)]
    assert_support(pixel_blocks(pair, 2, size, size), square)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("flipped", [False, True])
def test_each_conv_sees_its_quadrant_and_a_triangular_centre(kernel_size, flipped):
    """get_conv_square_ar_mask: output (i, j) reads inputs (i+a, j+b), 0 ≤ a, b ≤ r, and output
    channel c reads input channels ≤ c at its own pixel; the flip mirrors all of it."""
    r, channels = kernel_size // 2, 3
    layer = random_layer(lambda: MaskedAutoregressiveConv2d(channels, kernel_size, flipped), seed=7)
    blocks = pixel_blocks(layer, channels, 2 * kernel_size - 1, 2 * kernel_size - 1)
    sign = 1 if flipped else -1  # input p affects output q = p − (a, b); flipped: q = p + (a, b)
    assert_support(blocks, [(sign * a, sign * b) for a in range(r + 1) for b in range(r + 1)])
    centre = blocks[r, r, r, r]
    triangle = torch.triu(centre) if flipped else torch.tril(centre)
    torch.testing.assert_close(centre, triangle, rtol=0, atol=0)
    assert (triangle != 0).sum() == channels * (channels + 1) // 2


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_inverse_equals_dense_solve(kernel_size, flipped):
    # weights small beside the unit diagonal keep the solve well conditioned (large ones make
    # the autoregressive inverse grow geometrically across the image)
    layer = random_layer(lambda: MaskedAutoregressiveConv2d(3, kernel_size, flipped, bias=True), seed=1, scale=0.2)
    shape = (3, 5, 4)
    y = torch.randn(2, *shape, dtype=torch.float64)
    offset = layer(torch.zeros(1, *shape, dtype=torch.float64))[0]  # the bias
    dense = torch.linalg.solve(dense_matrix(layer, shape), (y - offset).flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)


def test_emerging_inverse_equals_dense_solve():
    layer = random_layer(lambda: EmergingConv2d(3, 3), seed=4, scale=0.2)
    shape = (3, 6, 5)
    y = torch.randn(2, *shape, dtype=torch.float64)
    offset = layer(torch.zeros(1, *shape, dtype=torch.float64))[0]
    dense = torch.linalg.solve(dense_matrix(layer, shape), (y - offset).flatten(1).T).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y), dense, atol=1e-10, rtol=0)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_inverse_solves_anti_diagonal_wavefronts_not_pixels(kernel_size, flipped):
    layer = MaskedAutoregressiveConv2d(2, kernel_size, flipped)
    height, width = 32, 24
    fronts = layer._wavefront_indices(height, width, torch.device("cpu"))
    assert len(fronts) == height + width - 1  # against H·W = 768 pixels
    solved = torch.cat([centre for _, centre in fronts])
    assert len(solved) == height * width and len(solved.unique()) == height * width
    padded_width = width + 2 * (kernel_size // 2)
    first = fronts[0][1].tolist()
    corner = (0, 0) if flipped else (height - 1, width - 1)  # the pixel that depends on no other
    r = kernel_size // 2
    assert first == [(corner[0] + r) * padded_width + corner[1] + r]


@pytest.mark.parametrize("flipped", [False, True])
def test_logdet_from_centre_diagonals(flipped):
    layer = random_layer(lambda: MaskedAutoregressiveConv2d(2, 3, flipped, bias=True), seed=3)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    diagonal = torch.diagonal(layer.weight[:, :, 1, 1])
    torch.testing.assert_close(layer(x)[1], 12 * diagonal.abs().log().sum().expand(1))
    torch.testing.assert_close(layer(x)[1], brute_force_logdet(layer, x))


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_only_unmasked_weights_count(kernel_size):
    """Per conv: (r+1)² − 1 full C×C taps off the centre, a lower triangle with its diagonal on it."""
    c, r = 5, kernel_size // 2
    conv = ((r + 1) ** 2 - 1) * c * c + c * (c + 1) // 2
    layer = EmergingConv2d(c, kernel_size)
    assert effective_parameter_count(layer) == c * c + 2 * conv + c  # 1×1, two convs, bias
    assert sum(p.numel() for p in layer.parameters()) == c * c + 2 * kernel_size**2 * c * c + c
