"""Training options against plain float32 backprop, on Glow: memory-lean training (gradient
checkpointing per flow step) and bfloat16 coupling networks.

    python benchmarks/bench_training.py [--depth 32 --levels 3 --width 256 --batch 16]

Each variant runs in its own process so peak memory is its own: CUDA's max_memory_allocated on
a GPU, the process's peak RSS on CPU, both less the peak after a one-image step (model,
gradients, Adam state): what remains is the activation memory of the full-batch steps.
Target for checkpointing (issue #6): ≤ 0.3× the activation memory at ≤ 1.5× the step time.
bfloat16 has no target: its step-time ratio is printed with the loss it reaches beside float32's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("plain", "checkpointed", "bf16-couplings")

def run_variant(args) -> dict:
    import flowbench
    from flowbench.trial import prepare_training, resolve_device, train_step

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = flowbench.build_model("glow", (3, 32, 32), depth=args.depth, levels=args.levels,
                                  hidden_channels=args.width)
    model.set_gradient_checkpointing(args.variant == "checkpointed")
    model.set_coupling_precision(torch.bfloat16 if args.variant == "bf16-couplings" else None)
    optimizer = prepare_training(model, device, lr=1e-4)  # random pixels, no warm-up: 1e-3 diverges at K=32
    pixels = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # one step on a single image first: gradients, Adam state and ActNorm's init exist before the
    # baseline is read, so what the real steps add is activation memory
    train_step(model, optimizer, pixels[:1], None, grad_clip=None)
    sync()
    before = peak()
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        loss = train_step(model, optimizer, pixels, None, grad_clip=None)
        sync()
        if i:  # the first full step warms allocator pools
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": peak(), "before_mb": before, "last_loss": loss,
            "params": model.num_parameters(), "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("depth", "levels", "width", "batch", "steps", "device")]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    plain, lean, bf16 = results["plain"], results["checkpointed"], results["bf16-couplings"]
    print(f"glow K={args.depth} L={args.levels} width={args.width} batch={args.batch}, {plain['params']:,} params, "
          f"device {plain['device']}, median of {args.steps} steps")
    for name, r in results.items():
        print(f"  {name:15s} step {r['step_s'] * 1e3:8.1f} ms   peak {r['peak_mb']:8.0f} MB   "
              f"(activations {r['peak_mb'] - r['before_mb']:.0f} MB)   last loss {r['last_loss']:.4f} bits/dim")
    mem = (lean["peak_mb"] - lean["before_mb"]) / (plain["peak_mb"] - plain["before_mb"])
    total = lean["peak_mb"] / plain["peak_mb"]
    t = lean["step_s"] / plain["step_s"]
    print(f"  checkpointed: activation memory ratio {mem:.2f}× (whole-process peak {total:.2f}×), target ≤ 0.3×: "
          f"{'met' if mem <= 0.3 else 'NOT met'}")
    print(f"  checkpointed: step time ratio {t:.2f}×, target ≤ 1.5×: {'met' if t <= 1.5 else 'NOT met'}")
    print(f"  bf16 couplings: step time ratio {bf16['step_s'] / plain['step_s']:.2f}×, activation memory ratio "
          f"{(bf16['peak_mb'] - bf16['before_mb']) / (plain['peak_mb'] - plain['before_mb']):.2f}×")


if __name__ == "__main__":
    main()
