import torch

from flowbench.flows import ActNorm, FlowSequence, InvConv1x1, Level, SplitPrior, Squeeze, TopPrior
from flowbench.flows.multiscale import squeeze, unsqueeze
from tests.flows.harness import check_flow


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = squeeze(x)
    assert y.shape == (1, 4, 2, 2)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    torch.testing.assert_close(unsqueeze(y), x)


def test_squeeze_passes_harness():
    check_flow(Squeeze, shape=(2, 4, 4))


def two_level_flow():
    inner = Level(FlowSequence(Squeeze(), ActNorm(16), InvConv1x1(16)), TopPrior(16))
    outer = Level(FlowSequence(Squeeze(), ActNorm(8), InvConv1x1(8)), SplitPrior(4, 4), inner)
    return outer


def test_two_level_flow_passes_harness():
    check_flow(two_level_flow, shape=(2, 4, 4), scale=0.3)


def test_split_prior_standardises_the_factored_half():
    prior = SplitPrior(2, 2).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    h, z = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps, logdet = prior(z, h)
    mean, log_std = prior._mean_log_std(h)
    log_density = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).flatten(1).sum(1)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(eps).flatten(1).sum(1)
    torch.testing.assert_close(standard + logdet, log_density)
    torch.testing.assert_close(prior.inverse(eps, h), z)
