"""The prepared cache: one uncompressed uint8 ``.npy`` per split, opened memory-mapped.

A cache folder holds ``train.npy``, ``validation.npy``, ``test.npy`` ([N, C, H, W] uint8) and
``manifest.json``, written last: image shape, images per split, n_bits, the source it came from
and the checksum of that source's listing, and the format version. Trials map the arrays
read-only, so trials on one node share the page cache and a trial's resident memory grows with
its batch, not with the data set.

Concurrency: whoever builds holds an exclusive ``flock`` on ``<cache>/.lock``, readers a shared
one while they open the arrays, so when several trials start at once one builds and the others
wait (``flowbench.locks`` instead refuses a second owner of an output folder), and nobody maps a
half-written cache. Each file is written by ``atomic_write`` (temporary name, fsync, rename); the
manifest is removed before a rebuild and written after every array is in place, so a cache
without a manifest is never read. Arrays mapped by running trials stay valid through a rebuild:
a rename replaces the name, not the file they hold.

Validation is carved from the training images: ``validation_size`` images at positions fixed by
a constant seed, the same for every trial, seed and model; both splits keep the source order.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import numpy as np

from flowbench.atomic import atomic_write
from flowbench.data.base import SPLITS, ArraySplit, ImageData, Source
from flowbench.errors import FlowbenchError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
# at most this many validation images (ImageNet: 10,000, CIFAR-10: 5,000, the sizes of common
# practice); every set gives at most a tenth of its training images
VALIDATION_CAP = {"cifar10": 5_000, "imagenet32": 10_000, "imagenet64": 10_000}
VALIDATION_SEED = 0
CACHE_ENV = "FLOWBENCH_CACHE_DIR"


@dataclass(frozen=True)
class DatasetInfo:
    """What the sweep driver needs of a data set, known without loading its pixels."""

    name: str
    image_shape: tuple[int, int, int]
    n_bits: int
    sizes: dict[str, int]  # images per split: train, validation, test
    cache: Path | None  # the prepared cache, when there is a current one


def validation_size(dataset: str, n_train: int) -> int:
    """Validation images carved from ``n_train`` training images: a tenth, at most the data set's cap."""
    return min(VALIDATION_CAP.get(dataset, n_train), max(1, n_train // 10))


def validation_mask(n_train: int, n_validation: int) -> np.ndarray:
    """Which of the training images are validation: fixed positions, one constant seed."""
    mask = np.zeros(n_train, bool)
    mask[np.random.Generator(np.random.PCG64(VALIDATION_SEED)).permutation(n_train)[:n_validation]] = True
    return mask


def split_sizes(source: Source, counts: dict[str, int]) -> dict[str, int]:
    """Images per split once carved, from the source's ``counts`` (its ``sizes()``, no pixels)."""
    if "validation" in counts:  # the source holds out its own (embedded: a band of each photograph)
        return {split: counts[split] for split in SPLITS}
    if counts["train"] < 2:
        raise FlowbenchError(
            f"{source.description}: only {counts['train']} training images; "
            "at least 2 are needed (train and validation)"
        )
    n_val = validation_size(source.dataset, counts["train"])
    return {"train": counts["train"] - n_val, "validation": n_val, "test": counts["test"]}


def default_cache_dir(dataset: str, root: str | Path | None) -> Path:
    """``$FLOWBENCH_CACHE_DIR/<name>-<hash>``, else ``~/.cache/flowbench/<name>-<hash>`` (XDG_CACHE_HOME
    respected), the hash of the resolved data root: each copy of a data set gets its own cache."""
    base: str | Path | None = os.environ.get(CACHE_ENV)
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowbench"
    key = str(Path(root).resolve()) if root is not None else "installed packages"
    return Path(base) / f"{dataset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def is_cache(path: str | Path) -> bool:
    """A folder holding a prepared cache's manifest (what ``--data-root`` may name directly)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(cache: Path) -> dict | None:
    """The manifest, or None when there is none (never built, or a build was interrupted)."""
    try:
        text = (cache / MANIFEST).read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise FlowbenchError(f"{cache / MANIFEST}: cannot be read ({err.strerror})") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not {"format_version", "dataset", "image_shape", "splits"} <= manifest.keys():
        raise FlowbenchError(
            f"{cache / MANIFEST}: not a flowbench cache manifest; delete {cache} and run `flowbench data prepare` again"
        )
    return manifest


def is_current(manifest: dict | None, checksum: str | None = None) -> TypeGuard[dict]:
    """Whether a cache with this manifest may be read: this format version, and when the source's
    ``checksum`` is given, made from the source as it is now."""
    return (
        manifest is not None
        and manifest["format_version"] == FORMAT_VERSION
        and (checksum is None or manifest.get("source_checksum") == checksum)
    )


@contextlib.contextmanager
def _locked(cache: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``cache``'s lock: exclusive to build, shared to open. A cache in a folder this process
    may not write (prepared by someone else, read-only) is only ever read: no lock is needed."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if exclusive or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise FlowbenchError(
                f"{cache}: cannot write the data cache there ({err.strerror}); set {CACHE_ENV} to a writable folder"
            ) from None
        yield
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another process is preparing it", cache)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_cache(cache: str | Path, dataset: str, checksum: str | None = None) -> ImageData | None:
    """The prepared cache's splits, memory-mapped read-only; None when it is missing or does not
    match ``checksum`` (the source's, when known) or this format version."""
    cache = Path(cache)
    with _locked(cache, exclusive=False):
        manifest = read_manifest(cache)
        if not is_current(manifest, checksum):
            return None
        if manifest.get("dataset") != dataset:
            raise FlowbenchError(
                f"{cache}: a prepared cache of {manifest.get('dataset')!r}, not of {dataset!r}; "
                "give the data set's own cache or source folder"
            )
        shape = tuple(manifest["image_shape"])
        splits = {}
        for split in SPLITS:
            path = cache / f"{split}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise FlowbenchError(
                    f"{path}: damaged or half-written cache ({err}); delete {cache} and run "
                    "`flowbench data prepare` again"
                ) from None
            if array.dtype != np.uint8 or array.shape != (manifest["splits"][split], *shape):
                raise FlowbenchError(
                    f"{path}: holds {array.dtype} {array.shape}, its manifest says "
                    f"uint8 {(manifest['splits'][split], *shape)}; delete {cache} and run "
                    "`flowbench data prepare` again"
                )
            splits[split] = ArraySplit(array)
    return ImageData(dataset, splits["train"], splits["validation"], splits["test"], manifest["n_bits"])


def build_cache(source: Source, cache: Path) -> bool:
    """Write ``source`` into ``cache`` unless a current one is there; True when this call built it.
    One process builds under the exclusive lock; the others wait for it and then find it current."""
    cache = Path(cache)
    checksum = source.checksum()
    with _locked(cache, exclusive=True):
        if is_current(read_manifest(cache), checksum):
            return False
        start = time.perf_counter()
        (cache / MANIFEST).unlink(missing_ok=True)  # from here on the cache is not current
        counts = source.sizes()
        sizes = split_sizes(source, counts)
        log.info("preparing %s from %s into %s (%s)", source.dataset, source.description, cache, sizes)
        _write_splits(source, cache, sizes, own_validation="validation" in counts)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": source.dataset,
            "image_shape": list(source.image_shape),
            "n_bits": source.n_bits,
            "splits": sizes,
            "source": source.description,
            "source_checksum": checksum,
            "source_files": len(source.files),
            "validation": (
                f"{sizes['validation']} of the {sizes['train'] + sizes['validation']} training images "
                f"at positions fixed by seed {VALIDATION_SEED}"
                if "validation" not in counts
                else "held out by the source"
            ),
            "flowbench_version": importlib.metadata.version("flowbench"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with atomic_write(cache / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))
        log.info("prepared %s in %.1f s", cache, time.perf_counter() - start)
    return True


def _write_splits(source: Source, cache: Path, sizes: dict[str, int], own_validation: bool) -> None:
    """Stream the source's chunks into one .npy per split; the training chunks are divided between
    train and validation by the fixed mask unless the source holds out its own validation."""
    with contextlib.ExitStack() as stack:
        arrays = {}
        for split in SPLITS:
            tmp = stack.enter_context(atomic_write(cache / f"{split}.npy"))
            arrays[split] = np.lib.format.open_memmap(tmp, "w+", np.uint8, (sizes[split], *source.image_shape))
            with open(tmp, "r+b") as f:  # a full disk is an ENOSPC error now, not a SIGBUS mid-write
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
        filled = dict.fromkeys(SPLITS, 0)

        def append(split: str, rows: np.ndarray) -> None:
            if filled[split] + len(rows) > sizes[split]:
                raise FlowbenchError(
                    f"{source.description}: more {split} images than counted; "
                    "did the files change while preparing? run it again"
                )
            arrays[split][filled[split] : filled[split] + len(rows)] = rows
            filled[split] += len(rows)

        mask = None if own_validation else validation_mask(sizes["train"] + sizes["validation"], sizes["validation"])
        for split in ("train", "validation", "test") if own_validation else ("train", "test"):
            seen = 0
            for chunk in source.chunks(split):
                if tuple(chunk.shape[1:]) != tuple(source.image_shape):
                    raise FlowbenchError(
                        f"{source.description}: {split} images of shape {chunk.shape[1:]}, "
                        f"expected {source.image_shape}; check the data set's files"
                    )
                if split == "train" and mask is not None:
                    held_out = mask[seen : seen + len(chunk)]
                    append("validation", chunk[held_out])
                    append("train", chunk[~held_out])
                else:
                    append(split, chunk)
                seen += len(chunk)
        short = {s: (filled[s], sizes[s]) for s in SPLITS if filled[s] != sizes[s]}
        if short:
            raise FlowbenchError(
                f"{source.description}: fewer images than counted {short}; "
                "did the files change while preparing? run it again"
            )
        for array in arrays.values():
            array.flush()  # atomic_write fsyncs each file, then renames it
