"""The Emerging model's parameter count at its CIFAR-10 card, derived by hand from the architecture."""

import flowbench
from flowbench.cards import load_card


def test_emerging_at_the_cifar10_card_counts_what_can_change_the_map():
    card = load_card("emerging").hparams_for("cifar10")
    assert card == dict(depth=32, levels=3, hidden_channels=512, kernel_size=3)  # what the formula assumes
    depth, hidden, k = 32, 512, 3
    free_taps = ((k + 1) // 2) ** 2 - 1  # quadrant taps off the centre, each a full C×C matrix

    def step(c):
        actnorm = 2 * c
        conv1x1 = c * c
        masked_conv = free_taps * c * c + c * (c + 1) // 2  # centre tap: lower triangle with its diagonal
        emerging = conv1x1 + 2 * masked_conv + c  # + one bias
        # Glow's coupling net on c/2 channels: 3×3 conv (no bias), ActNorm, 1×1 conv (no bias),
        # ActNorm, zero-initialised 3×3 conv to 2·(c/2) channels with bias and per-channel logs
        coupling = 9 * (c // 2) * hidden + 2 * hidden + hidden * hidden + 2 * hidden + 9 * hidden * c + 2 * c
        return actnorm + emerging + coupling

    # squeeze: 3 → 12 → (split to 6) 24 → (split to 12) 48 channels
    def split_prior(c):  # zero conv from the kept half to mean and log-std
        return 9 * (c // 2) * c + 2 * c

    top_prior = 2 * 48
    expected = depth * (step(12) + step(24) + step(48)) + split_prior(12) + split_prior(24) + top_prior
    model = flowbench.build_model("emerging", (3, 32, 32), **card)
    assert model.num_parameters() == expected == 44_735_568
    # masked-out taps still take memory: 9·C² allocated per conv instead of the free ones
    masked_out = depth * sum(2 * (k * k * c * c - free_taps * c * c - c * (c + 1) // 2) for c in (12, 24, 48))
    assert model.num_allocated_parameters() == expected + masked_out == 45_797_328
