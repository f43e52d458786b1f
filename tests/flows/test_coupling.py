import pytest
import torch

from flowbench.flows import AffineCoupling
from tests.flows.harness import check_flow


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask": "channel", "parity": 0},
        {"mask": "channel", "parity": 1},
        {"mask": "channel", "additive": True},
        {"mask": "checkerboard", "parity": 0, "scale": "tanh", "n_blocks": 1},
        {"mask": "checkerboard", "parity": 1, "scale": "tanh", "n_blocks": 1},
        {"mask": "channel", "parity": 1, "scale": "tanh", "n_blocks": 2},
    ],
    ids=str,
)
def test_coupling_passes_harness(kwargs):
    check_flow(lambda: AffineCoupling(4, 8, **kwargs), shape=(4, 4, 4), scale=0.3)


def test_odd_channel_count_passes_harness():
    check_flow(lambda: AffineCoupling(3, 8, parity=1), shape=(3, 4, 4), scale=0.3)


def test_coupling_starts_as_identity():
    layer = AffineCoupling(4, 8).train()
    x = torch.randn(2, 4, 4, 4)
    y, logdet = layer(x)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    # Glow's sigmoid(h + 2) at h = 0 is a constant scale, so the log-det is a known constant
    torch.testing.assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))
    torch.testing.assert_close(logdet, torch.full((2,), 32 * float(torch.nn.functional.logsigmoid(torch.tensor(2.0)))))


def test_checkerboard_keeps_the_conditioning_pixels():
    layer = AffineCoupling(2, 8, mask="checkerboard", scale="tanh", n_blocks=1).train()
    layer(torch.randn(4, 2, 4, 4))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, 2, 4, 4)
        y, _ = layer(x)
    m = layer._checkerboard(x).bool().expand_as(x)
    torch.testing.assert_close(y[m], x[m])
    assert not torch.allclose(y[~m], x[~m])
