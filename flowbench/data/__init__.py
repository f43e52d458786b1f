"""Data sets as uint8 image splits read memory-mapped from a prepared cache.

``load_dataset(name, root)`` is the one entry point for trials: it opens the data set's prepared
cache, preparing it first when there is none or its source changed (``flowbench.data.cache``).
``root`` is the data set's source folder/file, or a prepared cache itself. ``dataset_info`` says
what a data set is without loading pixels (the sweep driver's check); ``prepare_dataset`` is
``flowbench data prepare``.
"""

from __future__ import annotations

from pathlib import Path

from flowbench.data.base import SPLITS, ArraySplit, ImageData, Source
from flowbench.data.cache import (
    DatasetInfo,
    build_cache,
    default_cache_dir,
    is_cache,
    is_current,
    open_cache,
    read_manifest,
    split_sizes,
    validation_size,
)
from flowbench.data.embedded import digits_source, embedded_source
from flowbench.data.files import celeba_hq_source, cifar10_source, imagenet_source
from flowbench.data.loader import Prefetcher
from flowbench.data.remote import local_root
from flowbench.errors import FlowbenchError, unknown_name

DATASETS = {  # name -> the Source of its files under a root (None: data shipped with the packages)
    "embedded": lambda root: embedded_source(32),
    "embedded64": lambda root: embedded_source(64),
    "digits": lambda root: digits_source(),
    "cifar10": cifar10_source,
    "imagenet32": lambda root: imagenet_source(root, 32),
    "imagenet64": lambda root: imagenet_source(root, 64),
    "celeba-hq": celeba_hq_source,
}
NEEDS_ROOT = {"cifar10", "imagenet32", "imagenet64", "celeba-hq"}
# What the downloaded data sets are, as published: (image shape, n_bits, images per published split).
# Planning a sweep (flowbench sweep --dry-run) needs shapes and sizes, not pixels, and may run where
# the files are not. CIFAR-10: cs.toronto.edu/~kriz/cifar.html; ImageNet 32×32 and 64×64: ILSVRC-2012's
# training and validation images, as Chrabaszcz et al. (2017)'s npz batches hold them (Oord et al.'s PNG
# folders differ by a few dozen). CelebA-HQ's size is whatever its files were made at: not listed.
PUBLISHED = {
    "cifar10": ((3, 32, 32), 8, {"train": 50_000, "test": 10_000}),
    "imagenet32": ((3, 32, 32), 8, {"train": 1_281_167, "test": 50_000}),
    "imagenet64": ((3, 64, 64), 8, {"train": 1_281_167, "test": 50_000}),
}


def find_source(name: str, root: str | Path | None) -> Source:
    """The data set's files under ``root`` (cheap checks only); a one-line error when absent."""
    if name not in DATASETS:
        raise FlowbenchError(unknown_name("data set", name, DATASETS))
    return DATASETS[name](Path(root) if root is not None else None)


def load_dataset(name: str, root: str | Path | None = None) -> ImageData:
    """The data set's splits, memory-mapped from its prepared cache: ``root`` itself when it is
    one, else the default cache of ``root`` (built here, once, when missing or out of date)."""
    root = local_root(name, root)  # an s3:// root: its copy staged on this node
    prepared = _given_cache(name, root)
    if prepared is not None:
        data = open_cache(prepared, name)
        if data is None:
            raise FlowbenchError(
                f"{prepared}: a cache of an older flowbench format; run "
                f"`flowbench data prepare {name}` on its source again"
            )
        return data
    source = find_source(name, root)
    cache = default_cache_dir(name, root)
    checksum = source.checksum()
    data = open_cache(cache, name, checksum)
    if data is None:
        build_cache(source, cache)
        data = open_cache(cache, name, checksum)
    if data is None:
        raise FlowbenchError(f"{cache}: its source changed while it was prepared; run again")
    return data


def prepare_dataset(
    name: str, root: str | Path | None = None, cache: str | Path | None = None
) -> tuple[Path, dict, bool]:
    """``flowbench data prepare``: (cache folder, its manifest, whether this call built it)."""
    root = local_root(name, root)  # an s3:// root: its copy staged on this node
    if root is not None and is_cache(root):
        raise FlowbenchError(f"{root}: already a prepared cache; give the data set's source folder")
    source = find_source(name, root)
    cache = Path(cache) if cache is not None else default_cache_dir(name, root)
    built = build_cache(source, cache)
    manifest = read_manifest(cache)
    if manifest is None:  # removed by a rebuild in another process since this one built or found it
        raise FlowbenchError(f"{cache}: its source changed while it was prepared; run again")
    return cache, manifest, built


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Image shape, n_bits and images per split without loading a split: from the prepared cache's
    manifest when there is a current one, else from the source's listing and headers (CIFAR-10's
    pickles, which record no count, are unpickled one at a time to count their rows)."""
    root = local_root(name, root)  # an s3:// root: its copy staged on this node
    prepared = _given_cache(name, root)
    if prepared is not None:
        manifest = read_manifest(prepared)
        if not is_current(manifest):
            raise FlowbenchError(
                f"{prepared}: a cache of an older flowbench format; run "
                f"`flowbench data prepare {name}` on its source again"
            )
        if manifest.get("dataset") != name:
            raise FlowbenchError(
                f"{prepared}: a prepared cache of {manifest.get('dataset')!r}, not of {name!r}; "
                "give the data set's own cache or source folder"
            )
        return DatasetInfo(name, tuple(manifest["image_shape"]), manifest["n_bits"], manifest["splits"], prepared)
    source = find_source(name, root)
    cache = default_cache_dir(name, root)
    manifest = read_manifest(cache) if cache.is_dir() else None
    if is_current(manifest, source.checksum()):
        return DatasetInfo(name, tuple(manifest["image_shape"]), manifest["n_bits"], manifest["splits"], cache)
    return DatasetInfo(name, source.image_shape, source.n_bits, split_sizes(source, source.sizes()), None)


def published_info(name: str) -> DatasetInfo | None:
    """What a downloaded data set is by its publication (``PUBLISHED``), validation carved as from its
    files; None for one whose shape depends on its files."""
    if name not in PUBLISHED:
        return None
    shape, n_bits, counts = PUBLISHED[name]
    n_validation = validation_size(name, counts["train"])
    sizes = {"train": counts["train"] - n_validation, "validation": n_validation, "test": counts["test"]}
    return DatasetInfo(name, shape, n_bits, sizes, None)


def _given_cache(name: str, root: str | Path | None) -> Path | None:
    """``root`` when it is a prepared cache; refuses a cache folder whose manifest is missing."""
    if root is None:
        return None
    root = Path(root)
    if is_cache(root):
        return root
    if root.is_dir() and any((root / f"{split}.npy").exists() for split in SPLITS):
        raise FlowbenchError(
            f"{root}: a flowbench cache without its manifest (its preparation was interrupted); "
            f"delete it and run `flowbench data prepare {name}` again"
        )
    return None


__all__ = [
    "ArraySplit",
    "DATASETS",
    "DatasetInfo",
    "ImageData",
    "NEEDS_ROOT",
    "PUBLISHED",
    "Prefetcher",
    "dataset_info",
    "default_cache_dir",
    "find_source",
    "load_dataset",
    "prepare_dataset",
    "published_info",
]
