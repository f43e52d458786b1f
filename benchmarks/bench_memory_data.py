"""A trial's memory does not grow with its data set (issue #12, "Done when").

    python benchmarks/bench_memory_data.py [--steps 300] [--control] [--json] [--tmp /tmp]

Writes two synthetic CIFAR-10-shaped prepared caches (20,000 and 200,000 random 3×32×32 uint8
images, through the cache writer ``data prepare`` uses) and, in a fresh process for each, runs a
training-like loop: shuffled batches of 64 read from the memory-mapped train split through the
Prefetcher, each turned into the float input a model takes (with ``--depth N``, a step of a
small Glow as well), sampling ``RssAnon`` of /proc/self/status (anonymous
memory: file pages of the mapped cache, which the kernel shares between trials and can drop,
are ``RssFile``). Target: the 200k run's peak RssAnon exceeds the 20k run's by < 100 MB.
``--control`` repeats both runs with the train split copied into RAM first, to show that the
measurement sees a data set that is resident (180,000 more images × 3072 B = 553 MB).
The caches are deleted at the end (the 200k one is 614 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = (20_000, 200_000)
TEST_IMAGES = 1_000
IMAGE = (3, 32, 32)
TARGET_MB = 100


def rss_mb(field: str) -> float:
    """``field`` (RssAnon, RssFile, …) of /proc/self/status in MB (10^6 bytes; the file counts KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def write_cache(folder: Path, n_images: int, seed: int) -> Path:
    """A prepared cifar10-shaped cache of ``n_images`` random images, written block by block."""
    import numpy as np

    from flowbench.data.base import Source
    from flowbench.data.cache import build_cache

    counts = {"train": n_images - TEST_IMAGES, "test": TEST_IMAGES}

    def chunks(split):
        rng = np.random.default_rng([seed, split == "test"])
        for start in range(0, counts[split], 10_000):
            yield rng.integers(0, 256, (min(10_000, counts[split] - start), *IMAGE), dtype=np.uint8)

    source = Source(
        "cifar10",
        f"{n_images} synthetic images",
        [],
        IMAGE,
        8,
        lambda: counts,
        chunks,
        identity=f"synthetic {n_images} seed {seed}",
    )
    build_cache(source, folder)
    return folder


def child(cache: str, steps: int, batch: int, in_ram: bool, depth: int, width: int) -> dict:
    """The training-like loop of one run; returns its memory figures."""
    import numpy as np
    import torch

    import flowbench
    from flowbench.data import ArraySplit, Prefetcher, load_dataset

    torch.manual_seed(0)
    noise = torch.Generator().manual_seed(1)
    if depth:
        model = flowbench.build_model("glow", IMAGE, depth=depth, levels=2, hidden_channels=width)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = load_dataset("cifar10", cache)
    train = ArraySplit(np.array(data.train.array)) if in_ram else data.train  # control: the split resident
    n = len(train)

    def shuffled_batches():
        rng = np.random.default_rng(0)
        while True:
            order = rng.permutation(n)
            for start in range(0, n - batch + 1, batch):
                yield order[start : start + batch]

    peak_anon = rss_mb("RssAnon")
    with Prefetcher(train, shuffled_batches(), depth=2) as batches:
        for _, pixels in zip(range(steps), batches, strict=False):
            if depth:
                loss = model.bits_per_dim(pixels, noise).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:  # the dequantised float input a model step would take
                loss = (pixels.float() + torch.rand(pixels.shape, generator=noise)).mean()
            peak_anon = max(peak_anon, rss_mb("RssAnon"))
    return {
        "images": n + len(data.validation) + len(data.test),
        "train": n,
        "peak_rss_anon_mb": peak_anon,
        "rss_file_mb": rss_mb("RssFile"),
        "in_ram": in_ram,
        "last_loss": loss.item(),
    }


def run(cache: Path, args, in_ram: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(cache),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--depth",
        str(args.depth),
        "--width",
        str(args.width),
    ] + (["--in-ram"] if in_ram else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=0, help="Glow steps per level of a model step (0: none)")
    parser.add_argument("--width", type=int, default=32, help="hidden channels of the model step")
    parser.add_argument("--control", action="store_true", help="also run with the train split copied into RAM")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the caches go (deleted after)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--in-ram", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.in_ram, args.depth, args.width)))
        return

    need = sum(SIZES) * 3072 * 1.1
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        sys.exit(f"{args.tmp}: {free / 1e9:.1f} GB free, the caches need {need / 1e9:.1f} GB; give --tmp elsewhere")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="flowbench-memory-") as tmp:
        caches = {n: write_cache(Path(tmp) / f"cache-{n}", n, seed=n) for n in SIZES}
        for mode in ("memmap", "in-ram") if args.control else ("memmap",):
            results[mode] = {n: run(caches[n], args, mode == "in-ram") for n in SIZES}
    small, large = SIZES
    growth = {mode: r[large]["peak_rss_anon_mb"] - r[small]["peak_rss_anon_mb"] for mode, r in results.items()}
    if args.json:
        print(
            json.dumps(
                {
                    "results": {m: {str(n): v for n, v in r.items()} for m, r in results.items()},
                    "growth_mb": growth,
                    "target_mb": TARGET_MB,
                }
            )
        )
        return
    step = f"a Glow step (depth {args.depth}, width {args.width})" if args.depth else "the float input of a step"
    print(f"{args.steps} steps of {args.batch} shuffled images through the Prefetcher, {step} each, CPU")
    print(f"{'split held':10s} {'images':>8s} {'peak RssAnon':>13s} {'RssFile at end':>15s}")
    for mode, by_size in results.items():
        for n, r in by_size.items():
            print(f"{mode:10s} {n:8,d} {r['peak_rss_anon_mb']:10.1f} MB {r['rss_file_mb']:12.1f} MB")
    print(
        f"peak RssAnon growth from {small:,} to {large:,} images, memory-mapped: {growth['memmap']:.1f} MB "
        f"(target < {TARGET_MB} MB: {'met' if growth['memmap'] < TARGET_MB else 'NOT met'})"
    )
    if "in-ram" in growth:
        print(f"the same with the train split in RAM (control): {growth['in-ram']:.1f} MB")


if __name__ == "__main__":
    main()
