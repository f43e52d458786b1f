"""Inference latency as a measurement: a set of models timed side by side in one process of their own,
in native numerics at the threads given, each call warmed up, then in interleaved rounds (A B C D,
A B C D, …) so that whatever drifts (clocks, caches, a neighbour) hits every model alike; on CUDA
each call is synchronised and the GPU's clocks are recorded.

A job is JSON: the items (a trial's selected weights, or an architecture built from its recorded
hyper-parameters where the weights are gone), the device, the batch sizes, rounds, warm-up and
threads. ``time_in_native_process`` runs it in a fresh Python whose environment lacks portable
numerics' variables (a portable sweep's Ray workers carry them): latency is measured as anyone runs
inference, whatever numerics the training used. ``python -m flowbench.trial.latency`` reads a job on
stdin and writes its rows on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import flowbench
from flowbench.errors import FlowbenchError
from flowbench.numerics import PORTABLE_ENV, cpu_description, math_libraries
from flowbench.trial.checkpoints import load_checkpoint, model_from_checkpoint

KINDS = ("density", "sampling")  # log_prob of images, and the inverse (sampling)
INITIAL_WEIGHTS = "initial (no selected weights kept)"


def device_label(device: torch.device, threads: int) -> str:
    """What a latency is comparable within: the GPU's name, or the CPU's with the threads used."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_description()}, {threads} thread{'s' if threads > 1 else ''}"


def gpu_clocks() -> str:
    """The SM clock now and its maximum, as nvidia-smi reads them ('' without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def model_for(item: dict, device: torch.device):
    """The item's model on ``device`` in eval mode, and which weights it holds: its selected weights
    (``weights``), else the architecture its record names (``model``, ``hparams``, ``image_shape``)."""
    weights = item.get("weights")
    if weights and Path(weights).is_file():
        return model_from_checkpoint(load_checkpoint(weights), device).eval(), "selected"
    model = flowbench.build_model(item["model"], tuple(item["image_shape"]), **json.loads(item["hparams"]))
    return model.to(device).eval(), INITIAL_WEIGHTS


@torch.inference_mode()
def time_models(job: dict) -> list[dict]:
    """One row per item × kind × batch size: every call's time over the rounds, their median and
    quartiles, and what they were measured on."""
    threads = int(job["threads"])
    torch.set_num_threads(threads)
    device = torch.device(job["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowbenchError("latency on cuda asked for, but this machine's torch sees no CUDA GPU; give --device cpu")
    calls, rows = [], []
    for item in job["items"]:
        model, weights = model_for(item, device)
        for batch in job["batch_sizes"]:
            generator = torch.Generator(device).manual_seed(0)
            images = model.sample(batch, generator=generator)  # the density's input: the model's own samples
            calls.append((lambda m=model, x=images: m.log_prob(x), item, "density", batch, weights))
            calls.append((lambda m=model, b=batch: m.sample(b), item, "sampling", batch, weights))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.time()
    for call, *_ in calls:
        for _ in range(job["warmup"]):
            call()
    sync()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(job["rounds"]):
        for i, (call, *_) in enumerate(calls):
            start = time.perf_counter()
            call()
            sync()
            times[i].append((time.perf_counter() - start) * 1e3)
    ended = time.time()
    provenance = {
        "device": device_label(device, threads),
        "device_kind": device.type,
        "cpu": cpu_description(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "math_libraries": math_libraries(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "gpu_clocks": gpu_clocks() if device.type == "cuda" else "",
        "torch_version": torch.__version__,
        "started_at": _utc(started),
        "ended_at": _utc(ended),
    }
    for (_, item, kind, batch, weights), ms in zip(calls, times, strict=True):
        q1, median, q3 = np.percentile(ms, [25, 50, 75])
        rows.append(
            {
                "trial_id": item["trial_id"],
                "kind": kind,
                "batch_size": batch,
                "median_ms": float(median),
                "q1_ms": float(q1),
                "q3_ms": float(q3),
                "images_per_s": batch / float(median) * 1e3,
                "rounds": len(ms),
                "warmup": job["warmup"],
                "times_ms": [float(t) for t in ms],
                "weights": weights,
            }
            | provenance
        )
    return rows


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


def time_in_native_process(job: dict) -> list[dict]:
    """``time_models(job)`` in a fresh Python without portable numerics' environment."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "flowbench.trial.latency"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        said = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise FlowbenchError(f"latency timing failed: {said[-1] if said else f'exit {done.returncode}'}")
    return json.loads(done.stdout)


if __name__ == "__main__":
    try:
        print(json.dumps(time_models(json.load(sys.stdin))))
    except FlowbenchError as err:
        sys.exit(f"flowbench: {err}")
