"""The GPU check in one call (issue #20): on a machine with an NVIDIA GPU (an H100 or H200), within
``--budget`` seconds (default 450, under 8 minutes with start-up), run what needs a GPU and write one
Markdown summary, ``OUT/summary.md``, with the raw figures beside it (``OUT/figures.json``, the
benchmarks' JSON, each command's log).

    python benchmarks/gpu_check.py OUT [--wheels wheels] [--budget 450]
    python benchmarks/gpu_check.py OUT --dry-run      # anywhere, CPU only: every command checked, none run

The GPU machines this project borrows are bare and offline: Python 3.12 with torch (CUDA), numpy,
pandas, pyarrow, scipy, scikit-image, scikit-learn, matplotlib, tqdm and pytest, but no Ray, MLflow,
Optuna, pydantic or PyYAML. ``flowbench train`` needs pydantic and PyYAML, and the benchmark's peer
is normflows: their wheels travel with the working tree in ``wheels/`` (ignored by git), fetched
on a machine with a registry by

    pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 -d wheels \\
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions pyyaml
    pip wheel --no-deps -w wheels normflows     # PyPI has only its sdist: built here, pure Python

(pydantic-core at the version its pydantic pins; 3.7 MB in all). Nothing is installed:
a wheel is a zip archive, so the script unpacks each into ``OUT/site-packages`` and puts that folder
first on the PYTHONPATH of every command it runs, with the checkout itself (flowbench runs from
source: ``python -m flowbench.cli``). A machine that has these packages needs no wheels.

Two tiers; the summary says which ran:

- **torch only**: the GPU tests that need no Ray (``pytest -m gpu tests/test_cuda.py``: the harness,
  bf16 couplings, checkpointing, TF32, CPU/CUDA agreement, then the compiled ones), the step
  benchmarks (``bench_compile.py``: eager and compiled, float32 and bf16 couplings, against
  normflows' Glow when its wheel came, FLOP/s against the device's own bf16 and fp32 matmul rates)
  at the laptop and the CIFAR-10 card shapes, and ``flowbench train`` at the card's shape for 300
  steps (throughput and peak memory from its record);
- **with Ray**, where ray, mlflow and optuna import: the ``sweeps/gpu-check.yaml`` sweep; the
  data-parallel (nccl) test in the GPU tests runs where there are two GPUs.

Each command has a share of the budget and is stopped at it (its log and whatever JSON it wrote so
far are kept); a later command keeps its share whatever an earlier one used.
``--dry-run`` touches no GPU: pytest collects its selections, the benchmark builds its models
(``--dry-run``), ``flowbench train --dry-run`` and ``flowbench sweep --dry-run`` validate theirs,
and the summary lists what would run (``tests/test_gpu_check.py`` runs it, so it cannot rot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CARD = ["--hparam", "depth=32", "--hparam", "levels=3", "--hparam", "hidden_channels=512"]  # Glow's CIFAR-10 card
RAY_TIER = ("ray", "mlflow", "optuna")


@dataclasses.dataclass
class Step:
    name: str
    tier: str  # "torch only" or "with Ray"
    command: list[str]
    dry_run: list[str]  # the same command's check: CPU only, quick
    share: float  # seconds of the budget it may take
    figures: Path | None = None  # the JSON it writes (a benchmark's figures, pytest's report), read into the summary

    def run(self, argv: list[str], env: dict, log: Path, timeout: float) -> tuple[str, float]:
        start = time.perf_counter()
        with log.open("w") as out:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            try:
                proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"stopped at its share of the budget ({timeout:.0f} s)"
        return status, time.perf_counter() - start


def steps(out: Path) -> list[Step]:
    pytest = [PY, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "-rs", "tests/test_cuda.py", "-m", "gpu"]
    bench = [PY, "benchmarks/bench_compile.py", "--device", "cuda"]
    train = [PY, "-m", "flowbench.cli", "train", "--model", "glow", "--dataset", "embedded", *CARD]
    train += ["--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "100", "--budget-steps", "300"]
    train += ["--evaluations", "3", "--device", "cuda", "--out", str(out / "train-glow-card")]
    laptop = ["--shapes", "laptop", "--models", "glow,emerging", "--json", str(out / "compile-laptop.json")]
    card = ["--shapes", "card", "--models", "glow", "--repeats", "3", "--no-inference"]
    card += ["--json", str(out / "compile-card.json")]
    sweep = [PY, "-m", "flowbench.cli", "sweep", "sweeps/gpu-check.yaml", "--results", str(out / "sweep")]
    return [
        Step(
            "GPU tests, eager",
            "torch only",
            [*pytest, "-k", "not compiled", "--junitxml", str(out / "tests-eager.xml")],
            [*pytest, "-k", "not compiled", "--collect-only"],
            90,
            out / "tests-eager.xml",
        ),
        Step(
            "step benchmarks, laptop shape",
            "torch only",
            [*bench, *laptop],
            [*bench, *laptop, "--dry-run"],
            120,
            out / "compile-laptop.json",
        ),
        Step("flowbench train, CIFAR-10 card shape", "torch only", train, [*train, "--dry-run"], 80),
        Step(
            "step benchmarks, card shape",
            "torch only",
            [*bench, *card],
            [*bench, *card, "--dry-run"],
            100,
            out / "compile-card.json",
        ),
        Step(
            "GPU tests, compiled",
            "torch only",
            [*pytest, "-k", "compiled", "--junitxml", str(out / "tests-compiled.xml")],
            [*pytest, "-k", "compiled", "--collect-only"],
            60,
            out / "tests-compiled.xml",
        ),
        Step("gpu-check sweep", "with Ray", sweep, [*sweep, "--dry-run"], 240),
    ]


def unpack_wheels(wheels: Path, site: Path) -> list[str]:
    """Each wheel in ``wheels`` unpacked into ``site`` (what pip would install, without pip)."""
    names = []
    for wheel in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        names.append(wheel.name)
    return names


def importable(name: str, env: dict) -> bool:
    """Whether ``name`` imports under ``env`` (the unpacked wheels first on its path)."""
    probe = [PY, "-c", f"import {name}"]
    return subprocess.run(probe, env=env, capture_output=True, cwd=ROOT).returncode == 0


def environment(env: dict) -> dict:
    probe = (
        "import json, torch, shutil;"
        "cuda = torch.cuda.is_available();"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpus': torch.cuda.device_count(),"
        " 'devices': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],"
        " 'cpu_capability': torch.backends.cpu.get_cpu_capability()}))"
    )
    found = json.loads(subprocess.run([PY, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout)
    found["python"] = platform.python_version()
    found["c_compiler"] = next((c for c in ("gcc", "clang", "cc") if shutil.which(c)), None)
    found["packages"] = {
        name: importable(name, env) for name in ("pydantic", "yaml", "normflows", "triton", "xdist", *RAY_TIER)
    }
    return found


def test_counts(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def step_figures(step: Step, out: Path) -> list[str]:
    """The lines of the summary that a finished (or stopped) step's figures give."""
    lines = []
    if step.figures is not None and step.figures.suffix == ".xml":
        counts = test_counts(step.figures)
        if counts:
            lines.append(
                f"  - {counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                f"{counts['skipped']} skipped (the skipped ones and why: in the log)"
            )
    if step.figures is not None and step.figures.suffix == ".json" and step.figures.is_file():
        figures = json.loads(step.figures.read_text())
        rates = figures.get("matmul_gflops", {})
        lines.append(
            f"  - matmul rates on this device: float32 {rates.get('float32', 0) / 1e3:.3g} TFLOP/s, "
            f"bfloat16 {rates.get('bfloat16', 0) / 1e3:.3g} TFLOP/s"
        )
        for row in figures.get("steps", []):
            peer = row.get("eager_over_normflows_float32")
            lines.append(
                f"  - {row['model']} {row['shape']} {row['precision']}: eager {row['eager_ms']:.1f} ms, compiled "
                f"{row['compiled_ms']:.1f} ms ({row['compiled_over_eager']:.2f}×, rounds {row['rounds_low']:.2f}–"
                f"{row['rounds_high']:.2f}); compile {row['compile_seconds']:.0f} s, break-even "
                f"{row['break_even_steps']:.0f} steps; compiled at {row['compiled_of_matmul_rate']:.0%} of the "
                f"{row['precision']} matmul rate"
                + (
                    f"; / normflows float32: eager {peer:.2f}×, compiled {row['compiled_over_normflows_float32']:.2f}×"
                    if peer is not None
                    else ""
                )
            )
        for kind, row in figures.get("inference", {}).items():
            lines.append(
                f"  - glow laptop {kind}: compiled/eager {row['compiled_over_eager']:.2f}×, compile "
                f"{row['compile_seconds']:.0f} s, break-even {row['break_even_calls']:.0f} calls"
            )
    record = out / "train-glow-card" / "record.json"
    if step.name.startswith("flowbench train") and record.is_file():
        row = json.loads(record.read_text())
        lines.append(
            f"  - {row['steps']} steps, {row['throughput_images_per_s']:.0f} images/s, peak memory "
            f"{row['peak_memory_mb']:.0f} MB ({row['memory_kind']}); test bits/dim {row['test_bpd']:.3f} after "
            f"{row['steps']} steps"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for summary.md and the raw figures (created)")
    p.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of carried wheels (default wheels/)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all the commands (default 450)")
    p.add_argument("--dry-run", action="store_true", help="check every command on the CPU; run none")
    args = p.parse_args()
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    site = out / "site-packages"
    wheels = unpack_wheels(Path(args.wheels), site)
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    }
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # nothing here may touch a GPU
    found = environment(env)
    with_ray = all(found["packages"][name] for name in RAY_TIER)
    if not args.dry_run and not found["gpus"]:
        print("gpu_check: error: no CUDA GPU visible to torch; run it on a GPU machine (or --dry-run)", file=sys.stderr)
        return 2
    if not (found["packages"]["pydantic"] and found["packages"]["yaml"]):
        print(
            f"gpu_check: error: flowbench needs pydantic and PyYAML: none importable, and {args.wheels} holds "
            f"{len(wheels)} wheels; put their wheels there (see the docstring's pip download)",
            file=sys.stderr,
        )
        return 2

    plan = steps(out)
    results = []
    for i, step in enumerate(plan):
        slug = step.name.replace(",", "").replace(" ", "-")
        log = out / "logs" / f"{i + 1}-{slug}{'-dry-run' if args.dry_run else ''}.log"
        if step.tier == "with Ray" and not with_ray:
            results.append((step, "not run: Ray, MLflow or Optuna is not installed here", 0.0, log))
            continue
        if args.dry_run:
            status, seconds = step.run(step.dry_run, env, log, timeout=300)
            results.append((step, "valid" if status == "ok" else f"INVALID: {status}", seconds, log))
            continue
        left = args.budget - (time.perf_counter() - started)
        later = sum(s.share for s in plan[i + 1 :] if s.tier == "torch only")  # what later steps are kept
        timeout = min(left, max(step.share, left - later))
        if timeout < 20:
            results.append((step, "not run: the budget was spent", 0.0, log))
            continue
        status, seconds = step.run(step.command, env, log, timeout)
        results.append((step, status, seconds, log))

    tiers = ["torch only", *(["with Ray"] if with_ray else [])]
    devices = ", ".join(found["devices"]) or "none (dry run)"
    lines = [
        f"# GPU check{' (dry run: commands checked on the CPU, none run)' if args.dry_run else ''}",
        "",
        f"- device: {devices}; {found['gpus']} GPU(s); torch {found['torch']} (CUDA {found['cuda']}), "
        f"Python {found['python']}, host CPU capability {found['cpu_capability']}",
        f"- tiers run: {' and '.join(tiers)}"
        + ("" if with_ray else " (Ray, MLflow or Optuna missing: the with-Ray tier did not run)"),
        f"- carried wheels unpacked: {', '.join(wheels) or 'none'}; importable: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in found["packages"].items()),
        f"- C compiler for Triton/Inductor: {found['c_compiler'] or 'none (compiled steps cannot build)'}",
        f"- wall time {time.perf_counter() - started:.0f} s of a {args.budget:.0f} s budget",
        "",
        "| step | tier | status | seconds | log |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {step.name} | {step.tier} | {status} | {seconds:.0f} | logs/{log.name} |"
        for step, status, seconds, log in results
    ]
    lines.append("")
    for step, *_ in results:
        figures = [] if args.dry_run else step_figures(step, out)
        if figures:
            lines += [f"- {step.name}:", *figures]
    if not args.dry_run:
        lines += ["", "Commands:", ""] + [f"    {' '.join(step.command)}" for step, *_ in results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "figures.json").write_text(
        json.dumps(
            {
                "environment": found,
                "dry_run": args.dry_run,
                "steps": [
                    {"name": s.name, "tier": s.tier, "status": st, "seconds": sec, "command": s.command}
                    for s, st, sec, _ in results
                ],
            },
            indent=2,
        )
    )
    print(f"wrote {out / 'summary.md'} and {out / 'figures.json'}")
    bad = [s.name for s, st, *_ in results if not (st in ("ok", "valid") or st.startswith("not run"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
