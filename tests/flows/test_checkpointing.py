"""Gradient checkpointing per flow step: the same gradients as plain backprop, less kept memory."""

import copy

import pytest
import torch

import flowbench
from tests.flows.test_models import TINY


def loss_and_grads(model, pixels):
    model.zero_grad()
    loss = model.bits_per_dim(pixels, torch.Generator(pixels.device).manual_seed(0)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpointed_gradients_equal_plain_backprop(name):
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 8, 8), **TINY[name]).double().train()
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    model.bits_per_dim(pixels)  # ActNorm initialisation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # couplings off their zero init, so gradients flow everywhere
    lean = copy.deepcopy(model)
    lean.set_gradient_checkpointing(True)
    loss, grads = loss_and_grads(model, pixels)
    lean_loss, lean_grads = loss_and_grads(lean, pixels)
    torch.testing.assert_close(lean_loss, loss, rtol=0, atol=0)
    assert grads.keys() == lean_grads.keys() and len(grads) == len(list(model.parameters()))
    for key in grads:
        torch.testing.assert_close(lean_grads[key], grads[key], rtol=1e-10, atol=1e-12)


def saved_bytes(model, pixels) -> int:
    """Bytes autograd holds for backward after one forward (what checkpointing is meant to cut)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.bits_per_dim(pixels).mean()
    return total


def test_checkpointing_keeps_far_less_for_backward():
    torch.manual_seed(0)
    model = flowbench.build_model("glow", (3, 16, 16), depth=4, levels=2, hidden_channels=64).train()
    pixels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    plain = saved_bytes(model, pixels)
    model.set_gradient_checkpointing(True)
    lean = saved_bytes(model, pixels)
    assert lean < 0.1 * plain, (lean, plain)
