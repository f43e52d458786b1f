import numpy as np

from flowbench.data import load_dataset
from flowbench.data.embedded import MIN_PATCH_STD


def test_embedded_is_real_deterministic_and_split_by_image():
    a, b = load_dataset("embedded"), load_dataset("embedded")
    assert a.image_shape == (3, 32, 32) and a.n_bits == 8
    assert len(a.train) > 3000 and len(a.test) > 300
    np.testing.assert_array_equal(a.train.array, b.train.array)
    stds = a.train.array.reshape(len(a.train), -1).std(axis=1)
    assert stds.min() >= MIN_PATCH_STD
    # no test patch appears among the training patches (split by source photograph)
    train = {p.tobytes() for p in a.train.array}
    assert not any(p.tobytes() in train for p in a.test.array)


def test_embedded64_and_digits_shapes():
    assert load_dataset("embedded64").image_shape == (3, 64, 64)
    digits = load_dataset("digits")
    assert digits.image_shape == (1, 8, 8) and len(digits.train) + len(digits.test) == 1797
    assert len(np.unique(digits.train.array)) == 17
