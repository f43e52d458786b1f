import numpy as np
from sklearn.datasets import load_digits

from flowbench.data import load_dataset
from flowbench.data.embedded import MIN_PATCH_STD


def tiles(patches: np.ndarray) -> set[bytes]:
    """The 16×16 tiles the patches are made of (patches sit on a 16-pixel grid), less uniform ones:
    a black tile of one photograph's background equals one elsewhere without sharing its pixels."""
    _, _, h, w = patches.shape
    blocks = (p[:, i : i + 16, j : j + 16] for p in patches for i in range(0, h, 16) for j in range(0, w, 16))
    return {b.tobytes() for b in blocks if b.min() != b.max()}


def test_embedded_is_real_deterministic_and_split_by_image():
    a, b = load_dataset("embedded"), load_dataset("embedded")
    assert a.image_shape == (3, 32, 32) and a.n_bits == 8
    assert len(a.train) > 3000 and len(a.test) > 300
    for split in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(a, split).array, getattr(b, split).array)
    stds = a.train.array.reshape(len(a.train), -1).std(axis=1)
    assert stds.min() >= MIN_PATCH_STD
    # no test patch appears among the training patches (split by source photograph)
    train = {p.tobytes() for p in a.train.array}
    assert not any(p.tobytes() in train for p in a.test.array)


def test_embedded_validation_shares_no_pixel_with_training():
    data = load_dataset("embedded")
    share = len(data.validation) / (len(data.train) + len(data.validation))
    assert 0.08 < share < 0.12  # about a tenth of each photograph's patch rows
    # neighbouring patches overlap by half (a 16-pixel tile): a validation patch next to a training
    # one would share a tile with it
    assert not tiles(data.validation.array) & tiles(data.train.array)


def test_embedded64_and_digits_shapes():
    assert load_dataset("embedded64").image_shape == (3, 64, 64)
    digits = load_dataset("digits")
    assert digits.image_shape == (1, 8, 8)
    assert (len(digits.train), len(digits.validation), len(digits.test)) == (1350, 150, 297)  # 1500 // 10 held out
    assert len(np.unique(digits.train.array)) == 17
    source = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    np.testing.assert_array_equal(digits.test.array[:, 0], source[1500:])
    # train and validation split the first 1500 between them, each in the source's order
    carved = sorted([*digits.train.array[:, 0], *digits.validation.array[:, 0]], key=bytes)
    np.testing.assert_array_equal(np.stack(carved), np.stack(sorted(source[:1500], key=bytes)))
