"""Loaders for data sets a user downloads: each reads the files in their real published format."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from flowbench.data.base import ArraySplit, ImageData, PngSplit, missing
from flowbench.errors import FlowbenchError

CIFAR_SOURCE = "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGENET_SOURCE = (
    "get Oord et al.'s train_{s}x{s}.tar/valid_{s}x{s}.tar (https://image-net.org/download-images, "
    "'Downsampled ImageNet') and extract them, or Chrabaszcz et al.'s npz batches (Imagenet{s}_train_npz)"
)


def _cifar_rows(batch: dict, where: str) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise FlowbenchError(f"{where}: expected a CIFAR-10 batch with b'data' rows of 3072 uint8; re-download it")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32)


def load_cifar10(root: Path | None) -> ImageData:
    """``root`` holds ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``, or is that folder."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    what = "cifar-10-batches-py/ (data_batch_1..5, test_batch) or cifar-10-python.tar.gz"
    if root is None:
        raise missing(None, what, CIFAR_SOURCE)
    root = Path(root)
    folder = next((d for d in (root, root / "cifar-10-batches-py") if (d / "test_batch").is_file()), None)
    batches = {}
    if folder is not None:
        for name in names:
            path = folder / name
            if not path.is_file():
                raise missing(path, f"the CIFAR-10 batch {name}", CIFAR_SOURCE)
            batches[name] = _unpickle(path.read_bytes(), str(path))
    else:
        tar_path = root if root.is_file() else root / "cifar-10-python.tar.gz"
        if not tar_path.is_file():
            raise missing(root, what, CIFAR_SOURCE)
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    if Path(member.name).name in names:
                        batches[Path(member.name).name] = _unpickle(tar.extractfile(member).read(), str(tar_path))
        except tarfile.TarError as err:
            raise FlowbenchError(f"{tar_path}: not a readable tar.gz ({err}); re-download it") from None
        absent = [n for n in names if n not in batches]
        if absent:
            raise FlowbenchError(f"{tar_path}: lacks {', '.join(absent)}; re-download it ({CIFAR_SOURCE})")
    train = np.concatenate([_cifar_rows(batches[n], n) for n in names[:5]])
    return ImageData("cifar10", ArraySplit(train), ArraySplit(_cifar_rows(batches["test_batch"], "test_batch")))


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # a truncated or foreign file: pickle raises many types
        raise FlowbenchError(f"{where}: not a CIFAR-10 python pickle ({err}); re-download it") from None
    if not isinstance(batch, dict):
        raise FlowbenchError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__}); re-download it")
    return batch


def load_imagenet(root: Path | None, size: int) -> ImageData:
    """Downsampled ImageNet: Oord et al.'s PNG folders (the paper's numbers) or Chrabaszcz et al.'s npz."""
    what = f"train_{size}x{size}/ and valid_{size}x{size}/ PNG folders, or train_data_batch_N.npz and val_data.npz"
    source = IMAGENET_SOURCE.format(s=size)
    if root is None:
        raise missing(None, what, source)
    root = Path(root)
    train_dir, valid_dir = root / f"train_{size}x{size}", root / f"valid_{size}x{size}"
    if train_dir.is_dir() and valid_dir.is_dir():
        train, test = _png_folder(train_dir, source), _png_folder(valid_dir, source)
    elif sorted(root.glob("train_data_batch_*.npz")) and (root / "val_data.npz").is_file():
        train = ArraySplit(np.concatenate([_npz_rows(p, size) for p in sorted(root.glob("train_data_batch_*.npz"))]))
        test = ArraySplit(_npz_rows(root / "val_data.npz", size))
    else:
        raise missing(root, what, source)
    if train.image_shape != (3, size, size):
        raise FlowbenchError(f"{root}: images are {train.image_shape}, imagenet{size} needs (3, {size}, {size})")
    return ImageData(f"imagenet{size}", train, test)


def _png_folder(folder: Path, source: str) -> PngSplit:
    files = sorted(folder.glob("*.png"))
    if not files:
        raise missing(folder, "PNG images", source)
    return PngSplit(files)


def _npz_rows(path: Path, size: int) -> np.ndarray:
    try:
        with np.load(path) as npz:
            data = npz["data"]
    except (OSError, ValueError, KeyError) as err:
        raise FlowbenchError(f"{path}: not a Chrabaszcz et al. npz batch with key 'data' ({err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise FlowbenchError(f"{path}: 'data' has shape {data.shape}, expected rows of {3 * size * size} uint8")
    return data.astype(np.uint8).reshape(-1, 3, size, size)


def load_celeba_hq(root: Path | None, n_bits: int = 5, test_fraction: float = 0.1) -> ImageData:
    """A folder of PNGs or one .npy uint8 array ([N,H,W,C] or [N,C,H,W]); the last 10% test."""
    what = "a folder of CelebA-HQ PNGs or an .npy uint8 array of images"
    source = "build CelebA-HQ with the progressive_growing_of_gans scripts (github.com/tkarras)"
    if root is None:
        raise missing(None, what, source)
    root = Path(root)
    if root.is_file() and root.suffix == ".npy":
        array = np.load(root, mmap_mode="r", allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 4:
            raise FlowbenchError(f"{root}: expected a uint8 array [N, H, W, C], got {array.dtype} {array.shape}")
        if array.shape[-1] in (1, 3):
            array = array.transpose(0, 3, 1, 2)
        n_test = max(1, int(len(array) * test_fraction))
        return ImageData("celeba-hq", ArraySplit(array[:-n_test]), ArraySplit(array[-n_test:]), n_bits)
    files = sorted(root.glob("*.png")) if root.is_dir() else []
    if len(files) < 2:
        raise missing(root, what, source)
    n_test = max(1, int(len(files) * test_fraction))
    return ImageData("celeba-hq", PngSplit(files[:-n_test]), PngSplit(files[-n_test:]), n_bits)
