"""What every data set is: a train and a test split of uint8 images [N, C, H, W]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowbench.errors import FlowbenchError


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

    def batch(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(indices)]))


class PngSplit:
    """A folder of same-sized PNG images, read lazily batch by batch (ImageNet is too big to load)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._shape = tuple(read_png(files[0]).shape)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    def batch(self, indices) -> torch.Tensor:
        images = []
        for i in np.asarray(indices):
            img = read_png(self.files[i])
            if img.shape != self._shape:
                raise FlowbenchError(
                    f"{self.files[i]}: image of shape {img.shape}, expected {self._shape} like the rest "
                    "of its folder; remove or resize it"
                )
            images.append(img)
        return torch.from_numpy(np.stack(images))


def read_png(path: Path) -> np.ndarray:
    """A PNG as uint8 [C, H, W] (grey images get one channel, RGBA drops alpha)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
    except OSError as err:
        raise FlowbenchError(f"{path}: not a readable PNG ({err}); re-extract the data set") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass
class ImageData:
    name: str
    train: ArraySplit | PngSplit
    test: ArraySplit | PngSplit
    n_bits: int = 8

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def missing(path: Path | None, what: str, source: str) -> FlowbenchError:
    """The error for a data set that is not where it was looked for."""
    where = f"at {path}" if path is not None else "(no --data-root given)"
    return FlowbenchError(f"data set not found {where}: expected {what}; {source}")
