"""Data that ships with the installed packages, so the default run needs no download.

``embedded``: real photographs bundled in scikit-image's wheel cut into RGB patches; the split
is by source image (four photographs train, the cat ``chelsea`` tests) so no test patch
overlaps a training one. Validation is the bottom band of each training photograph, about a
tenth of its patch rows, cut so that no validation patch shares a pixel with a training patch
(patches overlap their neighbours by half). ``digits``: scikit-learn's 8×8 handwritten digits
(values 0–16); its validation is carved like the downloaded sets' (``flowbench.data.cache``).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from flowbench.data.base import Source
from flowbench.errors import FlowbenchError

TRAIN_IMAGES = ("astronaut", "coffee", "immunohistochemistry", "stereo_motorcycle")
TEST_IMAGES = ("chelsea",)
MIN_PATCH_STD = 4.0  # drop near-flat patches (sky, background): they teach a flow nothing
VALIDATION_ROWS = 0.1  # the share of each training photograph's patch rows held out for validation
DIGITS_TEST = 297  # the last 297 of the 1797 digits


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)


def _patches(img: np.ndarray, size: int, stride: int, rows: range) -> list[np.ndarray]:
    """Patches whose top edge lies at ``rows`` (pixel offsets), left to right, top to bottom."""
    w = img.shape[1]
    out = []
    for i in rows:
        for j in range(0, w - size + 1, stride):
            patch = img[i : i + size, j : j + size]
            if patch.std() >= MIN_PATCH_STD:
                out.append(patch.transpose(2, 0, 1))
    return out


def _embedded_splits(size: int) -> dict[str, np.ndarray]:
    stride = size // 2
    splits: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for name in TRAIN_IMAGES:
        img = _photo(name)
        n_rows = (img.shape[0] - size) // stride + 1
        cut = (n_rows - max(1, round(n_rows * VALIDATION_ROWS))) * stride  # first validation row
        splits["train"] += _patches(img, size, stride, range(0, cut - size + 1, stride))  # wholly above the cut
        splits["validation"] += _patches(img, size, stride, range(cut, img.shape[0] - size + 1, stride))
    for name in TEST_IMAGES:
        img = _photo(name)
        splits["test"] += _patches(img, size, stride, range(0, img.shape[0] - size + 1, stride))
    return {split: np.stack(patches) for split, patches in splits.items()}


def embedded_source(size: int = 32) -> Source:
    import skimage

    # skimage's lazy-loading stub (__init__.pyi) lists __version__ in __all__ but does not declare it
    version = skimage.__version__  # type: ignore[attr-defined]
    splits = functools.cache(lambda: _embedded_splits(size))
    identity = (
        f"scikit-image {version}; {size}x{size} patches, stride {size // 2}, std >= {MIN_PATCH_STD}; "
        f"train {TRAIN_IMAGES} less their bottom {VALIDATION_ROWS:.0%} of patch rows (validation); test {TEST_IMAGES}"
    )
    return Source(
        "embedded" if size == 32 else f"embedded{size}",
        f"{size}x{size} patches of scikit-image's photographs",
        [],
        (3, size, size),
        8,
        lambda: {k: len(v) for k, v in splits().items()},
        lambda split: iter([splits()[split]]),
        identity,
    )


def digits_source() -> Source:
    """1×8×8 digits, 0–16 scaled onto 0–255; the last 297 of the 1797 images are the test split.

    Read from the file in scikit-learn's wheel as ``sklearn.datasets.load_digits`` reads it, without
    importing scikit-learn: its import (scipy.stats and more) cost every trial on the digits 1.5 CPU
    seconds, more than a test's tiny trial trains."""
    import importlib.metadata
    import importlib.util

    @functools.cache
    def pixels() -> np.ndarray:
        package = importlib.util.find_spec("sklearn")  # where the package lies, without running it
        if package is None or not package.submodule_search_locations:
            raise FlowbenchError("the digits data set needs scikit-learn: pip install scikit-learn")
        path = Path(package.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        with gzip.open(path, "rt") as file:  # 64 pixels (float 0..16), then the label
            images = np.loadtxt(file, delimiter=",")[:, :-1].reshape(-1, 8, 8)
        return np.round(images * (255 / 16)).astype(np.uint8)[:, None]

    def chunks(split: str):
        yield pixels()[:-DIGITS_TEST] if split == "train" else pixels()[-DIGITS_TEST:]

    return Source(
        "digits",
        "scikit-learn's 8x8 digits",
        [],
        (1, 8, 8),
        8,
        lambda: {"train": len(pixels()) - DIGITS_TEST, "test": DIGITS_TEST},
        chunks,
        f"scikit-learn {importlib.metadata.version('scikit-learn')}; last {DIGITS_TEST} test",
    )
