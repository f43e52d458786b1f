"""Every registered model passes the shared harness, end to end and layer by layer, with the
smallest configuration its registration declares (``tiny``): a new flow is checked without edits."""

import pytest
import torch

import flowbench
from flowbench.flows import ActNorm, Flow, SplitPrior, TopPrior, dequantize, model_entry
from flowbench.flows.base import FlowStep
from flowbench.flows.models import standard_normal_log_prob
from tests.flows.harness import check_every_layer, check_flow, prepare

TINY = {name: model_entry(name).tiny for name in flowbench.list_models()}
# the generic tests below read the registration at call time: tests/flows/test_toy_flow.py runs them on a plugin


@pytest.mark.parametrize("name", sorted(TINY))
def test_registered_tiny_config_is_small_and_accepted(name):
    tiny = model_entry(name).tiny
    assert set(tiny) <= set(model_entry(name).hparams())
    assert flowbench.build_model(name, (3, 8, 8), **tiny).num_parameters() < 50_000


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 8, 8)], ids=["2x4x4", "3x8x8"])
def test_model_passes_harness(name, shape):
    check_flow(lambda: flowbench.build_model(name, shape, **model_entry(name).tiny), shape=shape, scale=0.05)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_layer_inside_the_model_passes_harness(name):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (2, 4, 4), **model_entry(name).tiny).double()
    images = dequantize(torch.randint(0, 256, (8, 2, 4, 4), dtype=torch.uint8), dtype=torch.float64)
    prepare(model, model.preprocess(images)[0], scale=0.05)
    checked = check_every_layer(model, images[:2])
    assert checked == {type(m) for m in model.modules() if isinstance(m, Flow)}


@pytest.mark.parametrize("name", sorted(TINY))
def test_log_prob_sample_and_bits_per_dim(name):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **model_entry(name).tiny)
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


@pytest.mark.parametrize("name", ["glow", "nxn_shift", "emerging", "periodic"])
def test_ablation_switches_remove_actnorm_and_the_learned_priors(name):
    full = flowbench.build_model(name, (3, 8, 8), **TINY[name])
    bare = flowbench.build_model(name, (3, 8, 8), **TINY[name], actnorm=False, learned_prior=False)
    full_steps, bare_steps = ([m for m in model.modules() if isinstance(m, FlowStep)] for model in (full, bare))
    assert all(isinstance(step.layers[0], ActNorm) for step in full_steps)
    assert len(bare_steps) == len(full_steps)
    assert not any(isinstance(layer, ActNorm) for step in bare_steps for layer in step.layers)
    # standard normal priors: ε is what the steps give, nothing is added to the log-det
    z, h = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    for prior in (m for m in bare.modules() if isinstance(m, (SplitPrior, TopPrior))):
        assert not list(prior.parameters())
        eps, logdet = prior(z, h) if isinstance(prior, SplitPrior) else prior(z)
        assert torch.equal(eps, z) and torch.equal(logdet, torch.zeros(2))
