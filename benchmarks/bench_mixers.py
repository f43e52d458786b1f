"""Every mixer's training step and sampling against Glow's 1×1, measured side by side in one run.

    python benchmarks/bench_mixers.py [--spec sweeps/mixers-cpu.yaml --repeats 5 --threads 2]

The architectures are the spec's (its models at their matched widths: the shared backbone of the
mixers sweep, so these ratios are those of the sweep's own models), on random images of its data
set's shape. A training step is a flowbench trial's (``train_step`` after ``prepare_training``) at the
spec's batch; sampling is ``model.sample`` at ``--sample-batch``, the inverse of every layer. All
models of a measurement run in the same interleaved rounds (``timing.py``); a ratio is the median over
rounds of the round's ratio to Glow, with its lowest and highest round. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import torch

import flowbench
from flowbench.sweep.plan import plan_sweep
from flowbench.trial import measure_training_flops, prepare_training, resolve_device, train_step
from timing import time_interleaved  # benchmarks/timing.py: the script's folder is on sys.path


def candidates(spec_path: str, sample_batch: int, device: torch.device):
    """Per model of the spec (its first seed's configuration): its training step, its sampling, and
    its training FLOPs per image."""
    planned = plan_sweep(spec_path)
    steps, samples, flops = {}, {}, {}
    for config in planned.configs:
        if config.model in steps:
            continue
        info = planned.infos[config.dataset]
        torch.manual_seed(0)
        model = flowbench.build_model(config.model, info.image_shape, **({"n_bits": info.n_bits} | config.hparams))
        optimizer = prepare_training(model, device, config.lr, config.optimizer)
        pixels = torch.randint(0, 2**info.n_bits, (config.batch_size, *info.image_shape), dtype=torch.uint8)
        pixels = pixels.to(device)
        gen = torch.Generator(device).manual_seed(0)
        train_step(model, optimizer, pixels, gen, config.grad_clip)  # ActNorm's data-dependent start
        flops[config.model] = measure_training_flops(model, pixels, seed=0)

        def step(model=model, optimizer=optimizer, pixels=pixels, gen=gen, clip=config.grad_clip):
            return train_step(model, optimizer, pixels, gen, clip)

        @torch.no_grad()
        def sample(model=model):
            model.eval()
            return model.sample(sample_batch)

        steps[config.model], samples[config.model] = step, sample
    return steps, samples, flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="sweeps/mixers-cpu.yaml")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds each candidate is timed per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    steps, samples, flops = candidates(args.spec, args.sample_batch, device)
    print(
        f"torch {torch.__version__}, device {device.type} ({where}), {args.threads} threads; {args.spec}'s models; "
        f"medians over {args.repeats} interleaved rounds"
    )
    timed_steps = time_interleaved(steps, args.repeats, args.threads, args.min_run_time, label="training step")
    timed_samples = time_interleaved(samples, args.repeats, args.threads, args.min_run_time, label="sampling")
    print("| mixer | training FLOPs / image | step ms | step / glow (rounds) | sampling ms | sampling / glow |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in steps:
        step_ratio = timed_steps.ratio(name, "glow")
        sample_ratio = timed_samples.ratio(name, "glow")
        step_ms, sample_ms = timed_steps.median(name) * 1e3, timed_samples.median(name) * 1e3
        step_cell = f"{step_ratio[0]:.2f}× ({step_ratio[1]:.2f}–{step_ratio[2]:.2f})"
        sample_cell = f"{sample_ratio[0]:.2f}× ({sample_ratio[1]:.2f}–{sample_ratio[2]:.2f})"
        print(f"| {name} | {flops[name]:.3g} | {step_ms:.1f} | {step_cell} | {sample_ms:.1f} | {sample_cell} |")


if __name__ == "__main__":
    main()
