"""The prepared cache: validation carving, `data prepare`, staleness, half-written caches, one builder."""

import json
import multiprocessing
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from flowbench import FlowbenchError
from flowbench.cli import main
from flowbench.data import dataset_info, default_cache_dir, load_dataset, prepare_dataset
from flowbench.data import files as data_files
from flowbench.data.cache import validation_size
from flowbench.data.files import decode_pngs
from tests.data.test_files import cifar_batch, write_cifar_folder, write_pngs


def write_npz_folder(root, n_train=(40, 40), n_val=10, size=32, seed=0):
    """Chrabaszcz et al.'s layout: train_data_batch_N.npz (1-based labels) and val_data.npz."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = []
    for i, n in enumerate(n_train, start=1):
        rows = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        np.savez(root / f"train_data_batch_{i}.npz", data=rows, labels=rng.integers(1, 1001, n), mean=np.zeros(3072))
        train.append(rows)
    val = rng.integers(0, 256, (n_val, 3 * size * size), dtype=np.uint8)
    np.savez(root / "val_data.npz", data=val, labels=rng.integers(1, 1001, n_val))
    return np.concatenate(train), val


def as_set(*splits) -> list[bytes]:
    return sorted(image.tobytes() for split in splits for image in split.array)


def test_validation_sizes_of_the_real_data_sets():
    # the documented sizes: CIFAR-10 50,000 training images -> 5,000; ImageNet 1,281,167 -> 10,000;
    # CelebA-HQ 27,000 (30,000 less 3,000 test) -> a tenth; tiny copies give a tenth, at least one
    assert validation_size("cifar10", 50_000) == 5_000
    assert validation_size("imagenet32", 1_281_167) == 10_000
    assert validation_size("imagenet64", 1_281_167) == 10_000
    assert validation_size("celeba-hq", 27_000) == 2_700
    assert validation_size("digits", 1_500) == 150
    assert validation_size("cifar10", 20) == 2 and validation_size("cifar10", 5) == 1


def test_validation_is_the_same_wherever_and_whenever_it_is_carved(tmp_path):
    write_cifar_folder(tmp_path / "a")
    a = load_dataset("cifar10", tmp_path / "a")
    cache_b, _, built = prepare_dataset("cifar10", tmp_path / "a", tmp_path / "elsewhere")
    b = load_dataset("cifar10", cache_b)
    assert built
    np.testing.assert_array_equal(a.validation.array, b.validation.array)
    np.testing.assert_array_equal(a.train.array, b.train.array)
    assert not set(as_set(a.train)) & set(as_set(a.validation))


def test_data_prepare_cli_writes_a_cache_a_trial_root_may_name(tmp_path, capsys):
    write_cifar_folder(tmp_path / "src")
    cache = tmp_path / "prepared"
    assert main(["data", "prepare", "cifar10", "--root", str(tmp_path / "src"), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"prepared {cache}" in out and "train 18, validation 2, test 3 images of 3x32x32, 8 bits" in out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 18, "validation": 2, "test": 3} and manifest["format_version"] == 1
    assert manifest["source"].startswith("CIFAR-10 python pickles in") and len(manifest["source_checksum"]) == 64
    for split, n in manifest["splits"].items():  # raw .npy, opened memory-mapped
        array = np.load(cache / f"{split}.npy", mmap_mode="r")
        assert isinstance(array, np.memmap) and array.shape == (n, 3, 32, 32) and array.dtype == np.uint8
    direct, via_source = load_dataset("cifar10", cache), load_dataset("cifar10", tmp_path / "src")
    assert as_set(direct.train) == as_set(via_source.train) and isinstance(direct.train.array, np.memmap)
    assert main(["data", "prepare", "cifar10", "--root", str(tmp_path / "src"), "--cache", str(cache)]) == 0
    assert "already prepared, unchanged" in capsys.readouterr().out
    # a cache of another data set is refused by name
    assert main(["train", "--model", "glow", "--dataset", "imagenet32", "--data-root", str(cache)]) == 2
    assert "a prepared cache of 'cifar10', not of 'imagenet32'" in capsys.readouterr().err


def test_the_default_cache_is_rebuilt_when_its_source_changes(tmp_path, cache_dir):
    batches = write_cifar_folder(tmp_path)
    cache = default_cache_dir("cifar10", tmp_path)
    assert cache.parent == cache_dir and cache.name.startswith("cifar10-")
    load_dataset("cifar10", tmp_path)
    built_at = os.stat(cache / "manifest.json").st_mtime_ns
    load_dataset("cifar10", tmp_path)  # unchanged source: opened as it is
    assert os.stat(cache / "manifest.json").st_mtime_ns == built_at
    new = cifar_batch(4, seed=99)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(new))
    data = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(data.test.array.reshape(4, -1), new[b"data"])
    assert not np.array_equal(data.test.array[:3].reshape(3, -1), batches["test_batch"][b"data"])


def test_an_interrupted_build_is_never_read(tmp_path, cache_dir):
    write_cifar_folder(tmp_path / "src")
    cache = default_cache_dir("cifar10", tmp_path / "src")
    load_dataset("cifar10", tmp_path / "src")
    # an interrupted rebuild: its manifest removed first, an array half-written
    (cache / "manifest.json").unlink()
    with open(cache / "train.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(FlowbenchError, match="without its manifest .*interrupted.*delete it"):
        load_dataset("cifar10", cache)  # named directly: refused
    assert len(load_dataset("cifar10", tmp_path / "src").train) == 18  # the default one: rebuilt
    with open(cache / "validation.npy", "r+b") as f:  # damaged behind a manifest
        f.truncate(200)
    with pytest.raises(FlowbenchError, match=r"validation.npy: damaged or half-written cache .*delete"):
        load_dataset("cifar10", cache)


def _build_at_once(args):
    barrier, root = args
    barrier.wait()
    _, _, built = prepare_dataset("imagenet32", root)
    data = load_dataset("imagenet32", root)
    return built, data.train.array.tobytes(), data.validation.array.tobytes()


def test_one_process_builds_while_the_others_wait(tmp_path):
    write_npz_folder(tmp_path / "npz", n_train=(3000, 3000))
    ctx = multiprocessing.get_context("fork")  # fast start; the children use numpy and files only
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        results = pool.map(_build_at_once, [(barrier, tmp_path / "npz")] * 4)
    assert sum(built for built, _, _ in results) == 1
    assert len({(train, val) for _, train, val in results}) == 1  # everyone read the same, whole cache


def test_chrabaszcz_npz_streams_block_by_block(tmp_path, monkeypatch):
    # 11 batches: published names are not zero-padded, batch 10 comes after batch 9
    train, val = write_npz_folder(tmp_path, n_train=(40, 40, 40, *[2] * 8), n_val=10)
    monkeypatch.setattr(data_files, "CHUNK_BYTES", 7 * 3072)  # 7 rows per block: many blocks per file
    data = load_dataset("imagenet32", tmp_path)
    source = train.reshape(-1, 3, 32, 32)
    assert (len(data.train), len(data.validation)) == (136 - 13, 13)  # 136 images -> a tenth held out
    assert as_set(data.train, data.validation) == sorted(image.tobytes() for image in source)
    np.testing.assert_array_equal(data.test.array.reshape(10, -1), val)
    order = [image.tobytes() for image in source]
    positions = [order.index(image.tobytes()) for image in data.train.array]
    assert positions == sorted(positions)  # streamed in the order of the batch numbers


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:5000]), "not a Chrabaszcz et al. npz batch"),  # truncated zip
        (lambda p: np.savez(p, labels=np.arange(3)), "with key 'data'"),
        (lambda p: np.savez(p, data=np.zeros((4, 3072), np.float32)), "float32 array, expected C-order uint8"),
        (lambda p: np.savez(p, data=np.zeros((4, 1000), np.uint8)), "rows of 3072"),
    ],
)
def test_bad_npz_is_one_line(tmp_path, damage, message):
    write_npz_folder(tmp_path)
    damage(tmp_path / "train_data_batch_2.npz")
    with pytest.raises(FlowbenchError, match=message) as err:
        load_dataset("imagenet32", tmp_path)
    assert "train_data_batch_2.npz" in str(err.value) and "\n" not in str(err.value)


def test_truncated_npz_member_data_is_caught_when_streaming(tmp_path):
    write_npz_folder(tmp_path)
    # a header promising more rows than the member holds (stored uncompressed, as np.savez writes)
    path = tmp_path / "train_data_batch_1.npz"
    raw = path.read_bytes()
    assert b"(40, 3072)" in raw
    path.write_bytes(raw.replace(b"(40, 3072)", b"(50, 3072)"))
    with pytest.raises(FlowbenchError, match="train_data_batch_1.npz"):
        load_dataset("imagenet32", tmp_path)


def test_corrupted_png_is_one_line(tmp_path):
    write_pngs(tmp_path / "train_32x32", 3, 32)
    write_pngs(tmp_path / "valid_32x32", 2, 32)
    (tmp_path / "train_32x32" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(FlowbenchError, match="00001.png: not a readable PNG"):
        load_dataset("imagenet32", tmp_path)


@pytest.mark.slow  # the spawned workers import torch (flowbench.__init__): ~10 s each on 2 busy cores
def test_png_decoding_in_worker_processes_keeps_the_order(tmp_path, monkeypatch):
    images = write_pngs(tmp_path / "pngs", 11, 8)
    monkeypatch.setattr(data_files, "PNGS_PER_TASK", 2)
    files = sorted((tmp_path / "pngs").glob("*.png"))
    decoded = np.concatenate(list(decode_pngs(files, (3, 8, 8), workers=2)))
    np.testing.assert_array_equal(decoded, images.transpose(0, 3, 1, 2))


def test_dataset_info_reads_no_pixels_and_prepares_nothing(tmp_path, cache_dir):
    write_npz_folder(tmp_path, n_train=(40, 30), n_val=10)
    info = dataset_info("imagenet32", tmp_path)
    assert (info.image_shape, info.n_bits, info.cache) == ((3, 32, 32), 8, None)
    assert info.sizes == {"train": 63, "validation": 7, "test": 10}  # 70 training images, a tenth held out
    write_cifar_folder(tmp_path / "cifar")
    assert dataset_info("cifar10", tmp_path / "cifar").sizes == {"train": 18, "validation": 2, "test": 3}
    assert not any(cache_dir.iterdir())
    load_dataset("imagenet32", tmp_path)
    assert dataset_info("imagenet32", tmp_path).cache == default_cache_dir("imagenet32", tmp_path)
    assert dataset_info("imagenet32", default_cache_dir("imagenet32", tmp_path)).sizes == info.sizes
    with pytest.raises(FlowbenchError, match=f"data set not found at {tmp_path / 'nowhere'}") as err:
        dataset_info("imagenet64", tmp_path / "nowhere")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_trial_trains_on_chrabaszcz_npz_through_the_prepared_cache(tmp_path, cache_dir):
    write_npz_folder(tmp_path / "npz", n_train=(40, 40), n_val=16)
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "glow",
        "--dataset",
        "imagenet32",
        "--data-root",
        str(tmp_path / "npz"),
        "--budget-steps",
        "2",
        "--evaluations",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--hparam",
        "depth=1",
        "--hparam",
        "levels=1",
        "--hparam",
        "hidden_channels=8",
    ]
    assert main(argv) == 0
    assert json.loads((out / "record.json").read_text())["status"] == "ok"
    manifest = json.loads((default_cache_dir("imagenet32", tmp_path / "npz") / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 72, "validation": 8, "test": 16}


def test_a_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path):
    # a 2 MB tmpfs in a mount namespace of its own (root, as on the CI machines): the 13 MB
    # embedded cache cannot fit; preallocation turns what would be a SIGBUS mid-write into ENOSPC
    small = tmp_path / "small"
    small.mkdir()
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {small} || exit 77\n"
        f"FLOWBENCH_CACHE_DIR={small} {sys.executable} -m flowbench.cli data prepare embedded\n"
        f"echo rc=$?; ls -A {small}/*\n"
    )
    try:
        done = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if done.returncode == 77 or "unshare: " in done.stderr:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    assert "rc=2" in done.stdout
    error = done.stderr.strip()
    assert error.startswith("flowbench: error: no space left on device writing ") and "\n" not in error
    assert done.stdout.split("rc=2")[1].split() == [".lock"]  # no temporaries, no manifest
