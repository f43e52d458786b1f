"""Every data format, on tiny fixtures written in the exact published formats."""

import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from flowbench import FlowbenchError
from flowbench.data import load_dataset


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"x",
        b"labels": list(rng.integers(0, 10, n)),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"f"] * n,
    }


def write_cifar_folder(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(4, i) for i in range(1, 6)} | {"test_batch": cifar_batch(3, 9)}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch))
    return batches


def rows(split) -> list[bytes]:
    """Each image of a split as its bytes in [C, H, W] order (a CIFAR-10 row's layout)."""
    return [image.tobytes() for image in split.array]


def test_cifar10_folder_is_channel_major(tmp_path):
    batches = write_cifar_folder(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    # 20 training rows: a tenth (2) carved off for validation
    assert (len(data.train), len(data.validation), len(data.test)) == (18, 2, 3) and data.image_shape == (3, 32, 32)
    source = [row.tobytes() for i in range(1, 6) for row in batches[f"data_batch_{i}"][b"data"]]
    # every image is a whole source row read channel-major (red plane, green, blue); train and
    # validation split the training rows between them, each keeping the source order
    assert sorted(rows(data.train) + rows(data.validation)) == sorted(source)
    for split in (data.train, data.validation):
        positions = [source.index(r) for r in rows(split)]
        assert positions == sorted(positions)
    np.testing.assert_array_equal(data.test.batch([2]).numpy().ravel(), batches["test_batch"][b"data"][2])


def test_cifar10_tarball(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    batches = write_cifar_folder(src)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(data.test.batch([0]).numpy().ravel(), batches["test_batch"][b"data"][0])
    source = [row.tobytes() for i in range(1, 6) for row in batches[f"data_batch_{i}"][b"data"]]
    assert sorted(rows(data.train) + rows(data.validation)) == sorted(source)


def test_cifar10_missing_names_the_path_and_the_source(tmp_path):
    with pytest.raises(FlowbenchError, match=f"not found at {tmp_path}.*cifar-10-python.tar.gz.*toronto"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FlowbenchError, match="no --data-root given"):
        load_dataset("cifar10")


def test_cifar10_corrupted_batch(tmp_path):
    write_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(FlowbenchError, match="data_batch_3: not a CIFAR-10 python pickle"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_wrong_row_length(tmp_path):
    batches = write_cifar_folder(tmp_path)
    batches["test_batch"][b"data"] = np.zeros((3, 100), np.uint8)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batches["test_batch"]))
    with pytest.raises(FlowbenchError, match="rows of 3072"):
        load_dataset("cifar10", tmp_path)


def write_pngs(folder, n, size, seed=0, mode="RGB"):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img, mode=mode).save(folder / f"{i:05d}.png")
    return images


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_oord_png_folders(tmp_path, size):
    train = write_pngs(tmp_path / f"train_{size}x{size}", 3, size)
    write_pngs(tmp_path / f"valid_{size}x{size}", 2, size, seed=1)
    data = load_dataset(f"imagenet{size}", tmp_path)
    assert (len(data.train), len(data.validation), len(data.test)) == (2, 1, 2)
    assert sorted(rows(data.train) + rows(data.validation)) == sorted(i.transpose(2, 0, 1).tobytes() for i in train)


def test_imagenet_chrabaszcz_npz(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (4, 3072), dtype=np.uint8) for _ in range(2)]
    for i, r in enumerate(rows, start=1):
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=r, labels=np.arange(1, 5), mean=np.zeros(3072))
    np.savez(tmp_path / "val_data.npz", data=rows[0][:2], labels=np.arange(1, 3))
    data = load_dataset("imagenet32", tmp_path)
    assert (len(data.train), len(data.validation), len(data.test)) == (7, 1, 2)
    assert sorted(r.tobytes() for r in np.concatenate(rows)) == sorted(
        [i.tobytes() for i in data.train.array] + [i.tobytes() for i in data.validation.array]
    )
    np.testing.assert_array_equal(data.test.batch([1]).numpy().ravel(), rows[0][1])


def test_imagenet_wrong_size_is_refused(tmp_path):
    write_pngs(tmp_path / "train_64x64", 2, 32)
    write_pngs(tmp_path / "valid_64x64", 2, 32)
    with pytest.raises(FlowbenchError, match="imagenet64 needs \\(3, 64, 64\\)"):
        load_dataset("imagenet64", tmp_path)


def test_imagenet_npz_of_the_wrong_resolution(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3072), np.uint8))
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.uint8))
    with pytest.raises(FlowbenchError, match="rows of 12288"):
        load_dataset("imagenet64", tmp_path)


def test_png_of_another_size_in_the_folder(tmp_path):
    write_pngs(tmp_path / "train_32x32", 2, 32)
    write_pngs(tmp_path / "valid_32x32", 1, 32)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train_32x32" / "zzz.png")
    with pytest.raises(FlowbenchError, match="zzz.png: image of shape"):  # found when preparing, not mid-training
        load_dataset("imagenet32", tmp_path)


def test_celeba_hq_npy_nhwc_and_png_folder(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "celeba.npy", array)
    data = load_dataset("celeba-hq", tmp_path / "celeba.npy")
    # 20 images: the last 2 test, one of the other 18 validation
    assert (len(data.train), len(data.validation), len(data.test), data.n_bits) == (17, 1, 2, 5)
    np.testing.assert_array_equal(data.test.batch([1])[0].numpy(), array[19].transpose(2, 0, 1))
    write_pngs(tmp_path / "pngs", 10, 8)
    data = load_dataset("celeba-hq", tmp_path / "pngs")
    assert (len(data.train), len(data.validation), len(data.test), data.image_shape) == (8, 1, 1, (3, 8, 8))


def test_celeba_hq_npy_of_floats_is_refused(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(FlowbenchError, match="expected a uint8 array"):
        load_dataset("celeba-hq", tmp_path / "bad.npy")


def test_unknown_dataset_suggests():
    with pytest.raises(FlowbenchError, match="did you mean 'cifar10'"):
        load_dataset("cifar-10")
