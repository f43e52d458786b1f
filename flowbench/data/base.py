"""What every data set is: train, validation and test splits of uint8 images [N, C, H, W], and the
``Source`` a data set's published files are read from (chunk by chunk, never a whole split at once)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowbench.errors import FlowbenchError

SPLITS = ("train", "validation", "test")


class ArraySplit:
    """Images held in (or memory-mapped from) one uint8 array [N, C, H, W]."""

    def __init__(self, array: np.ndarray):
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"expected a uint8 array [N, C, H, W], got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[1:])

    def batch(self, indices, out: torch.Tensor | None = None) -> torch.Tensor:
        """The images at ``indices`` (in that order) as a uint8 tensor; gathered straight into
        ``out`` (e.g. pinned memory) when given."""
        indices = np.asarray(indices, dtype=np.int64)
        if out is None:
            return torch.from_numpy(np.take(self.array, indices, axis=0))
        np.take(self.array, indices, axis=0, out=out.numpy())
        return out


@dataclass
class ImageData:
    """A data set's three splits; validation is carved from the training images, the same for
    every seed and model (see ``flowbench.data.cache``)."""

    name: str
    train: ArraySplit
    validation: ArraySplit
    test: ArraySplit
    n_bits: int = 8

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


@dataclass
class Source:
    """One data set's files in one published format.

    ``sizes()`` counts the images per split as the source holds them ("train" and "test", plus
    "validation" for a source that carves its own); ``chunks(split)`` yields that split's images in
    order as uint8 [n, C, H, W] arrays of bounded size. ``files`` and ``identity`` make the
    checksum that tells whether a prepared cache still matches its source.
    """

    dataset: str
    description: str
    files: list[Path]
    image_shape: tuple[int, int, int]
    n_bits: int
    sizes: Callable[[], dict[str, int]]
    chunks: Callable[[str], Iterator[np.ndarray]]
    identity: str = ""

    def checksum(self) -> str:
        """sha256 of the source listing: each file's name, size and modification time."""
        listing = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError as err:
                raise FlowbenchError(f"{path}: cannot be read ({err.strerror}); check the data set's folder") from None
            listing.append((str(path), st.st_size, st.st_mtime_ns))
        text = json.dumps({"dataset": self.dataset, "identity": self.identity, "files": listing})
        return hashlib.sha256(text.encode()).hexdigest()


def read_png(path: Path) -> np.ndarray:
    """A PNG as uint8 [C, H, W] (grey images get one channel, RGBA drops alpha)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
    except OSError as err:
        raise FlowbenchError(f"{path}: not a readable PNG ({err}); re-extract the data set") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def png_shape(path: Path) -> tuple[int, int, int]:
    """A PNG's [C, H, W] from its header alone (no pixels decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            channels = 1 if im.mode in ("L", "1", "I;16") else 3
            return channels, im.height, im.width
    except OSError as err:
        raise FlowbenchError(f"{path}: not a readable PNG ({err}); re-extract the data set") from None


def missing(path: Path | None, what: str, source: str) -> FlowbenchError:
    """The error for a data set that is not where it was looked for."""
    where = f"at {path}" if path is not None else "(no --data-root given)"
    return FlowbenchError(f"data set not found {where}: expected {what}; {source}")
