"""What portable numerics cost: the training step of a reference sweep's model in portable mode
against the native step, on one thread (a sweep's trials run on one CPU each).

    python benchmarks/bench_numerics.py [--depth 4 --levels 3 --width 101 --batch 32 --rounds 5]
    python benchmarks/bench_numerics.py --spec sweeps/table2-cpu.yaml --modes native portable aten onednn mkl

``--spec``: every model of the spec at the architecture its trials train (``match_params`` applied).
``--modes``: besides native and portable, each of portable's three settings alone (``aten``: ATen's
baseline kernels; ``mkl``: MKL's compatible path; ``onednn``: oneDNN capped at AVX2), to see which
library's setting costs the time.

Portable numerics are fixed when a process starts (ATen, MKL and oneDNN read their settings at
their first kernel), so each mode measures in a process of its own: a round starts one process
per mode, alternating their order, and each times the step with ``torch.utils.benchmark``. The
figure is the median over rounds of the round's ratio. The shape defaults to table2-cpu's Glow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from flowbench.numerics import PORTABLE_ENV, cpu_description

MODES = {
    "native": {},
    "portable": PORTABLE_ENV,
    "aten": {"ATEN_CPU_CAPABILITY": PORTABLE_ENV["ATEN_CPU_CAPABILITY"]},
    "mkl": {"MKL_CBWR": PORTABLE_ENV["MKL_CBWR"]},
    "onednn": {"ONEDNN_MAX_CPU_ISA": PORTABLE_ENV["ONEDNN_MAX_CPU_ISA"]},
}


def measure(args) -> None:
    """In the measuring process: seconds per training step at the benchmark's shape."""
    import torch
    from torch.utils.benchmark import Timer

    import flowbench
    from flowbench.data import load_dataset
    from flowbench.trial import prepare_training, train_step

    torch.set_num_threads(1)
    data = load_dataset("embedded")
    torch.manual_seed(0)
    model = flowbench.build_model(args.model, data.image_shape, **json.loads(args.hparams))
    optimizer = prepare_training(model, torch.device("cpu"), lr=1e-3)
    pixels = data.train.batch(range(args.batch))
    noise = torch.Generator().manual_seed(1)

    def step():
        train_step(model, optimizer, pixels, noise, 50.0)

    seconds = Timer("step()", globals={"step": step}, num_threads=1).blocked_autorange(min_run_time=args.seconds)
    print(json.dumps({"seconds": seconds.median, "capability": torch.backends.cpu.get_cpu_capability()}))


def architectures(args) -> dict[str, dict]:
    """The models to time and their hyper-parameters: the spec's, as its trials build them, or Glow's."""
    if args.spec is None:
        return {"glow": {"depth": args.depth, "levels": args.levels, "hidden_channels": args.width}}
    from flowbench.sweep.plan import plan_sweep

    found: dict[str, dict] = {}
    for config in plan_sweep(args.spec).configs:
        found.setdefault(config.model, config.hparams)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--width", type=int, default=101)
    parser.add_argument("--spec", help="time every model of this sweep spec at its trials' architecture")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["native", "portable"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per mode and round")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the measuring process
    parser.add_argument("--model", default="glow", help=argparse.SUPPRESS)
    parser.add_argument("--hparams", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    print(f"machine: {cpu_description()}; batch {args.batch}, one thread, {args.rounds} rounds")
    clean = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    for model, hparams in architectures(args).items():
        shape = ["--model", model, "--hparams", json.dumps(hparams)]
        shape += ["--batch", str(args.batch), "--seconds", str(args.seconds)]
        rounds: dict[str, list[float]] = {mode: [] for mode in args.modes}
        kernels = {}
        order = list(args.modes)
        for _ in range(args.rounds):
            for mode in order:
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", *shape],
                    env=clean | MODES[mode],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                figure = json.loads(done.stdout.strip().splitlines()[-1])
                rounds[mode].append(figure["seconds"])
                kernels[mode] = figure["capability"]
            order.reverse()
        print(f"{model} {json.dumps(hparams, sort_keys=True)}")
        for mode in args.modes:
            times = rounds[mode]
            per_round = [t / n for t, n in zip(times, rounds[args.modes[0]], strict=True)]
            print(
                f"  {mode:9s} ({kernels[mode]} kernels): {statistics.median(times) * 1e3:.1f} ms a step "
                f"(rounds {min(times) * 1e3:.1f}–{max(times) * 1e3:.1f}); / {args.modes[0]}: "
                f"{statistics.median(per_round):.2f}× (rounds {min(per_round):.2f}–{max(per_round):.2f})"
            )


if __name__ == "__main__":
    main()
