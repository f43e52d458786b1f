"""Every model trains at its CIFAR-10 card with its card's recipe: 20 steps of finite, falling loss.

The papers' global batches (256-512 images over 4-8 GPUs) do not fit a 2-core CI machine, so the
steps run on 2 CIFAR-shaped images (32×32 photographs of the embedded set), a fixed batch; the
optimiser, learning rate, warm-up and clipping are the card's (issue #12 saw n×n at this card
diverge at step 2 with lr 1e-3 and no warm-up). Minutes per model on 2 CPU cores,
so not in the default suite: ``pytest -m paper_scale``.
"""

import math

import pytest
import torch

import flowbench
from flowbench.cards import load_card
from flowbench.data import load_dataset
from flowbench.trial import LossMeter, Shard, prepare_training, train_step, warmup_schedule

BATCH, STEPS = 2, 20


@pytest.mark.paper_scale
@pytest.mark.parametrize("name", flowbench.list_models())
def test_cifar10_card_trains_with_its_recipe(name):
    card = load_card(name)
    recipe = card.recipe_for("cifar10")
    assert recipe is not None and recipe.source, f"{name}: no CIFAR-10 recipe with its source"
    torch.manual_seed(0)
    model = flowbench.build_model(name, (3, 32, 32), **card.hparams_for("cifar10"))
    optimizer = prepare_training(model, torch.device("cpu"), recipe.lr, recipe.optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(recipe.warmup_steps))
    pixels = load_dataset("embedded").train.batch(range(0, 40 * BATCH, 40))
    noise = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for step in range(STEPS):
        meter = LossMeter(torch.device("cpu"))
        meter.add(train_step(model, optimizer, pixels, noise, recipe.grad_clip), step + 1)
        schedule.step()
        loss, first_bad, _ = meter.read(Shard())
        assert first_bad is None, f"{name}: loss not finite at step {step + 1}"
        losses.append(loss)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}: loss did not fall ({first:.3f} -> {last:.3f}): {losses}"
