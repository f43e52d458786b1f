"""Budget and data order: how far a trial has come, when it evaluates, which images each step sees."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from flowbench.trial.settings import TrialConfig


@dataclasses.dataclass
class Progress:
    """What a trial has spent; saved in its checkpoint. ``epoch``/``position`` place it in the
    seeded data order, so a resumed trial sees exactly the batches it would have seen."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    epoch: int = 0
    position: int = 0
    flops_per_image: float = math.nan
    compile_seconds: float = 0.0  # torch.compile's, every (re)start of the trial together; not in train_seconds

    @property
    def train_flops(self) -> float:
        return self.images_seen * self.flops_per_image

    def epochs(self, n_train: int) -> float:
        return self.epoch + self.position / n_train

    def spent(self, kind: str, n_train: int) -> float:
        return {
            "steps": self.step,
            "epochs": self.epochs(n_train),
            "images": self.images_seen,
            "seconds": self.train_seconds,
            "flops": self.train_flops,
        }[kind]


class Milestones:
    """The evaluations along a budget: the k-th at the first step that has spent k/N of it (N
    ``evaluations``, the last at the budget itself), in the budget's own unit. ``reached`` is how
    many are behind; a resumed trial starts from what it had ``spent``."""

    def __init__(self, budget: float, evaluations: int, spent: float = 0.0):
        self.budget = budget
        self.targets = [budget * k / evaluations for k in range(1, evaluations)] + [budget]
        self.reached = sum(t <= spent for t in self.targets)

    def due(self, spent: float) -> bool:
        """Whether the step that brought the trial to ``spent`` is evaluated (one step may pass
        several milestones: one evaluation, at the last of them)."""
        if spent < self.budget and spent < self.targets[self.reached]:
            return False
        self.reached = sum(t <= spent for t in self.targets)
        return True


def batch_plan(config: TrialConfig, n_train: int, start: Progress) -> Iterator[tuple[np.ndarray, int, int]]:
    """The remaining steps' batches, in order: (indices, epoch, position after the batch).

    Epoch e is the permutation from (seed, e). The budget decides the sizes: an images budget
    cuts the last batch so exactly ``budget`` images are seen, an epochs budget ends each epoch
    with what remains of it. Steps, FLOPs (per image constant at a fixed shape) and images are
    known ahead, so the plan stops at the budget; a seconds budget is the consumer's to stop."""
    epoch, position, images, step = start.epoch, start.position, start.images_seen, start.step
    order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
    per_image = start.flops_per_image
    while True:
        spent = {
            "steps": step,
            "epochs": epoch + position / n_train,
            "images": images,
            "seconds": 0.0,
            "flops": images * per_image,
        }[config.budget_kind]
        left = config.budget - spent
        if left <= 0:
            return
        size = config.batch_size
        if config.budget_kind == "images":
            size = min(size, int(left))
        if config.budget_kind == "epochs":
            size = min(size, n_train - position, math.ceil(left * n_train))
        indices = order[position : position + size]
        position += len(indices)
        images += len(indices)
        step += 1
        if position >= n_train:
            epoch, position = epoch + 1, 0
            order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
        yield indices, epoch, position
