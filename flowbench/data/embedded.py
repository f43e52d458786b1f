"""Data that ships with the installed packages, so the default run needs no download.

``embedded``: real photographs bundled in scikit-image's wheel cut into RGB patches; the split
is by source image (four photographs train, the cat ``chelsea`` tests) so no test patch
overlaps a training one. ``digits``: scikit-learn's 8×8 handwritten digits (values 0–16).
"""

from __future__ import annotations

import numpy as np

from flowbench.data.base import ArraySplit, ImageData

TRAIN_IMAGES = ("astronaut", "coffee", "immunohistochemistry", "stereo_motorcycle")
TEST_IMAGES = ("chelsea",)
MIN_PATCH_STD = 4.0  # drop near-flat patches (sky, background): they teach a flow nothing


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)


def _patches(names, size: int, stride: int) -> np.ndarray:
    out = []
    for name in names:
        img = _photo(name)
        h, w, _ = img.shape
        for i in range(0, h - size + 1, stride):
            for j in range(0, w - size + 1, stride):
                patch = img[i : i + size, j : j + size]
                if patch.std() >= MIN_PATCH_STD:
                    out.append(patch.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


def load_embedded(size: int = 32) -> ImageData:
    stride = size // 2
    return ImageData(
        "embedded" if size == 32 else f"embedded{size}",
        ArraySplit(_patches(TRAIN_IMAGES, size, stride)),
        ArraySplit(_patches(TEST_IMAGES, size, stride)),
    )


def load_digits() -> ImageData:
    """1×8×8 digits, 0–16 scaled onto 0–255; the last 297 of the 1797 images are the test split."""
    from sklearn.datasets import load_digits as sk_digits

    images = sk_digits().images  # float 0..16
    pixels = np.round(images * (255 / 16)).astype(np.uint8)[:, None]
    return ImageData("digits", ArraySplit(pixels[:1500]), ArraySplit(pixels[1500:]))
