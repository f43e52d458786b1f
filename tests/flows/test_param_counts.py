"""Parameter counts that count: at the CIFAR-10 cards (3×32×32), ``num_parameters()`` equals a
count derived by hand from each architecture, and in every registered model exactly the counted
entries can change the map."""

import pytest
import torch

import flowbench
from flowbench.cards import load_card
from flowbench.flows import model_entry
from tests.flows.harness import prepare

# Glow's architecture (flows/glow.py), per level l: squeeze to C channels (12, 24, 48 from a 3-channel
# image), K steps, then a split prior on half the channels (last level: a learned top prior).


def glow_coupling(c, h):
    """Coupling on C channels: conv3×3 (C/2 → h, no bias), ActNorm, conv1×1 (h → h, no bias), ActNorm,
    zero conv3×3 (h → C, with bias) scaled by a per-channel logs."""
    return 9 * (c // 2) * h + 2 * h + h * h + 2 * h + 9 * h * c + c + c


def glow_family(mixer, depth, levels, h, channels=3):
    total, c = 0, 4 * channels
    for level in range(levels):
        c = c if level == 0 else 2 * c
        total += depth * (2 * c + mixer(c) + glow_coupling(c, h))  # ActNorm, mixer, coupling
        total += 9 * (c // 2) * c + c + c if level < levels - 1 else 2 * c  # split prior / top prior
    return total


def realnvp(levels, h, blocks, channels=3):
    """Checkerboard couplings see all c channels and predict shift and log-scale of all c; channel
    couplings see half of 4c and predict 2 × the other half. Each: a residual net (conv3×3 in with
    bias, blocks of two [ActNorm, conv3×3 with bias], ActNorm, zero conv3×3 out with bias and logs),
    a tanh scale per target channel, then an ActNorm on the coupling's channels. Standard normal prior."""

    def coupling(n_in, n_target, c):
        net = 9 * n_in * h + h + blocks * 2 * (2 * h + 9 * h * h + h) + 2 * h + 9 * h * 2 * n_target + 4 * n_target
        return net + n_target + 2 * c

    total, c = 0, channels
    for level in range(levels):
        if level == levels - 1:
            total += 4 * coupling(c, c, c)
        else:
            total += 3 * coupling(c, c, c) + 3 * coupling(2 * c, 2 * c, 4 * c)
            c = 2 * c
    return total


HAND_COUNT = {
    "glow": lambda hp: glow_family(lambda c: c * c, hp["depth"], hp["levels"], hp["hidden_channels"]),
    "nxn_shift": lambda hp: glow_family(lambda c: c * c + 2 * c, hp["depth"], hp["levels"], hp["hidden_channels"]),
    "periodic": lambda hp: glow_family(lambda c: 9 * c * c, hp["depth"], hp["levels"], hp["hidden_channels"]),
    "realnvp": lambda hp: realnvp(hp["levels"], hp["hidden_channels"], hp["n_blocks"]),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNT))
def test_count_at_the_cifar10_card_equals_the_hand_count(name):
    hparams = load_card(name).hparams_for("cifar10")
    model = flowbench.build_model(name, (3, 32, 32), **hparams)
    assert model.num_parameters() == HAND_COUNT[name](hparams)


def test_the_hand_count_reproduces_glows_published_size():
    # Kingma & Dhariwal report about 44M parameters for Glow on CIFAR-10 (K=32, L=3, 512 channels)
    assert HAND_COUNT["glow"]({"depth": 32, "levels": 3, "hidden_channels": 512}) == 44_052_816


VARIANTS = [(name, {}) for name in flowbench.list_models()] + [
    ("glow", {"lu": True}),
    ("glow", {"additive": True}),
    ("nxn_shift", {"lu": True, "learned_prior": False}),
]


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=[f"{n}-{'-'.join(e) or 'card'}" for n, e in VARIANTS])
def test_counted_entries_are_exactly_those_that_change_the_map(name, extra):
    """Off its initial values, an entry that can change the map has a non-zero gradient of a random
    projection of (ε, log-det) at some point; one that cannot (masked out, unused) never has. The
    count must be the number of the former. A few random models and inputs, so that a ReLU that
    happens to be dead on one batch of a tiny model does not hide an entry."""
    moved = None
    for seed in range(3):
        torch.manual_seed(seed)
        model = flowbench.build_model(name, (3, 8, 8), **model_entry(name).tiny, **extra).double()
        x = torch.rand(32, 3, 8, 8, dtype=torch.float64) - 0.5
        prepare(model, x, scale=0.05)
        eps, logdet = model.encode(x)
        ((eps * torch.randn_like(eps)).sum() + (logdet * torch.randn_like(logdet)).sum()).backward()
        grads = [torch.zeros_like(p, dtype=torch.bool) if p.grad is None else p.grad != 0 for p in model.parameters()]
        moved = grads if moved is None else [a | b for a, b in zip(moved, grads, strict=True)]
    assert model.num_parameters() == sum(int(m.count_nonzero()) for m in moved)
    assert model.num_allocated_parameters() == sum(m.numel() for m in moved)
