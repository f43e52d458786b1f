"""Every registered model passes the shared harness, end to end, in float32 and float64."""

import math

import pytest
import torch

import flowbench
from flowbench.flows.models import standard_normal_log_prob
from tests.flows.harness import check_flow, prepare

TINY = {
    "glow": dict(depth=2, levels=2, hidden_channels=8),
    "nxn_shift": dict(depth=2, levels=2, hidden_channels=8),
    "emerging": dict(depth=2, levels=2, hidden_channels=8),
    "periodic": dict(depth=1, levels=2, hidden_channels=8),
    "realnvp": dict(levels=2, hidden_channels=8, n_blocks=1),
}


def test_every_registered_model_has_a_tiny_config():
    assert set(TINY) == set(flowbench.list_models())


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 8, 8)], ids=["2x4x4", "3x8x8"])
def test_model_passes_harness(name, shape):
    check_flow(lambda: flowbench.build_model(name, shape, **TINY[name]), shape=shape, scale=0.05)


@pytest.mark.parametrize("name", sorted(TINY))
def test_log_prob_sample_and_bits_per_dim(name):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **TINY[name])
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x, _ = model.preprocess_pixels(pixels)
    prepare(model, x, scale=0.05)
    eps, logdet = model.encode(x)
    torch.testing.assert_close(model.log_prob(x), standard_normal_log_prob(eps) + logdet)
    bpd = model.bits_per_dim(pixels, torch.Generator().manual_seed(0))
    assert bpd.shape == (4,) and torch.isfinite(bpd).all()
    samples = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, 3, 8, 8)
    images = model.images(samples)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 8, 8)


def test_temperature_scales_the_latent():
    torch.manual_seed(0)
    model = flowbench.build_model("glow", (3, 8, 8), **TINY["glow"])
    prepare(model, torch.rand(8, 3, 8, 8) - 0.5, scale=0.05)
    cold = model.sample(3, temperature=0.5, generator=torch.Generator().manual_seed(2))
    warm = model.sample(3, temperature=1.0, generator=torch.Generator().manual_seed(2))
    eps_cold, _ = model.encode(cold)
    eps_warm, _ = model.encode(warm)
    torch.testing.assert_close(eps_cold, 0.5 * eps_warm, atol=1e-4, rtol=1e-4)


def test_bits_per_dim_of_a_fresh_glow_is_near_8_on_uniform_pixels():
    # A fresh Glow maps x − ½ (std ≈ 0.29) to roughly N(0,1) after ActNorm: a known ballpark
    torch.manual_seed(0)
    model = flowbench.build_model("glow", (3, 8, 8), **TINY["glow"]).train()
    pixels = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    bpd = model.bits_per_dim(pixels).mean().item()
    assert 7.5 < bpd < 8.5, bpd


def test_glow_at_the_cifar10_card_counts_44_million_parameters():
    model = flowbench.build_model("glow", (3, 32, 32), depth=32, levels=3, hidden_channels=512)
    assert math.isclose(model.num_parameters(), 44.1e6, rel_tol=0.005)
