"""Figures: sample grids (the paper's Figures 1 and 5), curves, bits/dim against size, latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowbench.atomic import atomic_write


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] → one uint8 [H', W', 3] picture, images in rows of ``columns``."""
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for k, img in enumerate(images):
        i, j = divmod(k, columns)
        rgb = np.repeat(img, 3, axis=0) if c == 1 else img[:3]
        top, left = pad + i * (h + pad), pad + j * (w + pad)
        grid[top : top + h, left : left + w] = rgb.transpose(1, 2, 0)
    return grid


def save_png(picture: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Atomically write an RGB uint8 array as PNG, enlarged ``scale``× (nearest neighbour)."""
    from PIL import Image

    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_write(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return Path(path)
