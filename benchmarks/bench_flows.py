"""Flow-library speed, measured side by side in one run on one machine; prints ratios.

    pip install normflows          # the peer, only for this benchmark
    python benchmarks/bench_flows.py [--depth 8 --levels 3 --width 128 --batch 32]

Targets (issue #2): our Glow training step ≤ 0.67× normflows' Glow step at equal K/L/width/batch;
Emerging sampling ≤ 2× Glow sampling; n×n-shift training step ≤ 1.05× the 1×1 (Glow) step.
Timings alternate between the two sides of each ratio so drift on the machine hits both.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import flowbench
from flowbench.trial import prepare_training, train_step
from timing import time_interleaved, verdict  # benchmarks/timing.py: the script's folder is on sys.path


def step_ours(name, args, **extra):
    """The training step a flowbench trial runs (trial.train_step after trial.prepare_training)."""
    model = flowbench.build_model(name, (3, 32, 32), depth=args.depth, levels=args.levels,
                                  hidden_channels=args.width, lu=args.lu, **extra)
    optimizer = prepare_training(model, torch.device("cpu"), lr=1e-3)
    pixels = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    return lambda: train_step(model, optimizer, pixels, None, grad_clip=None), model


def glow_step_normflows(args):
    """normflows' own multi-scale Glow (its README's recipe) at the same K, L, width, batch."""
    import normflows as nf

    channels, shape, L, K = 3, (3, 32, 32), args.levels, args.depth
    q0, merges, flows = [], [], []
    for i in range(L):
        level = [nf.flows.GlowBlock(channels * 2 ** (L + 1 - i), args.width, split_mode="channel", scale=True,
                                    use_lu=args.lu) for _ in range(K)]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (shape[0] * 2 ** (L - i), shape[1] // 2 ** (L - i), shape[2] // 2 ** (L - i))
        else:
            latent = (shape[0] * 2 ** (L + 1), shape[1] // 2 ** L, shape[2] // 2 ** L)
        q0.append(nf.distributions.DiagGaussian(latent))
    model = nf.MultiscaleFlow(q0, flows, merges)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, *shape) - 0.5

    def step():
        loss = model.forward_kld(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def time_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of a and b, interleaved."""
    times = time_interleaved({"a": a, "b": b}, repeats)
    return statistics.median(times["a"]), statistics.median(times["b"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--lu", action="store_true", help="LU-decomposed 1×1 convs on both sides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; K={args.depth} L={args.levels} width={args.width} "
          f"batch={args.batch} lu={args.lu}, median of {args.repeats}")

    ours, ours_model = step_ours("glow", args)
    try:
        peer, peer_model = glow_step_normflows(args)
    except ImportError:
        print("glow step vs normflows: not measured (pip install normflows)")
    else:
        t_ours, t_peer = time_pair(ours, peer, args.repeats)
        print(f"glow training step: flowbench {t_ours * 1e3:.1f} ms ({ours_model.num_parameters():,} params), "
              f"normflows {t_peer * 1e3:.1f} ms ({sum(q.numel() for q in peer_model.parameters()):,} params)")
        print(f"  ratio flowbench / normflows: {verdict(t_ours / t_peer, 0.67)}")

    nxn, _ = step_ours("nxn_shift", args)
    t_nxn, t_glow = time_pair(nxn, ours, args.repeats)
    print(f"training step: n×n shift {t_nxn * 1e3:.1f} ms, 1×1 (glow) {t_glow * 1e3:.1f} ms")
    print(f"  ratio n×n shift / 1×1: {verdict(t_nxn / t_glow, 1.05)}")

    _, emerging = step_ours("emerging", args)
    for m in (emerging, ours_model):
        m.eval()
    with torch.no_grad():
        t_em, t_gl = time_pair(lambda: emerging.sample(args.sample_batch), lambda: ours_model.sample(args.sample_batch),
                               max(3, args.repeats // 2))
    print(f"sampling {args.sample_batch} images: emerging {t_em * 1e3:.1f} ms, glow {t_gl * 1e3:.1f} ms")
    print(f"  ratio emerging / glow: {verdict(t_em / t_gl, 2.0)}")


if __name__ == "__main__":
    main()
