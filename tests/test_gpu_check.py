"""The GPU check (benchmarks/gpu_check.py) cannot rot: its dry run checks every command it would run
on a GPU, here on the CPU. And its torch-only tier stands: ``flowbench train`` runs where Ray, MLflow
and Optuna cannot be imported, as on the bare GPU machines."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# imports of these fail, and each attempt is written to stderr
BLOCKER = """
import sys
BLOCKED = {"ray", "mlflow", "optuna"}

class Unavailable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            print(f"blocked import: {name}", file=sys.stderr)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Unavailable())
from flowbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_flowbench_train_runs_without_ray_mlflow_or_optuna(tmp_path):
    out = tmp_path / "run"
    tiny = ["--hparam", "depth=1", "--hparam", "levels=2", "--hparam", "hidden_channels=8"]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER, "train", "--model", "glow", "--dataset", "digits", *tiny]
        + ["--budget-steps", "4", "--evaluations", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blocked import" not in proc.stderr  # nothing even tried
    assert json.loads((out / "record.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_gpu_check_dry_run_checks_every_command(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("probe/__init__.py", "")
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", str(out), "--dry-run", "--wheels", str(wheels)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads((out / "figures.json").read_text())
    assert figures["dry_run"] and figures["environment"]["gpus"] == 0  # no GPU touched
    statuses = {step["name"]: step["status"] for step in figures["steps"]}
    assert len(statuses) == 6 and all(status == "valid" for status in statuses.values()), statuses
    train = next(step["command"] for step in figures["steps"] if "train" in step["command"])
    assert "hidden_channels=512" in train and "cuda" in train  # the CIFAR-10 card's Glow, on the GPU
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run") and "tiers run: torch only and with Ray" in summary
    assert "probe-1.0-py3-none-any.whl" in summary and (out / "site-packages" / "probe" / "__init__.py").is_file()
    for name in statuses:
        assert f"| {name} |" in summary
