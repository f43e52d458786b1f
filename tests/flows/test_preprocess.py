import math

import torch

from flowbench.flows import CenterPreprocess, LogitPreprocess, dequantize, quantize
from flowbench.flows.preprocess import bits_per_dim
from tests.flows.harness import check_flow


def uniform01(shape):
    return torch.rand(shape) * 0.98 + 0.01


def test_logit_passes_harness():
    check_flow(LogitPreprocess, shape=(2, 3, 3), sample=uniform01)


def test_center_passes_harness():
    check_flow(CenterPreprocess, shape=(2, 3, 3), sample=uniform01)


def test_dequantize_stays_in_its_bin_and_quantize_inverts_it():
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    for n_bits in (8, 5):
        x = dequantize(pixels, n_bits, torch.Generator().manual_seed(0))
        bins = 2**n_bits
        levels = pixels.long() // 2 ** (8 - n_bits)
        assert ((x * bins).floor().long() == levels).all()
        torch.testing.assert_close(quantize(x, n_bits).long(), levels * 2 ** (8 - n_bits))


def test_dequantize_is_seeded():
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    a = dequantize(pixels, 8, torch.Generator().manual_seed(5))
    b = dequantize(pixels, 8, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_uniform_density_is_exactly_n_bits_per_dim():
    # p(x) = 1 on [0,1)^D means every discrete pixel has probability 2^-n_bits
    for n_bits in (8, 5):
        torch.testing.assert_close(bits_per_dim(torch.zeros(3), 12, n_bits), torch.full((3,), float(n_bits)))
    assert math.isclose(float(bits_per_dim(torch.tensor(-12 * math.log(2)), 12, 8)), 9.0)
