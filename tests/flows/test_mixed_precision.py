"""bfloat16 coupling networks: each coupling's log-det stays the exact log|det J| of the map computed.

The check is per coupling layer, at the input it sees inside the model. A dense Jacobian of the
whole model is no reference here: autograd differentiates the bf16 networks in bf16, and for
realnvp (condition number ~1e6) reverse- and forward-mode Jacobians of the same map differ by 1.5%
and their log-dets by nats. One coupling's Jacobian is block-triangular, so that noise lands off
the diagonal blocks and its determinant is exact.
"""

import pytest
import torch

import flowbench
from flowbench.flows.coupling import AffineCoupling
from tests.flows.harness import assert_invertible, brute_force_logdet, prepare
from tests.flows.test_models import TINY


def coupling_inputs(model, x):
    """(layer, input, log-det) for every coupling in one encode of ``x``."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out[1])))
        for m in model.modules()
        if isinstance(m, AffineCoupling)
    ]
    with torch.no_grad():
        model.encode(x)
    for hook in hooks:
        hook.remove()
    return seen


def check_bf16_couplings(name: str, device="cpu"):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **TINY[name]).to(device)
    prepare(model, torch.rand(8, 3, 8, 8, device=device) - 0.5, scale=0.05)
    x = torch.rand(2, 3, 8, 8, device=device) - 0.5
    full, _ = model.encode(x)
    model.set_coupling_precision(torch.bfloat16)
    with torch.no_grad():
        eps, _ = model.encode(x)
    assert eps.dtype == torch.float32
    assert not torch.equal(eps, full) and torch.isfinite(eps).all()  # the networks really ran in bfloat16
    # forward and inverse run the same networks, but float32 round-off upstream can move a network
    # input across a bfloat16 rounding boundary: reconstructions hold to bfloat16's ~1e-2, not 1e-6
    assert_invertible(model, x, atol=0.1, rtol=0.05)
    # one image, so each network sees the same batch as in its Jacobian's forward (bf16 kernels vary with it)
    couplings = coupling_inputs(model, x[:1])
    assert couplings and all(layer.net_dtype == torch.bfloat16 for layer, _, _ in couplings)
    for layer, inp, logdet in couplings:
        torch.testing.assert_close(logdet, brute_force_logdet(layer, inp), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_coupling_nets_keep_the_flow_exact(name):
    check_bf16_couplings(name)
