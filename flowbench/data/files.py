"""Data sets a user downloads, each read from its files in their real published format.

Every reader here is a ``Source``: finding it only looks at the listing and at headers (cheap,
no pixels), and its images come out chunk by chunk, so preparing ImageNet never holds a whole
split in memory. PNG folders are decoded at preparation time by a small process pool.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flowbench.data.base import Source, missing, png_shape, read_png
from flowbench.errors import FlowbenchError

CIFAR_SOURCE = "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGENET_SOURCE = (
    "get Oord et al.'s train_{s}x{s}.tar/valid_{s}x{s}.tar (https://image-net.org/download-images, "
    "'Downsampled ImageNet') and extract them, or Chrabaszcz et al.'s npz batches (Imagenet{s}_train_npz)"
)
CELEBA_SOURCE = "build CelebA-HQ with the progressive_growing_of_gans scripts (github.com/tkarras)"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CHUNK_BYTES = 64 << 20  # rows read from an npz/npy per chunk: bounded memory whatever the split's size
PNGS_PER_TASK = 512
POOL_MIN_FILES = 20_000  # below this a process pool's start-up costs more than it saves


# --- CIFAR-10 -------------------------------------------------------------------------------------


def cifar10_source(root: Path | None) -> Source:
    """``root`` holds ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``, or is that folder."""
    what = "cifar-10-batches-py/ (data_batch_1..5, test_batch) or cifar-10-python.tar.gz"
    if root is None:
        raise missing(None, what, CIFAR_SOURCE)
    root = Path(root)
    folder = next((d for d in (root, root / "cifar-10-batches-py") if (d / "test_batch").is_file()), None)
    if folder is not None:
        for name in CIFAR_TRAIN:
            if not (folder / name).is_file():
                raise missing(folder / name, f"the CIFAR-10 batch {name}", CIFAR_SOURCE)
        files = [folder / n for n in (*CIFAR_TRAIN, "test_batch")]

        def batches(names):
            for name in names:
                yield name, _unpickle((folder / name).read_bytes(), str(folder / name))

        description = f"CIFAR-10 python pickles in {folder}"
    else:
        tar_path = root if root.is_file() else root / "cifar-10-python.tar.gz"
        if not tar_path.is_file():
            raise missing(root, what, CIFAR_SOURCE)
        files = [tar_path]

        def batches(names):
            found = set()
            try:
                with tarfile.open(tar_path) as tar:
                    for member in tar:
                        name = Path(member.name).name
                        # extractfile gives None for what holds no bytes (a folder of that name): absent below
                        if name in names and (batch := tar.extractfile(member)) is not None:
                            found.add(name)
                            yield name, _unpickle(batch.read(), f"{tar_path}:{name}")
            except (tarfile.TarError, EOFError, OSError) as err:
                raise FlowbenchError(f"{tar_path}: not a readable tar.gz ({err}); re-download it") from None
            absent = [n for n in names if n not in found]
            if absent:
                raise FlowbenchError(f"{tar_path}: lacks {', '.join(absent)}; re-download it ({CIFAR_SOURCE})")

        description = f"CIFAR-10 tarball {tar_path}"

    split_names = {"train": CIFAR_TRAIN, "test": ("test_batch",)}

    def chunks(split: str) -> Iterator[np.ndarray]:
        # the tarball's members come in archive order: keep the published batch order
        rows = dict(batches(split_names[split]))
        for name in split_names[split]:
            yield _cifar_rows(rows.pop(name), name)

    def sizes() -> dict[str, int]:  # the pickles hold no count apart from their rows: one batch at a time
        return {
            split: sum(len(_cifar_rows(batch, name)) for name, batch in batches(names))
            for split, names in split_names.items()
        }

    return Source("cifar10", description, files, (3, 32, 32), 8, sizes, chunks)


def _cifar_rows(batch: dict, where: str) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise FlowbenchError(f"{where}: expected a CIFAR-10 batch with b'data' rows of 3072 uint8; re-download it")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32)


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # a truncated or foreign file: pickle raises many types
        raise FlowbenchError(f"{where}: not a CIFAR-10 python pickle ({err}); re-download it") from None
    if not isinstance(batch, dict):
        raise FlowbenchError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__}); re-download it")
    return batch


# --- Downsampled ImageNet --------------------------------------------------------------------------


def imagenet_source(root: Path | None, size: int) -> Source:
    """Downsampled ImageNet: Oord et al.'s PNG folders (the paper's numbers) or Chrabaszcz et al.'s npz."""
    what = f"train_{size}x{size}/ and valid_{size}x{size}/ PNG folders, or train_data_batch_N.npz and val_data.npz"
    source = IMAGENET_SOURCE.format(s=size)
    if root is None:
        raise missing(None, what, source)
    root = Path(root)
    name, shape = f"imagenet{size}", (3, size, size)
    train_dir, valid_dir = root / f"train_{size}x{size}", root / f"valid_{size}x{size}"
    if train_dir.is_dir() and valid_dir.is_dir():
        splits = {"train": _png_files(train_dir, source), "test": _png_files(valid_dir, source)}
        found = png_shape(splits["train"][0])
        if found != shape:
            raise FlowbenchError(f"{root}: images are {found}, {name} needs {shape}")
        return _png_source(name, f"Oord et al.'s PNG folders in {root}", splits, shape, 8)
    train_files = sorted(root.glob("train_data_batch_*.npz"), key=_batch_number)
    if not train_files or not (root / "val_data.npz").is_file():
        raise missing(root, what, source)
    split_files = {"train": train_files, "test": [root / "val_data.npz"]}
    rows = {path: _npz_rows(path, 3 * size * size) for path in (*train_files, root / "val_data.npz")}

    def chunks(split: str) -> Iterator[np.ndarray]:
        for path in split_files[split]:
            for block in _npz_row_blocks(path, 3 * size * size):
                yield block.reshape(-1, *shape)

    return Source(
        name,
        f"Chrabaszcz et al.'s npz batches in {root}",
        list(rows),
        shape,
        8,
        lambda: {split: sum(rows[p] for p in files) for split, files in split_files.items()},
        chunks,
    )


def _batch_number(path: Path) -> int:
    """train_data_batch_10.npz after _9 (published names are not zero-padded)."""
    digits = path.stem.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else 0


def _npz_header(path: Path):
    """(zip member file, shape, dtype) of the npz's 'data' array, read from its header only."""
    try:
        archive = zipfile.ZipFile(path)
        member = archive.open("data.npy")
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise FlowbenchError(f"{path}: not a Chrabaszcz et al. npz batch with key 'data' ({err})") from None
    if fortran or dtype.kind not in "ui":
        raise FlowbenchError(
            f"{path}: 'data' is a {'Fortran-order ' if fortran else ''}{dtype} array, "
            "expected C-order uint8 rows; re-download it"
        )
    return archive, member, shape, dtype


def _npz_rows(path: Path, row_length: int) -> int:
    archive, member, shape, _ = _npz_header(path)
    member.close(), archive.close()
    if len(shape) != 2 or shape[1] != row_length:
        raise FlowbenchError(f"{path}: 'data' has shape {shape}, expected rows of {row_length} uint8")
    return shape[0]


def _npz_row_blocks(path: Path, row_length: int) -> Iterator[np.ndarray]:
    """The npz's 'data' rows, a block at a time, decompressed as a stream."""
    archive, member, shape, dtype = _npz_header(path)
    row_bytes = row_length * dtype.itemsize
    per_block = max(1, CHUNK_BYTES // row_bytes)
    with archive, member:
        for start in range(0, shape[0], per_block):
            n = min(per_block, shape[0] - start)
            try:
                raw = member.read(n * row_bytes)
            except (OSError, zipfile.BadZipFile, EOFError) as err:
                raise FlowbenchError(f"{path}: damaged npz ({err}); re-download it") from None
            if len(raw) != n * row_bytes:
                raise FlowbenchError(
                    f"{path}: 'data' ends after {start + len(raw) // row_bytes} of {shape[0]} rows "
                    "(a truncated file); re-download it"
                )
            yield np.frombuffer(raw, dtype).reshape(n, row_length).astype(np.uint8, copy=False)


# --- PNG folders ----------------------------------------------------------------------------------


def _png_files(folder: Path, source: str) -> list[Path]:
    files = sorted(folder.glob("*.png"))
    if not files:
        raise missing(folder, "PNG images", source)
    return files


def _png_source(
    name: str, description: str, splits: dict[str, list[Path]], shape, n_bits: int, workers: int | None = None
) -> Source:
    def chunks(split: str) -> Iterator[np.ndarray]:
        yield from decode_pngs(splits[split], shape, workers)

    return Source(
        name,
        description,
        [f for files in splits.values() for f in files],
        shape,
        n_bits,
        lambda: {split: len(files) for split, files in splits.items()},
        chunks,
    )


def decode_pngs(files: list[Path], shape: tuple[int, int, int], workers: int | None = None) -> Iterator[np.ndarray]:
    """The PNGs decoded in order, ``PNGS_PER_TASK`` at a time; ``workers`` processes (default: up
    to 8 for folders of ``POOL_MIN_FILES`` or more, none below) decode ahead of the writer."""
    tasks = [[str(f) for f in files[i : i + PNGS_PER_TASK]] for i in range(0, len(files), PNGS_PER_TASK)]
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(files) >= POOL_MIN_FILES else 0
    if workers <= 1:
        for task in tasks:
            yield _decode_task(task, shape)
        return
    # spawn: the caller may hold threads (torch, Ray) that a fork would copy mid-lock
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = [pool.submit(_decode_task, t, shape) for t in tasks[: 2 * workers]]
        for following in range(2 * workers, len(tasks) + 2 * workers):
            result = pending.pop(0).result()
            if following < len(tasks):  # at most 2 tasks per worker in flight: memory stays bounded
                pending.append(pool.submit(_decode_task, tasks[following], shape))
            yield result


def _decode_task(paths: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    out = np.empty((len(paths), *shape), np.uint8)
    for i, path in enumerate(paths):
        img = read_png(Path(path))
        if img.shape != tuple(shape):
            raise FlowbenchError(
                f"{path}: image of shape {img.shape}, expected {tuple(shape)} like the rest "
                "of its folder; remove or resize it"
            )
        out[i] = img
    return out


# --- CelebA-HQ ------------------------------------------------------------------------------------


def celeba_hq_source(root: Path | None, n_bits: int = 5, test_fraction: float = 0.1) -> Source:
    """A folder of PNGs or one .npy uint8 array ([N,H,W,C] or [N,C,H,W]); the last 10% test."""
    what = "a folder of CelebA-HQ PNGs or an .npy uint8 array of images"
    if root is None:
        raise missing(None, what, CELEBA_SOURCE)
    root = Path(root)
    if root.is_file() and root.suffix == ".npy":
        array = _open_npy(root)
        channels_last = array.shape[-1] in (1, 3)
        _, *dims = array.shape
        shape = (dims[2], dims[0], dims[1]) if channels_last else tuple(dims)
        n_test = _test_count(len(array), test_fraction, root)
        bounds = {"train": (0, len(array) - n_test), "test": (len(array) - n_test, len(array))}
        per_chunk = max(1, CHUNK_BYTES // int(np.prod(shape)))

        def chunks(split: str) -> Iterator[np.ndarray]:
            start, stop = bounds[split]
            for i in range(start, stop, per_chunk):
                block = np.asarray(array[i : min(i + per_chunk, stop)])
                yield np.ascontiguousarray(block.transpose(0, 3, 1, 2) if channels_last else block)

        return Source(
            "celeba-hq",
            f"CelebA-HQ array {root}",
            [root],
            shape,
            n_bits,
            lambda: {split: b - a for split, (a, b) in bounds.items()},
            chunks,
        )
    files = sorted(root.glob("*.png")) if root.is_dir() else []
    if len(files) < 3:
        raise missing(root, what, CELEBA_SOURCE)
    n_test = _test_count(len(files), test_fraction, root)
    splits = {"train": files[:-n_test], "test": files[-n_test:]}
    return _png_source("celeba-hq", f"CelebA-HQ PNGs in {root}", splits, png_shape(files[0]), n_bits)


def _open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FlowbenchError(f"{path}: not a readable .npy array ({err}); write it again with numpy.save") from None
    if array.dtype != np.uint8 or array.ndim != 4:
        raise FlowbenchError(f"{path}: expected a uint8 array [N, H, W, C], got {array.dtype} {array.shape}")
    return array


def _test_count(n: int, test_fraction: float, where: Path) -> int:
    if n < 3:
        raise FlowbenchError(f"{where}: only {n} images; a data set needs at least 3 (train, validation, test)")
    return max(1, int(n * test_fraction))
