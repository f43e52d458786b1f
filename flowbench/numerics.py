"""What a trial's numbers depend on, recorded with every trial, and the portable mode.

Training amplifies rounding: the same trial and seed agree to every digit on one machine but not
across machines whose CPUs pick other kernels (ATen's vectorised code per instruction set, MKL's
code path, oneDNN's JIT kernels) or another thread count. ``environment()`` names those inputs in
the record. ``numerics: portable`` pins them: ATen's baseline kernels, MKL's conditional numerical
reproducibility in its compatible path and oneDNN capped at AVX2, on one thread, so that the same
trial gives the same bits on any x86-64 CPU with AVX2 (every machine these runs happen on). Measured
(docs/results.md): an AVX-512 machine and an emulated AVX2 one (qemu's
Haswell) agree to every bit of the weights; capping every library at AVX2 but keeping ATen's AVX2
kernels does not, and neither does oneDNN turned off. The cost in speed is measured by
``benchmarks/bench_numerics.py``.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path
from typing import Literal

Numerics = Literal["native", "portable"]

# read by ATen, MKL and oneDNN when each first runs a kernel: set before torch computes anything
# (the CLI sets them at its start; a sweep hands them to its Ray workers' environment)
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # its AVX2 kernels agree across AVX2 and AVX-512 CPUs; SSE4.1's cost more
}
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides which kernels a CPU runs


def environment_for(numerics: Numerics) -> dict[str, str]:
    """The environment variables a process needs for ``numerics`` (none for native)."""
    return dict(PORTABLE_ENV) if numerics == "portable" else {}


def check_in_effect(numerics: Numerics) -> None:
    """Fail in one line where portable numerics were asked for but this process's torch runs
    other kernels (it was started without the environment, or computed before it was set)."""
    import torch

    from flowbench.errors import FlowbenchError

    if numerics != "portable":
        return
    if "avx2" not in cpu_model_and_flags()[1]:
        raise FlowbenchError(
            f"numerics: portable needs a CPU with AVX2 (oneDNN's AVX2 kernels); this one is {cpu_description()}: "
            "run the trial on another machine, or with numerics: native"
        )
    capability = torch.backends.cpu.get_cpu_capability()
    wrong = {k: os.environ.get(k) for k, v in PORTABLE_ENV.items() if os.environ.get(k) != v}
    if capability != "DEFAULT" or wrong:
        raise FlowbenchError(
            f"numerics: portable asked for, but this process runs ATen's {capability} kernels "
            f"(environment {wrong or 'set too late'}): start it with "
            + " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items())
        )


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its instruction-set flags (``/proc/cpuinfo``, where there is one)."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text()
        if found := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            model = found.group(1).strip()
        if found := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            flags = frozenset(found.group(1).split())
    return model, flags


def cpu_description() -> str:
    """The CPU's model name and the instruction-set flags that decide its kernels."""
    model, flags = cpu_model_and_flags()
    present = [f for f in ISA_FLAGS if f in flags]
    return f"{model} ({' '.join(present)})" if present else model


@functools.cache
def math_libraries() -> str:
    """MKL's and oneDNN's versions as torch was built with them (``torch.__config__.show()``)."""
    import torch

    shown = torch.__config__.show()
    found = []
    if mkl := re.search(r"Math Kernel Library Version (\S+)", shown):
        found.append(f"MKL {mkl.group(1)}")
    if dnn := re.search(r"MKL-DNN (v[\d.]+)", shown):
        found.append(f"oneDNN {dnn.group(1)}")
    return "; ".join(found)


def environment(device, numerics: Numerics) -> dict[str, str | int]:
    """The record's provenance of numerics: CPU, ATen's kernels, threads, math libraries, GPU."""
    import torch

    gpu = ""
    if device.type == "cuda":
        gpu = (
            f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
        )
    return {
        "numerics": numerics,
        "cpu": cpu_description(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "math_libraries": math_libraries(),
        "gpu": gpu,
    }
