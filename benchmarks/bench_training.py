"""The training step with real data against the same step on a resident tensor (issue #12 item 2),
and training options against plain float32 backprop on Glow: memory-lean training (gradient
checkpointing per flow step) and bfloat16 coupling networks (issue #6).

    python benchmarks/bench_training.py [--depth 32 --levels 3 --width 256 --batch 16 --repeats 10]

Real data is what a trial reads: the data set's prepared cache (``flowbench data prepare``; built
on first use), memory-mapped, its batches in the trial's seeded order (``trial.batch_plan``)
gathered ahead of the step by ``flowbench.data.loader.Prefetcher`` (pinned memory and
non-blocking copies on CUDA). The resident candidate trains on one batch already on the device.
Target: real data ≤ 1.05× the resident step.

Step times come from one process that interleaves the candidates (``timing.py``:
torch.utils.benchmark, rounds alternating in order). Each memory variant runs in its own process
so peak memory is its own: CUDA's max_memory_allocated on a GPU, the process's peak RSS on CPU
(with glibc's default allocator, and with large blocks mmapped so that RSS follows live tensors),
both less the peak after a one-image step (model, gradients, Adam state): what remains is the
activation memory of the full-batch steps.
Target for checkpointing (issue #6): ≤ 0.3× the activation memory at ≤ 1.5× the step time.
bfloat16 has no target: its step-time ratio is printed with the loss it reaches beside float32's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys

import numpy as np
import torch

from timing import Interleaved, time_interleaved, verdict  # benchmarks/timing.py: the script's folder is on sys.path

MEMORY_VARIANTS = ("plain", "checkpointed", "bf16-couplings")
TIMED = ("resident", "prefetched", "checkpointed", "bf16-couplings")


def use_variant(model, variant: str) -> None:
    model.set_gradient_checkpointing(variant == "checkpointed")
    model.set_coupling_precision(torch.bfloat16 if variant == "bf16-couplings" else None)


def setup(args):
    """The data set (memory-mapped), a Glow at the benchmark's shape ready to train, the trial's
    dequantisation-noise generator and one batch resident on the device."""
    import flowbench
    from flowbench.data import load_dataset
    from flowbench.trial import prepare_training, resolve_device

    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_root)
    torch.manual_seed(0)
    model = flowbench.build_model(
        "glow", data.image_shape, depth=args.depth, levels=args.levels, hidden_channels=args.width
    )
    optimizer = prepare_training(model, device, lr=1e-4)  # no warm-up here: 1e-3 diverges at K=32
    noise = torch.Generator(device).manual_seed(1)
    resident = data.train.batch(np.arange(args.batch)).to(device)
    return model, device, data, optimizer, noise, resident


def measure_memory(args) -> dict:
    """One variant alone in this process: its peak memory, and the loss after ``steps`` steps."""
    from flowbench.trial import train_step

    model, device, _, optimizer, noise, pixels = setup(args)
    use_variant(model, args.variant)

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # one step on a single image first: gradients, Adam state and ActNorm's init exist before the
    # baseline is read, so what the real steps add is activation memory
    train_step(model, optimizer, pixels[:1], noise, grad_clip=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = peak()
    for _ in range(args.steps):
        loss = train_step(model, optimizer, pixels, noise, grad_clip=None)
    return {
        "peak_mb": peak(),
        "before_mb": before,
        "last_loss": loss.item(),
        "params": model.num_parameters(),
        "device": str(device),
    }


def measure_times(args) -> dict:
    """Step times on one model, interleaved: the resident batch, the prefetched real batches,
    and the memory/precision variants on the resident batch."""
    from flowbench.data.loader import Prefetcher
    from flowbench.trial import Progress, TrialConfig, batch_plan, train_step

    model, device, data, optimizer, noise, resident = setup(args)
    # the trial's own data order (seeded epoch permutations), endless for the timer
    order = TrialConfig(model="glow", dataset=args.dataset, batch_size=args.batch, budget=1e15)
    plan = (indices for indices, _, _ in batch_plan(order, len(data.train), Progress()))

    def step(variant: str, pixels) -> torch.Tensor:
        use_variant(model, variant)
        return train_step(model, optimizer, pixels, noise, grad_clip=None)

    with Prefetcher(data.train, plan, device) as batches:
        timed = time_interleaved(
            {
                "resident": lambda: step("plain", resident),
                "prefetched": lambda: step("plain", next(batches)),
                "checkpointed": lambda: step("checkpointed", resident),
                "bf16-couplings": lambda: step("bf16-couplings", resident),
            },
            args.repeats,
            args.threads,
            args.min_run_time,
            label="glow training step",
        )
    return dataclasses.asdict(timed) | {"n_train": len(data.train), "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dataset", default="embedded", help="a data set of 32×32 or 64×64 RGB images")
    p.add_argument("--data-root", default=None, help="its source folder or prepared cache")
    p.add_argument("--steps", type=int, default=10, help="steps of each memory measurement")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds each candidate is timed per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-memory", action="store_true", help="step times only")
    p.add_argument("--variant", choices=[*MEMORY_VARIANTS, "times"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure_times(args) if args.variant == "times" else measure_memory(args)))
        return

    passed = ("depth", "levels", "width", "batch", "dataset", "steps", "repeats", "min_run_time", "threads", "device")
    cmd = [sys.executable, __file__] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in passed]
    if args.data_root:
        cmd.append(f"--data-root={args.data_root}")

    def run(variant: str, env: dict | None = None) -> dict:
        out = subprocess.run(
            cmd + ["--variant", variant], check=True, capture_output=True, text=True, env=os.environ | (env or {})
        ).stdout
        return json.loads(out.splitlines()[-1])

    times = run("times")
    timed = Interleaved(times["rounds"])
    print(
        f"glow K={args.depth} L={args.levels} width={args.width} batch={args.batch} on {args.dataset} "
        f"({times['n_train']:,} training images), device {times['device']}, torch {torch.__version__}, "
        f"{args.threads} threads; median over {args.repeats} interleaved rounds of torch.utils.benchmark"
    )
    for name in TIMED:
        print(f"  step {name:15s} {timed.line(name)}")
    r, lo, hi = timed.ratio("prefetched", "resident")
    print(f"  real data (prefetched from the memory-mapped cache) / resident batch: {verdict(r, 1.05, (lo, hi))}")
    r, lo, hi = timed.ratio("checkpointed", "resident")
    print(f"  checkpointed / plain step time: {verdict(r, 1.5, (lo, hi))}")
    r, lo, hi = timed.ratio("bf16-couplings", "resident")
    print(f"  bf16 couplings / plain step time: {r:.2f}× (rounds {lo:.2f}–{hi:.2f})")
    if args.skip_memory:
        return

    # glibc keeps freed heap memory, so a CPU process's peak RSS overstates live tensors; with
    # large blocks mmapped (freed at once) RSS follows live memory, as max_memory_allocated does on CUDA
    allocators = {"glibc default": {}, "live (mmap ≥ 64 KiB)": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    memory = {name: {v: run(v, env) for v in MEMORY_VARIANTS} for name, env in allocators.items()}
    plain = memory["glibc default"]["plain"]
    print(
        f"  {plain['params']:,} params; loss after {args.steps} steps on one batch: "
        + ", ".join(f"{v} {memory['glibc default'][v]['last_loss']:.4f}" for v in MEMORY_VARIANTS)
        + " bits/dim"
    )
    ratios = {}
    for name, results in memory.items():
        activations = {v: r["peak_mb"] - r["before_mb"] for v, r in results.items()}
        ratios[name] = {v: activations[v] / activations["plain"] for v in MEMORY_VARIANTS}
        print(
            f"  peak memory, {name}: "
            + ",  ".join(f"{v} {r['peak_mb']:.0f} MB (activations {activations[v]:.0f} MB)" for v, r in results.items())
        )
    print(
        f"  checkpointed: activation memory ratio live {verdict(ratios['live (mmap ≥ 64 KiB)']['checkpointed'], 0.3)}, "
        f"{ratios['glibc default']['checkpointed']:.2f}× by default RSS"
    )
    print(f"  bf16 couplings: activation memory ratio {ratios['live (mmap ≥ 64 KiB)']['bf16-couplings']:.2f}× live")


if __name__ == "__main__":
    main()
