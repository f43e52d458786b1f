"""Data sets as uint8 image splits; ``load_dataset(name, root)`` is the one entry point."""

from __future__ import annotations

from pathlib import Path

from flowbench.data.base import ArraySplit, ImageData, PngSplit
from flowbench.data.embedded import load_digits, load_embedded
from flowbench.data.files import load_celeba_hq, load_cifar10, load_imagenet
from flowbench.errors import FlowbenchError, unknown_name

DATASETS = {
    "embedded": lambda root: load_embedded(32),
    "embedded64": lambda root: load_embedded(64),
    "digits": lambda root: load_digits(),
    "cifar10": load_cifar10,
    "imagenet32": lambda root: load_imagenet(root, 32),
    "imagenet64": lambda root: load_imagenet(root, 64),
    "celeba-hq": load_celeba_hq,
}
NEEDS_ROOT = {"cifar10", "imagenet32", "imagenet64", "celeba-hq"}


def load_dataset(name: str, root: str | Path | None = None) -> ImageData:
    if name not in DATASETS:
        raise FlowbenchError(unknown_name("data set", name, DATASETS))
    return DATASETS[name](Path(root) if root is not None else None)


__all__ = ["ArraySplit", "DATASETS", "ImageData", "NEEDS_ROOT", "PngSplit", "load_dataset"]
