"""Training options against plain float32 backprop, on Glow: memory-lean training (gradient
checkpointing per flow step) and bfloat16 coupling networks.

    python benchmarks/bench_training.py [--depth 32 --levels 3 --width 256 --batch 16]

Each variant runs in its own process so peak memory is its own: CUDA's max_memory_allocated on
a GPU, the process's peak RSS on CPU (with glibc's default allocator, and with large blocks
mmapped so that RSS follows live tensors), both less the peak after a one-image step (model,
gradients, Adam state): what remains is the activation memory of the full-batch steps. Step
times come from one process that interleaves the variants.
Target for checkpointing (issue #6): ≤ 0.3× the activation memory at ≤ 1.5× the step time.
bfloat16 has no target: its step-time ratio is printed with the loss it reaches beside float32's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from functools import partial

import torch
from timing import time_interleaved, verdict  # benchmarks/timing.py: the script's folder is on sys.path

VARIANTS = ("plain", "checkpointed", "bf16-couplings")


def use_variant(model, variant: str) -> None:
    model.set_gradient_checkpointing(variant == "checkpointed")
    model.set_coupling_precision(torch.bfloat16 if variant == "bf16-couplings" else None)


def setup(args):
    import flowbench
    from flowbench.trial import prepare_training, resolve_device, train_step

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = flowbench.build_model("glow", (3, 32, 32), depth=args.depth, levels=args.levels,
                                  hidden_channels=args.width)
    optimizer = prepare_training(model, device, lr=1e-4)  # random pixels, no warm-up: 1e-3 diverges at K=32
    pixels = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)

    def step():
        loss = train_step(model, optimizer, pixels, None, grad_clip=None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss

    return model, device, pixels, optimizer, step


def measure_memory(args) -> dict:
    """One variant alone in this process: its peak memory, and the loss after ``steps`` steps."""
    from flowbench.trial import train_step

    model, device, pixels, optimizer, step = setup(args)
    use_variant(model, args.variant)

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # one step on a single image first: gradients, Adam state and ActNorm's init exist before the
    # baseline is read, so what the real steps add is activation memory
    train_step(model, optimizer, pixels[:1], None, grad_clip=None)
    before = peak()
    for _ in range(args.steps):
        loss = step()
    return {"peak_mb": peak(), "before_mb": before, "last_loss": loss, "params": model.num_parameters(),
            "device": str(device)}


def measure_times(args) -> dict:
    """Step times of all variants on one model, interleaved (plain, checkpointed, bf16, plain, …)
    so that drift in the machine's speed lands on every variant alike."""
    model, _, _, _, step = setup(args)

    def step_as(variant):
        use_variant(model, variant)
        return step()

    # one warm-up round: allocator pools and kernels
    times = time_interleaved({v: partial(step_as, v) for v in VARIANTS}, args.steps, warmup=1)
    return {variant: statistics.quantiles(t, n=4) for variant, t in times.items()}  # q1, median, q3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", choices=[*VARIANTS, "times"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure_times(args) if args.variant == "times" else measure_memory(args)))
        return

    def run(variant: str, env: dict | None = None) -> dict:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("depth", "levels", "width", "batch", "steps", "device")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | (env or {})).stdout
        return json.loads(out)

    # glibc keeps freed heap memory, so a CPU process's peak RSS overstates live tensors; with
    # large blocks mmapped (freed at once) RSS follows live memory, as max_memory_allocated does on CUDA
    allocators = {"glibc default": {}, "live (mmap ≥ 64 KiB)": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    memory = {name: {v: run(v, env) for v in VARIANTS} for name, env in allocators.items()}
    quartiles = run("times")
    times = {v: q[1] for v, q in quartiles.items()}
    plain = memory["glibc default"]["plain"]
    print(f"glow K={args.depth} L={args.levels} width={args.width} batch={args.batch}, {plain['params']:,} params, "
          f"device {plain['device']}, median of {args.steps} interleaved steps")
    for v in VARIANTS:
        q1, _, q3 = quartiles[v]
        print(f"  {v:15s} step {times[v] * 1e3:8.1f} ms (IQR {q1 * 1e3:.0f}–{q3 * 1e3:.0f})   loss after {args.steps} steps "
              f"{memory['glibc default'][v]['last_loss']:.4f} bits/dim")
    ratios = {}
    for name, results in memory.items():
        activations = {v: r["peak_mb"] - r["before_mb"] for v, r in results.items()}
        ratios[name] = {v: activations[v] / activations["plain"] for v in VARIANTS}
        print(f"  peak memory, {name}: " + ",  ".join(
            f"{v} {r['peak_mb']:.0f} MB (activations {activations[v]:.0f} MB)" for v, r in results.items()))
    lean = ratios["live (mmap ≥ 64 KiB)"]["checkpointed"]
    t = times["checkpointed"] / times["plain"]
    print(f"  checkpointed: activation memory ratio live {verdict(lean, 0.3)}, "
          f"{ratios['glibc default']['checkpointed']:.2f}× by default RSS")
    print(f"  checkpointed: step time ratio {verdict(t, 1.5)}")
    print(f"  bf16 couplings: step time ratio {times['bf16-couplings'] / times['plain']:.2f}×, activation memory "
          f"ratio {ratios['live (mmap ≥ 64 KiB)']['bf16-couplings']:.2f}× live")


if __name__ == "__main__":
    main()
