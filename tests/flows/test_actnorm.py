import torch

from flowbench.flows import ActNorm
from tests.flows.harness import check_flow


def test_actnorm_passes_harness():
    check_flow(lambda: ActNorm(3), shape=(3, 4, 4))


def test_data_dependent_init_standardises_each_channel():
    x = torch.randn(16, 3, 8, 8) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + 3.0
    layer = ActNorm(3).train()
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_loaded_actnorm_does_not_reinitialise():
    layer = ActNorm(2).train()
    layer(torch.randn(8, 2, 4, 4) * 5)
    loaded = ActNorm(2).train()
    loaded.load_state_dict(layer.state_dict())
    loaded(torch.randn(8, 2, 4, 4) + 100)  # a very different first batch
    torch.testing.assert_close(loaded.bias, layer.bias)
    torch.testing.assert_close(loaded.log_scale, layer.log_scale)


def test_no_init_in_eval_mode():
    layer = ActNorm(2).eval()
    layer(torch.randn(4, 2, 4, 4) + 10)
    assert not layer.initialized
    assert torch.all(layer.bias == 0)
