"""What portable numerics cost: the training step of a reference sweep's model in portable mode
against the native step, on one thread (a sweep's trials run on one CPU each).

    python benchmarks/bench_numerics.py [--depth 4 --levels 3 --width 101 --batch 32 --rounds 5]

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

from flowbench.numerics import cpu_description, environment_for

MODES = ("native", "portable")


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
    model = flowbench.build_model(
        "glow", data.image_shape, depth=args.depth, levels=args.levels, hidden_channels=args.width
    )
    optimizer = prepare_training(model, torch.device("cpu"), lr=1e-3)
    pixels = data.train.batch(range(args.batch))
    noise = torch.Generator().manual_seed(1)

    def step():
        train_step(model, optimizer, pixels, noise, 50.0)

    seconds = Timer("step()", globals={"step": step}, num_threads=1).blocked_autorange(min_run_time=args.seconds)
    print(json.dumps({"seconds": seconds.median, "capability": torch.backends.cpu.get_cpu_capability()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--width", type=int, default=101)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per mode and round")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the measuring process
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    shape = ["--depth", str(args.depth), "--levels", str(args.levels), "--width", str(args.width)]
    shape += ["--batch", str(args.batch), "--seconds", str(args.seconds)]
    rounds: dict[str, list[float]] = {mode: [] for mode in MODES}
    kernels = {}
    order = list(MODES)
    for _ in range(args.rounds):
        for mode in order:
            env = {k: v for k, v in os.environ.items() if k not in environment_for("portable")}
            done = subprocess.run(
                [sys.executable, __file__, "--measure", *shape],
                env=env | environment_for(mode),  # type: ignore[arg-type]
                capture_output=True,
                text=True,
                check=True,
            )
            figure = json.loads(done.stdout.strip().splitlines()[-1])
            rounds[mode].append(figure["seconds"])
            kernels[mode] = figure["capability"]
        order.reverse()
    per_round = [p / n for p, n in zip(rounds["portable"], rounds["native"], strict=True)]
    print(f"machine: {cpu_description()}; Glow K={args.depth} L={args.levels} width {args.width}, batch {args.batch}")
    for mode in MODES:
        times = rounds[mode]
        print(
            f"  {mode:9s} ({kernels[mode]} kernels): {statistics.median(times) * 1e3:.1f} ms a step "
            f"(rounds {min(times) * 1e3:.1f}–{max(times) * 1e3:.1f})"
        )
    print(
        f"portable / native step: {statistics.median(per_round):.2f}× "
        f"(rounds {min(per_round):.2f}–{max(per_round):.2f}) over {args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
