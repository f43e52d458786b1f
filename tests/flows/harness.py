"""The shared invertibility harness every layer and model passes.

A layer is checked *off* its initial values: zero-initialised couplings, orthogonal 1×1
weights and α = 1 would hide a missing log-det term or a wrong inverse.
"""

from __future__ import annotations

import torch

from flowbench.flows.base import Flow
from flowbench.flows.models import FlowModel


def randomize_parameters(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value by Gaussian noise of the given scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))


def as_layer(module):
    """A layer as is; a model through its flow (preprocessed x → ε), itself one layer."""
    return module.flow if isinstance(module, FlowModel) else module


def prepare(module, x_init: torch.Tensor, scale: float = 0.1):
    """Run one training forward (ActNorm's data-dependent init), then randomise parameters."""
    module.train()
    with torch.no_grad():
        as_layer(module)(x_init)
    randomize_parameters(module, scale)
    module.eval()
    return module


def brute_force_logdet(module, x: torch.Tensor) -> torch.Tensor:
    """log|det ∂f(x_i)/∂x_i| per sample, from the dense autograd Jacobian."""
    layer, out = as_layer(module), []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], xi)
        out.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(out)


def assert_invertible(module, x: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    layer = as_layer(module)
    with torch.no_grad():
        y, logdet = layer(x)
        x_back = layer.inverse(y)
    assert y.shape[0] == x.shape[0] and y[0].numel() == x[0].numel(), f"{tuple(y.shape)} vs {tuple(x.shape)}"
    assert logdet.shape == (x.shape[0],), f"logdet shape {tuple(logdet.shape)}, want [batch]"
    torch.testing.assert_close(x_back, x, atol=atol, rtol=rtol)


def assert_logdet_exact(module, x: torch.Tensor, atol: float = 1e-7) -> None:
    with torch.no_grad():
        _, logdet = as_layer(module)(x)
    torch.testing.assert_close(logdet, brute_force_logdet(module, x), atol=atol, rtol=1e-9)


def check_flow(
    make, shape=(2, 4, 4), batch: int = 2, sample=torch.randn, scale: float = 0.1, seed: int = 0, device="cpu"
):
    """The whole harness: round trip in float32 and float64, exact log-det in float64.

    ``make()`` builds a fresh module; ``sample(shape)`` draws valid inputs (on the CPU).
    """
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        torch.manual_seed(seed)
        module = make().to(device, dtype)
        prepare(module, sample((8, *shape)).to(device, dtype), scale)
        x = sample((batch, *shape)).to(device, dtype)
        assert_invertible(module, x, atol=atol, rtol=1e-3 if dtype == torch.float32 else 0.0)
        if dtype == torch.float64:
            assert_logdet_exact(module, x)


def layer_inputs(module, x: torch.Tensor) -> list[tuple[Flow, torch.Tensor]]:
    """Every layer inside ``module`` with the input it sees in one forward pass of ``x``. A layer
    its parent does not call in forward (e.g. fused into the parent's own map) gets the parent's input."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda layer, args: seen.setdefault(layer, args[0]))
        for m in module.modules()
        if isinstance(m, Flow)
    ]
    try:
        with torch.no_grad():
            if isinstance(module, FlowModel):  # x: images in [0, 1), through the preprocessing too
                x, _ = module.preprocess(x)
            as_layer(module)(x)
    finally:
        for hook in hooks:
            hook.remove()
    for parent in list(module.modules()):
        for child in parent.children():
            if isinstance(child, Flow) and child not in seen and parent in seen:
                seen[child] = seen[parent]
    return list(seen.items())


def check_every_layer(module, x: torch.Tensor) -> set[type]:
    """Each layer inside a prepared float64 ``module`` passes the harness at the input it sees
    there (once per kind of layer and input shape); returns the kinds checked."""
    checked = set()
    for layer, inp in layer_inputs(module, x):
        if (type(layer), inp.shape) in checked:
            continue
        checked.add((type(layer), inp.shape))
        assert_invertible(layer, inp, atol=1e-9)
        assert_logdet_exact(layer, inp)
    return {kind for kind, _ in checked}
