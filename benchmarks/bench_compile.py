"""Compiled against eager training steps (issue #20), per model, shape and coupling precision, in one
run on one machine: prints the ratios and the steps after which compiling pays for itself.

    python benchmarks/bench_compile.py [--shapes laptop,card] [--models glow,emerging] [--json figures.json]

Shapes: ``laptop`` is the Glow family at K=8, L=3, width 128, batch 32 (RealNVP at table2-cpu's
levels 2, 2 residual blocks, width 64), ``card`` every model at its CIFAR-10 card, batch 64; both on
3×32×32 images. The training step is the one a trial runs (``trial.train_step``), eager and with
``torch.compile`` as ``train: {compile: true}`` compiles it. Per model, its candidates (eager and
compiled, float32 and bfloat16 couplings) are timed in the same interleaved rounds (``timing.py``);
Glow's rounds also hold normflows' float32 Glow when normflows is installed: the issue's target is
the bf16 step at ≤ 0.5× normflows' float32 step and ≥ 50% of a bf16 matmul's rate.

Compile seconds: the first compiled step's time (dynamo's and Inductor's caches emptied first,
Inductor's on-disk cache kept, as a trial finds it). Break-even steps: compile seconds over the
per-step saving. Glow at the laptop shape also times inference compiled against eager: the
density (``log_prob``, what evaluation and latency run) and sampling (the inverse), to decide
whether they should be compiled too.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import flowbench
from bench_flows import glow_step_normflows, matmul_rates  # the peer and the machine's matmul rates
from flowbench.cards import load_card
from flowbench.trial import measure_training_flops, prepare_training, resolve_device, train_step
from timing import time_interleaved  # benchmarks/timing.py: the script's folder is on sys.path

IMAGE = (3, 32, 32)
MODELS = ("glow", "nxn_shift", "emerging", "periodic", "realnvp")
LAPTOP = {"realnvp": {"levels": 2, "hidden_channels": 64, "n_blocks": 2}}  # table2-cpu's RealNVP
LAPTOP_GLOW_FAMILY = {"depth": 8, "levels": 3, "hidden_channels": 128}
BATCH = {"laptop": 32, "card": 64}


def hparams_at(name: str, shape: str) -> dict:
    card = load_card(name).hparams_for("cifar10")
    return card if shape == "card" else card | LAPTOP.get(name, LAPTOP_GLOW_FAMILY)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    bf16 = "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo
    return (
        f"{model or platform.processor()}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{'with' if bf16 else 'no'} bf16 instructions, {torch.get_num_threads()} threads"
    )


def training_step(name, hparams, batch, device, precision, compiled):
    """(step, model, pixels): a trial's training step; compiled as a compiled trial compiles it."""
    torch.manual_seed(0)
    model = flowbench.build_model(name, IMAGE, **hparams)
    model.set_coupling_precision(torch.bfloat16 if precision == "bfloat16" else None)
    optimizer = prepare_training(model, device, lr=1e-4)
    pixels = torch.randint(0, 256, (batch, *IMAGE), dtype=torch.uint8, device=device)
    noise = torch.Generator(device).manual_seed(1)
    model.train()
    with torch.no_grad():  # ActNorm's initialisation, eager, as in a trial
        model.log_prob(model.preprocess_pixels(pixels, noise)[0])
    net = torch.compile(model, dynamic=False) if compiled else model
    return lambda: train_step(model, optimizer, pixels, noise, grad_clip=None, net=net), model, pixels


def first_call_seconds(fn, device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def break_even(compile_s: float, eager_s: float, ratio: float) -> float:
    """Steps (calls) after which the compile has paid for itself: its seconds over the saving a step,
    the eager median times (1 − the compiled/eager ratio of interleaved rounds); never when ratio ≥ 1."""
    return compile_s / (eager_s * (1 - ratio)) if ratio < 1 else math.inf


def bench_model(name, shape, args, device, peak, with_peer) -> list[dict]:
    hparams, batch = hparams_at(name, shape), BATCH[shape]
    torch._dynamo.reset()  # this model's compiles only: earlier models' entries would count to dynamo's limit
    candidates, compile_s, models = {}, {}, {}
    for precision in args.precisions:
        eager, model, pixels = training_step(name, hparams, batch, device, precision, compiled=False)
        compiled, _, _ = training_step(name, hparams, batch, device, precision, compiled=True)
        compile_s[precision] = first_call_seconds(compiled, device)
        candidates[f"eager {precision}"], candidates[f"compiled {precision}"] = eager, compiled
        models[precision] = (model, pixels)
    if with_peer:
        peer_args = SimpleNamespace(
            depth=hparams["depth"], levels=hparams["levels"], width=hparams["hidden_channels"], batch=batch, lu=False
        )
        candidates["normflows float32"], _ = glow_step_normflows(peer_args, device)
    timed = time_interleaved(candidates, args.repeats, args.threads, args.min_run_time, label=f"{name} {shape}")
    print(f"{name} at the {shape} shape ({' '.join(f'{k}={v}' for k, v in hparams.items())}, batch {batch}):")
    for candidate in candidates:
        print(f"  {candidate:20s} {timed.line(candidate)}")
    rows = []
    for precision in args.precisions:
        eager_s, compiled_s = timed.median(f"eager {precision}"), timed.median(f"compiled {precision}")
        r, lo, hi = timed.ratio(f"compiled {precision}", f"eager {precision}")
        model, pixels = models[precision]
        flops = measure_training_flops(model, pixels, seed=0) * batch  # the eager model's, as a trial counts
        n, limit = peak[precision]
        row = {
            "model": name,
            "shape": shape,
            "precision": precision,
            "batch": batch,
            "hparams": hparams,
            "eager_ms": eager_s * 1e3,
            "compiled_ms": compiled_s * 1e3,
            "compiled_over_eager": r,
            "rounds_low": lo,
            "rounds_high": hi,
            "compile_seconds": compile_s[precision],
            "break_even_steps": break_even(compile_s[precision], eager_s, r),
            "step_gflop": flops / 1e9,
            "eager_of_matmul_rate": flops / eager_s / limit,
            "compiled_of_matmul_rate": flops / compiled_s / limit,
        }
        print(
            f"  {precision}: compiled / eager {r:.2f}× (rounds {lo:.2f}–{hi:.2f}); "
            f"compile {compile_s[precision]:.0f} s, "
            f"pays back after {row['break_even_steps']:.0f} steps; {flops / 1e9:.2f} GFLOP a step: eager "
            f"{row['eager_of_matmul_rate']:.0%}, compiled {row['compiled_of_matmul_rate']:.0%} of a {n}×{n} "
            f"{precision} matmul's {limit / 1e9:.0f} GFLOP/s"
        )
        if with_peer:
            for kind in ("eager", "compiled"):
                pr, plo, phi = timed.ratio(f"{kind} {precision}", "normflows float32")
                row[f"{kind}_over_normflows_float32"] = pr
                target = f"  (target ≤ 0.5×: {'met' if pr <= 0.5 else 'NOT met'})" if precision == "bfloat16" else ""
                print(f"    {kind} {precision} / normflows float32: {pr:.2f}× (rounds {plo:.2f}–{phi:.2f}){target}")
            if precision == "bfloat16":
                best = max(row["eager_of_matmul_rate"], row["compiled_of_matmul_rate"])
                met = "met" if best >= 0.5 else "NOT met"
                print(f"    bf16 step at {best:.0%} of the bf16 matmul rate (target ≥ 50%: {met})")
        rows.append(row)
    return rows


def bench_inference(args, device) -> dict:
    """Glow at the laptop shape: the density (evaluation, latency) and sampling, compiled against eager."""
    torch._dynamo.reset()
    hparams, batch = hparams_at("glow", "laptop"), args.latency_batch
    torch.manual_seed(0)
    model = flowbench.build_model("glow", IMAGE, **hparams).to(device)
    x = torch.rand(batch, *IMAGE, device=device) - 0.5
    model.train()
    with torch.no_grad():
        model.log_prob(x)
    model.eval()
    eps = torch.randn(batch, *IMAGE, device=device)
    density, sampling = torch.compile(model.log_prob, dynamic=False), torch.compile(model.decode, dynamic=False)
    with torch.no_grad():
        compile_s = {
            "density": first_call_seconds(lambda: density(x), device),
            "sampling": first_call_seconds(lambda: sampling(eps), device),
        }
        timed = time_interleaved(
            {
                "eager density": lambda: model.log_prob(x),
                "compiled density": lambda: density(x),
                "eager sampling": lambda: model.decode(eps),
                "compiled sampling": lambda: sampling(eps),
            },
            args.repeats,
            args.threads,
            args.min_run_time,
            label="glow inference",
        )
    figures = {}
    print(f"glow inference at the laptop shape, batch {batch} (no_grad, eval):")
    for kind in ("density", "sampling"):
        r, lo, hi = timed.ratio(f"compiled {kind}", f"eager {kind}")
        eager_s, compiled_s = timed.median(f"eager {kind}"), timed.median(f"compiled {kind}")
        calls = break_even(compile_s[kind], eager_s, r)
        figures[kind] = {
            "eager_ms": eager_s * 1e3,
            "compiled_ms": compiled_s * 1e3,
            "compiled_over_eager": r,
            "rounds_low": lo,
            "rounds_high": hi,
            "compile_seconds": compile_s[kind],
            "break_even_calls": calls,
        }
        print(
            f"  {kind:8s} eager {timed.line(f'eager {kind}')}, compiled {timed.line(f'compiled {kind}')}: "
            f"{r:.2f}× (rounds {lo:.2f}–{hi:.2f}); compile {compile_s[kind]:.0f} s, pays back after {calls:.0f} calls"
        )
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="laptop", help="comma-separated: laptop, card (default laptop)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    p.add_argument("--precisions", default="float32,bfloat16", help="coupling precisions (default both)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds each candidate is timed per round")
    p.add_argument("--matmul-size", type=int, default=None, help="largest n×n matmul (8192 on CUDA, else 2048)")
    p.add_argument("--latency-batch", type=int, default=16)
    p.add_argument("--no-inference", action="store_true", help="skip the density and sampling comparison")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the figures here as JSON (after each model, so a stopped run keeps them)")
    p.add_argument("--dry-run", action="store_true", help="build every model at its shape on the CPU; time nothing")
    args = p.parse_args()
    args.precisions = args.precisions.split(",")
    shapes, models = args.shapes.split(","), args.models.split(",")
    if args.dry_run:  # the options, names and shapes checked where no GPU is (benchmarks/gpu_check.py --dry-run)
        for shape in shapes:
            for name in models:
                model = flowbench.build_model(name, IMAGE, **hparams_at(name, shape))
                print(
                    f"{name} at {shape}: {model.num_parameters():,} parameters, batch {BATCH[shape]}, {args.precisions}"
                )
        return
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    where = machine(device)
    print(f"torch {torch.__version__}, {where}; medians over {args.repeats} interleaved rounds")
    peak = matmul_rates(args, device)
    for precision, (n, rate) in peak.items():
        print(f"  {n}×{n} {precision} matmul: {rate / 1e9:.0f} GFLOP/s")
    try:
        import normflows  # noqa: F401  (the peer; only its presence is asked here)

        has_peer = True
    except ImportError:
        has_peer = False
        print("normflows not installed (pip install normflows): Glow is not compared with its step")
    figures: dict = {
        "machine": where,
        "torch": torch.__version__,
        "matmul_gflops": {k: rate / 1e9 for k, (_, rate) in peak.items()},
        "steps": [],
        "inference": {},
    }

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))

    for shape in shapes:
        for name in models:
            figures["steps"] += bench_model(name, shape, args, device, peak, has_peer and name == "glow")
            save()
    if not args.no_inference:
        figures["inference"] = bench_inference(args, device)
        save()
    if args.json:
        print(f"figures in {args.json}")


if __name__ == "__main__":
    main()
