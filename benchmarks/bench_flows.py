"""Flow-library speed, measured side by side in one run on one machine; prints ratios.

    pip install normflows          # the peer, only for this benchmark
    python benchmarks/bench_flows.py [--depth 8 --levels 3 --width 128 --batch 32 --steps 300]

Targets (issue #12 item 6, issue #2): our Glow training step with bf16 couplings ≤ 0.67×
normflows' Glow step at equal K/L/width/batch, with bits/dim after ``--steps`` steps on the
embedded data within 0.02 of float32's; n×n-shift training step ≤ 1.05× the 1×1 (Glow) step;
Emerging sampling ≤ 2× Glow sampling. How close the step is to the machine's limit: the step's
FLOPs (PyTorch's FlopCounterMode: forward and backward, not the optimiser) per second against a
large matmul's FLOP/s measured in the same run, in float32 and bfloat16.

Step times: torch.utils.benchmark, every candidate of a comparison in the same interleaved rounds
(``timing.py``) so drift on the machine hits all alike. Bits/dim: two trials (``run_trial``) at
the Glow card's embedded recipe, same seed, float32 and bf16 couplings, validation bits/dim.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from torch.utils.benchmark import Timer

import flowbench
from flowbench.trial import measure_training_flops, prepare_training, resolve_device, train_step
from timing import time_interleaved, verdict  # benchmarks/timing.py: the script's folder is on sys.path

SHAPE = (3, 32, 32)  # the embedded data's (and CIFAR-10's) image shape


def step_ours(name, args, device, precision=None, **extra):
    """The training step a flowbench trial runs (trial.train_step after trial.prepare_training).
    Returns (step, model, pixels)."""
    torch.manual_seed(0)
    model = flowbench.build_model(
        name, SHAPE, depth=args.depth, levels=args.levels, hidden_channels=args.width, lu=args.lu, **extra
    )
    model.set_coupling_precision(precision)
    optimizer = prepare_training(model, device, lr=1e-3)
    pixels = torch.randint(0, 256, (args.batch, *SHAPE), dtype=torch.uint8, device=device)
    noise = torch.Generator(device).manual_seed(1)
    return lambda: train_step(model, optimizer, pixels, noise, grad_clip=None), model, pixels


def glow_step_normflows(args, device):
    """normflows' own multi-scale Glow (its README's recipe) at the same K, L, width, batch."""
    import normflows as nf

    channels, L, K = SHAPE[0], args.levels, args.depth
    q0, merges, flows = [], [], []
    for i in range(L):
        level = [
            nf.flows.GlowBlock(
                channels * 2 ** (L + 1 - i), args.width, split_mode="channel", scale=True, use_lu=args.lu
            )
            for _ in range(K)
        ]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (SHAPE[0] * 2 ** (L - i), SHAPE[1] // 2 ** (L - i), SHAPE[2] // 2 ** (L - i))
        else:
            latent = (SHAPE[0] * 2 ** (L + 1), SHAPE[1] // 2**L, SHAPE[2] // 2**L)
        q0.append(nf.distributions.DiagGaussian(latent))
    torch.manual_seed(0)
    model = nf.MultiscaleFlow(q0, flows, merges).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, *SHAPE, device=device) - 0.5

    def step():
        loss = model.forward_kld(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def matmul_rates(args, device) -> dict[str, tuple[int, float]]:
    """(n, FLOP/s) of an n×n matmul in float32 and bfloat16: the machine's practical peak. n doubles
    from 256 until one matmul takes a fifth of --min-run-time or n reaches --matmul-size (where a
    CPU lacks bf16 instructions, bf16 runs ~100× slower than float32, and a big n would take minutes)."""
    sizes, calls = {}, {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        n = 256
        while n < args.matmul_size:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            if (
                Timer("a @ b", globals={"a": a, "b": b}, num_threads=args.threads).timeit(1).median
                >= args.min_run_time / 5
            ):
                break
            n *= 2
        a, b, c = (torch.randn(n, n, device=device).to(dtype) for _ in range(3))
        sizes[name], calls[name] = n, lambda a=a, b=b, c=c: torch.mm(a, b, out=c)
    timed = time_interleaved(calls, args.repeats, args.threads, args.min_run_time, label="matmul")
    return {name: (n, 2 * n**3 / timed.median(name)) for name, n in sizes.items()}


def bpd_after_steps(args, precision: str, out_dir: str):
    """A trial of the Glow at the benchmark's shape on the embedded data with the card's recipe."""
    from flowbench.cards import training_settings
    from flowbench.trial import TrialConfig, run_trial

    settings, source = training_settings("glow", "embedded", {"batch_size": args.batch})
    config = TrialConfig(
        model="glow",
        dataset="embedded",
        seed=args.seed,
        budget_kind="steps",
        budget=args.steps,
        hparams={"depth": args.depth, "levels": args.levels, "hidden_channels": args.width, "lu": args.lu},
        **settings,
        recipe_source=source,
        coupling_precision=precision,
        evaluations=1,
        device=args.device,
        out_dir=out_dir,
    )
    return run_trial(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds each candidate is timed per round")
    p.add_argument("--steps", type=int, default=300, help="training steps before bits/dim is compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--matmul-size", type=int, default=None, help="largest n of the n×n matmul (8192 on CUDA, else 2048)"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    p.add_argument("--lu", action="store_true", help="LU-decomposed 1×1 convs on both sides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    )
    print(
        f"torch {torch.__version__}, device {where}, {args.threads} threads; K={args.depth} L={args.levels} "
        f"width={args.width} batch={args.batch} lu={args.lu}; medians over {args.repeats} interleaved rounds"
    )

    fp32, glow, pixels = step_ours("glow", args, device)
    bf16, glow_bf16, _ = step_ours("glow", args, device, precision=torch.bfloat16)
    nxn, _, _ = step_ours("nxn_shift", args, device)
    candidates = {"glow float32": fp32, "glow bf16 couplings": bf16, "n×n shift float32": nxn}
    try:
        candidates["normflows glow"], peer = glow_step_normflows(args, device)
    except ImportError:
        peer = None
        print("glow step vs normflows: not measured (pip install normflows)")
    steps = time_interleaved(candidates, args.repeats, args.threads, args.min_run_time, label="training step")
    print(
        f"training step ({glow.num_parameters():,} params in flowbench's glow"
        + (f", {sum(q.numel() for q in peer.parameters()):,} in normflows'" if peer else "")
        + "):"
    )
    for name in candidates:
        print(f"  {name:22s} {steps.line(name)}")
    if peer is not None:
        r, lo, hi = steps.ratio("glow bf16 couplings", "normflows glow")
        print(f"  bf16 couplings / normflows: {verdict(r, 0.67, (lo, hi))}")
        r, lo, hi = steps.ratio("glow float32", "normflows glow")
        print(f"  float32 / normflows: {r:.2f}× (rounds {lo:.2f}–{hi:.2f})")
    r, lo, hi = steps.ratio("glow bf16 couplings", "glow float32")
    print(f"  bf16 couplings / float32: {r:.2f}× (rounds {lo:.2f}–{hi:.2f})")
    r, lo, hi = steps.ratio("n×n shift float32", "glow float32")
    print(f"  n×n shift / 1×1 (glow): {verdict(r, 1.05, (lo, hi))}")

    # how close to the machine's limit: the step's counted FLOPs per second against a big matmul's
    step_flops = {
        precision: measure_training_flops(model, pixels, seed=0) * args.batch
        for precision, model in (("float32", glow), ("bfloat16", glow_bf16))
    }
    peak = matmul_rates(args, device)
    for precision, name in (("float32", "glow float32"), ("bfloat16", "glow bf16 couplings")):
        rate, (n, limit) = step_flops[precision] / steps.median(name), peak[precision]
        print(
            f"  {precision} step: {step_flops[precision] / 1e9:.2f} GFLOP forward+backward, {rate / 1e9:.1f} GFLOP/s "
            f"= {rate / limit:.0%} of a {n}×{n} {precision} matmul's {limit / 1e9:.1f} GFLOP/s"
        )

    _, emerging, _ = step_ours("emerging", args, device)
    for m in (emerging, glow):
        m.eval()
    with torch.no_grad():
        sampling = time_interleaved(
            {"emerging": lambda: emerging.sample(args.sample_batch), "glow": lambda: glow.sample(args.sample_batch)},
            max(3, args.repeats // 2),
            args.threads,
            args.min_run_time,
            label="sampling",
        )
    print(f"sampling {args.sample_batch} images: emerging {sampling.line('emerging')}, glow {sampling.line('glow')}")
    r, lo, hi = sampling.ratio("emerging", "glow")
    print(f"  emerging / glow: {verdict(r, 2.0, (lo, hi))}")

    with tempfile.TemporaryDirectory(prefix="bench-flows-") as tmp:
        records = {
            precision: bpd_after_steps(args, precision, f"{tmp}/{precision}") for precision in ("float32", "bfloat16")
        }
    print(
        f"bits/dim after {args.steps} steps on the embedded data (glow card recipe, seed {args.seed}; "
        "validation split):"
    )
    for precision, record in records.items():
        print(
            f"  {precision:9s} val {record.val_bpd:.4f}  test {record.test_bpd:.4f}  ({record.status}, "
            f"{record.train_seconds:.0f} s training)"
        )
    gap = abs(records["bfloat16"].val_bpd - records["float32"].val_bpd)
    ok = math.isfinite(gap) and gap <= 0.02
    print(f"  |bf16 − float32| val bits/dim: {gap:.4f} (target ≤ 0.02: {'met' if ok else 'NOT met'})")


if __name__ == "__main__":
    main()
