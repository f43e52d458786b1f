"""The shared invertibility harness every layer and model passes.

A layer is checked *off* its initial values: zero-initialised couplings, orthogonal 1×1
weights and α = 1 would hide a missing log-det term or a wrong inverse.
"""

from __future__ import annotations

import torch


def randomize_parameters(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value by Gaussian noise of the given scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))


def prepare(module, x_init: torch.Tensor, scale: float = 0.1):
    """Run one training forward (ActNorm's data-dependent init), then randomise parameters."""
    module.train()
    with torch.no_grad():
        run_forward(module, x_init)
    randomize_parameters(module, scale)
    module.eval()
    return module


def run_forward(module, x):
    return module.encode(x) if hasattr(module, "encode") else module(x)


def run_inverse(module, y):
    return module.decode(y) if hasattr(module, "decode") else module.inverse(y)


def brute_force_logdet(module, x: torch.Tensor) -> torch.Tensor:
    """log|det ∂f(x_i)/∂x_i| per sample, from the dense autograd Jacobian."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: run_forward(module, v[None])[0][0], xi)
        out.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(out)


def assert_invertible(module, x: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    with torch.no_grad():
        y, logdet = run_forward(module, x)
        x_back = run_inverse(module, y)
    assert y.shape[0] == x.shape[0] and y[0].numel() == x[0].numel(), f"{tuple(y.shape)} vs {tuple(x.shape)}"
    assert logdet.shape == (x.shape[0],), f"logdet shape {tuple(logdet.shape)}, want [batch]"
    torch.testing.assert_close(x_back, x, atol=atol, rtol=rtol)


def assert_logdet_exact(module, x: torch.Tensor, atol: float = 1e-7) -> None:
    with torch.no_grad():
        _, logdet = run_forward(module, x)
    torch.testing.assert_close(logdet, brute_force_logdet(module, x), atol=atol, rtol=1e-9)


def check_flow(make, shape=(2, 4, 4), batch: int = 2, sample=torch.randn, scale: float = 0.1, seed: int = 0,
               device="cpu"):
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
